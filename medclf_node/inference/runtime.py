"""Model runtimes behind one small interface: LiteRT for .tflite, TensorFlow for SavedModel.

The node serving .tflite models must never import TensorFlow (~3 s, ~600 MB RSS), so
TensorFlow is imported inside :class:`TFSavedModelRuntime` only.  Runtimes take float32
batches (NHWC / NDHWC, already preprocessed) and return the model's output as float32
(N, units), dequantised; turning that into a probability is the manifest's business
(see ``predict.output_to_probability``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]

# LiteRT batching.  Measured on the 2-core dev box (min of 25 interleaved runs, 300 slices):
# a 64x64x3 input runs 1.4x faster fed 8 per invoke (input tensor resized once, last chunk
# zero-padded) than one per invoke; a 256x256x3 input runs 2x faster one per invoke (activations of
# a batch fall out of cache; XNNPACK already uses both threads inside one invoke).  So the default
# batch is the largest power of two, at most 16, whose input stays under this many elements.
AUTO_BATCH_ELEMENTS = 98_304


def auto_batch_size(input_shape: tuple[int, ...]) -> int:
    """The LiteRT batch for an input of this shape (see AUTO_BATCH_ELEMENTS)."""
    per_sample = max(1, int(np.prod(input_shape)))
    b = 1
    while b < 16 and 2 * b * per_sample <= AUTO_BATCH_ELEMENTS:
        b *= 2
    return b


class RuntimeLoadError(RuntimeError):
    """The artifact cannot be loaded or does not match what the manifest declares."""


class Runtime(Protocol):
    """What the predictor needs from a model backend."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Input shape without the batch axis."""
        ...

    def predict(self, batch: F32) -> F32:
        """Run ``batch`` (N, *input_shape) float32; returns (N, units) float32 outputs."""
        ...


def _as_batch(batch: npt.NDArray[Any], input_shape: tuple[int, ...]) -> F32:
    arr = np.asarray(batch, dtype=np.float32)
    if arr.shape[1:] != input_shape:
        raise ValueError(f"batch shape {arr.shape} does not match model input (N, {', '.join(map(str, input_shape))})")
    return arr


class LiteRTRuntime:
    """A .tflite model run by ai_edge_litert with XNNPACK (the default delegate) and N threads.

    Quantised int8/uint8 inputs and outputs are converted with the tensors' scale/zero point,
    so callers always see float32.  ``batch_size`` None picks :func:`auto_batch_size`.  An
    interpreter is not thread-safe: calls are serialised by a lock, so pipeline workers may share
    one loaded model.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        threads: int = 2,
        batch_size: int | None = None,
        batch_mode: Literal["resize", "loop"] = "resize",
        warm_up: bool = True,
    ) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(model_path)
        try:
            self._interp = Interpreter(model_path=str(self.path), num_threads=threads)
        except (ValueError, RuntimeError) as exc:
            raise RuntimeLoadError(f"{self.path}: LiteRT cannot load the model: {exc}") from None
        inputs = self._interp.get_input_details()
        outputs = self._interp.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise RuntimeLoadError(
                f"{self.path}: expected one input and one output tensor, got {len(inputs)} and {len(outputs)}"
            )
        self._in = inputs[0]
        self._out_index = int(outputs[0]["index"])
        self._in_dtype = np.dtype(self._in["dtype"])
        self._in_q = self._in["quantization"]  # (scale, zero_point); scale 0 means not quantised
        self._out_q = outputs[0]["quantization"]
        self._input_shape = tuple(int(s) for s in self._in["shape"][1:])
        self.batch_mode = batch_mode
        auto = auto_batch_size(self._input_shape) if batch_size is None else batch_size
        self.batch_size = 1 if batch_mode == "loop" else max(1, auto)
        self._allocated_batch = 0
        self._lock = threading.Lock()
        self._allocate(self.batch_size)
        if warm_up:
            self.predict(np.zeros((1, *self._input_shape), np.float32))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    @property
    def input_dtype(self) -> str:
        return self._in_dtype.name

    def _allocate(self, n: int) -> None:
        if n != self._allocated_batch:
            self._interp.resize_tensor_input(int(self._in["index"]), [n, *self._input_shape], strict=False)
            self._interp.allocate_tensors()
            self._allocated_batch = n

    def _quantise(self, x: F32) -> npt.NDArray[Any]:
        scale, zero = self._in_q
        if self._in_dtype == np.float32 or not scale:
            return x.astype(self._in_dtype, copy=False)
        info = np.iinfo(self._in_dtype)
        # 4 passes over the data (this costs ~1 ms per 256x256x3 slice, as much as int8 kernels save)
        q = np.multiply(x, np.float32(1.0 / scale), dtype=np.float32)
        q += np.float32(zero)
        np.clip(q, info.min, info.max, out=q)
        out = np.empty(q.shape, self._in_dtype)
        np.rint(q, out=out, casting="unsafe")
        return out

    def _dequantise(self, y: npt.NDArray[Any]) -> F32:
        scale, zero = self._out_q
        if y.dtype == np.float32 or not scale:
            return y.astype(np.float32, copy=False)
        return ((y.astype(np.float32) - np.float32(zero)) * np.float32(scale)).astype(np.float32)

    def _invoke(self, chunk: F32) -> F32:
        self._interp.set_tensor(int(self._in["index"]), self._quantise(chunk))
        self._interp.invoke()
        return self._dequantise(self._interp.get_tensor(self._out_index)).reshape(chunk.shape[0], -1)

    def predict(self, batch: F32) -> F32:
        x = _as_batch(batch, self._input_shape)
        n = x.shape[0]
        b = self.batch_size
        out: list[F32] = []
        with self._lock:
            for start in range(0, n, b):
                chunk = x[start : start + b]
                m = chunk.shape[0]
                if m < b:  # pad to the allocated batch rather than re-plan the graph
                    pad = np.zeros((b - m, *self._input_shape), np.float32)
                    chunk = np.concatenate([chunk, pad])
                out.append(self._invoke(chunk)[:m])
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


class TFSavedModelRuntime:
    """A SavedModel run by TensorFlow (imported here, lazily: only when such a model is configured)."""

    def __init__(
        self, model_dir: Path, *, threads: int = 2, batch_size: int = 32, warm_up: bool = True
    ) -> None:
        t0 = time.perf_counter()
        # oneDNN kernels are off by default on CPUs without AVX-512; Conv3D runs ~4-8x faster with them.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
        try:
            import tensorflow as tf
        except ImportError as exc:
            raise RuntimeLoadError(
                f"{model_dir}: serving a SavedModel needs TensorFlow: pip install 'medclf-node[tf]' ({exc})"
            ) from None
        self._tf = tf
        try:  # only effective before TF's first op; harmless afterwards
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            log.debug("TensorFlow already initialised; thread settings unchanged")
        self.path = Path(model_dir)
        try:
            loaded = tf.saved_model.load(str(self.path))
            fn = loaded.signatures["serving_default"]
        except (OSError, KeyError, ValueError) as exc:
            raise RuntimeLoadError(f"{self.path}: TensorFlow cannot load the SavedModel: {exc}") from None
        self._loaded = loaded  # keep the trackable alive
        self._fn = fn
        _args, kwargs = fn.structured_input_signature
        if len(kwargs) != 1:
            raise RuntimeLoadError(f"{self.path}: expected one input in serving_default, got {list(kwargs)}")
        (self._in_name, spec), = kwargs.items()
        shape = spec.shape.as_list()[1:]
        if any(s is None for s in shape):
            raise RuntimeLoadError(f"{self.path}: input shape {spec.shape} must be fixed except the batch")
        self._input_shape = tuple(int(s) for s in shape)
        self.batch_size = batch_size
        log.info("loaded SavedModel %s (TensorFlow import+load %.2f s)", self.path, time.perf_counter() - t0)
        if warm_up:
            self.predict(np.zeros((1, *self._input_shape), np.float32))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    def predict(self, batch: F32) -> F32:
        x = _as_batch(batch, self._input_shape)
        out: list[F32] = []
        for start in range(0, x.shape[0], self.batch_size):
            res = self._fn(**{self._in_name: self._tf.constant(x[start : start + self.batch_size])})
            (y,) = res.values()
            out.append(np.asarray(y.numpy(), np.float32).reshape(y.shape[0], -1))
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def open_runtime(path: Path, fmt: Literal["tflite", "saved_model"], *, threads: int) -> Runtime:
    """The runtime for an artifact of format ``fmt``."""
    if fmt == "tflite":
        return LiteRTRuntime(path, threads=threads)
    return TFSavedModelRuntime(path, threads=threads)
