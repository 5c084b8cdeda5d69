"""Keras -> TFLite in a closed set of precisions: fp32, fp16, dynamic-range, full-integer int8.

3D models are limited to fp32/fp16: TFLite has no int8 Conv3D kernel (measured, see DESIGN.md), so
int8/dynamic 3D graphs would either fail or fall back to slow reference kernels.

int8 keeps the classification head in float ("float head"): the body runs in int8 up to the global
pooling, then DEQUANTIZE -> FULLY_CONNECTED -> LOGISTIC run in float32 and the output tensor is
float32.  A fully int8 head quantises the probability to steps of 1/256 (TFLite fixes LOGISTIC's
output scale), so slices whose probabilities differ by less than 0.004 tie and the series AUC drops:
on a synthetic set a 3-epoch cnn2d had 4 distinct int8 outputs for 96 slices and lost 0.083 AUC,
with the float head 95 distinct outputs and a +0.014 delta.  The head is one dense unit: it costs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from training.tfenv import keras, tf

log = logging.getLogger(__name__)

TFLiteMode = Literal["fp32", "fp16", "dynamic", "int8"]
TFLITE_MODES: tuple[str, ...] = get_args(TFLiteMode)
MODES_3D: tuple[str, ...] = ("fp32", "fp16")


class ExportError(ValueError):
    """An export request that cannot be honoured (unknown mode, mode unsupported for the model...)."""


def supported_tflite_modes(model: keras.Model) -> tuple[str, ...]:
    """The TFLite modes this model's rank allows."""
    return MODES_3D if len(model.input_shape) == 5 else TFLITE_MODES


def convert(
    model: keras.Model, mode: str, representative: npt.NDArray[np.float32] | None = None, *, float_head: bool = True
) -> bytes:
    """Convert ``model`` to a .tflite flatbuffer.

    ``representative`` (N, *input) float32 samples drawn from the training pipeline are required for
    ``int8``; the result then has an int8 input tensor (the runtime quantises) and, with ``float_head``
    (the default; see the module docstring), a float32 output computed by a float head; without it, or
    for a quantization-aware (QAT) model whose quantisation the converter takes from its fake-quant
    ops, the output tensor is int8 too.
    """
    if mode not in TFLITE_MODES:
        raise ExportError(f"unknown TFLite mode {mode!r}; choose one of {list(TFLITE_MODES)}")
    if mode not in supported_tflite_modes(model):
        raise ExportError(
            f"TFLite mode {mode!r} is not supported for 3D models (no int8 Conv3D in TFLite); "
            f"use one of {list(MODES_3D)} or the SavedModel"
        )
    # A concrete function converts ~3x faster than from_keras_model (no SavedModel round trip).
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], model)
    if mode == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif mode == "int8":
        if representative is None or len(representative) == 0:
            raise ExportError("int8 export needs representative samples from the training data")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _representative_fn(representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        if float_head and not is_qat_model(model):
            return _int8_float_head(converter, model.name)
    flat = converter.convert()
    log.info("converted %s to TFLite %s: %.1f kB", model.name, mode, len(flat) / 1024)
    return bytes(flat)


def _representative_fn(samples: npt.NDArray[np.float32]) -> object:
    def gen() -> Iterator[list[npt.NDArray[np.float32]]]:
        for i in range(len(samples)):
            yield [samples[i : i + 1].astype(np.float32)]

    return gen


#: Ops at the very end of a classifier that stay float in int8 exports (walked back from the output).
_HEAD_OPS = ("FULLY_CONNECTED", "LOGISTIC", "SOFTMAX", "RESHAPE")


def is_qat_model(model: keras.Model) -> bool:
    """True for a tfmot quantization-aware model (its quantisation parameters come from fake-quant ops)."""
    return any(
        type(layer).__name__ in ("QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer") for layer in model.layers
    )


def head_nodes(flat: bytes) -> list[str]:
    """Output tensor names of the trailing head ops (dense/sigmoid/softmax/reshape) of a TFLite model.

    Walks back from the single output: the op producing it, then the producer of that op's first
    input, while the op is one of ``_HEAD_OPS``.  These names are what the MLIR quantizer's
    ``denylisted_nodes`` expects.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.python.schema_util import get_builtin_code_from_operator_code
    from tensorflow.lite.tools import flatbuffer_utils

    m = flatbuffer_utils.convert_bytearray_to_object(bytearray(flat))
    sg = m.subgraphs[0]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    producer = {int(o): op for op in sg.operators for o in op.outputs}
    wanted = {getattr(schema.BuiltinOperator, n) for n in _HEAD_OPS}
    out: list[str] = []
    tensor = int(sg.outputs[0])
    while tensor in producer:
        op = producer[tensor]
        code = get_builtin_code_from_operator_code(m.operatorCodes[op.opcodeIndex])
        if code not in wanted:
            break
        out.append(sg.tensors[tensor].name.decode())
        log.debug("float head op %s -> %s", names.get(code, code), out[-1])
        tensor = int(op.inputs[0])
    return out


def _int8_float_head(converter: tf.lite.TFLiteConverter, name: str) -> bytes:
    """Full-integer conversion with the head denylisted: calibrate, quantise, then set int8 in / float out.

    Mirrors what ``converter.convert()`` does for post-training int8 (calibrate, MLIR quantize,
    modify the I/O types) with ``denylisted_nodes`` added, which the public converter API lacks.
    """
    from tensorflow.lite.python import convert as tfl_convert
    from tensorflow.lite.python.util import modify_model_io_type

    converter._experimental_calibrate_only = True  # noqa: SLF001 - the public API cannot denylist nodes
    calibrated = converter.convert()
    head = head_nodes(calibrated)
    quantised = tfl_convert.mlir_quantize(
        calibrated, disable_per_channel=False, fully_quantize=False, denylisted_nodes=head
    )
    flat = bytes(modify_model_io_type(quantised, tf.int8, tf.float32))
    log.info("converted %s to TFLite int8 (float head: %s): %.1f kB", name, head, len(flat) / 1024)
    return flat
