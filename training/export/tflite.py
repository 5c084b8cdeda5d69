"""Keras -> TFLite in a closed set of precisions: fp32, fp16, dynamic-range, full-integer int8.

3D models are limited to fp32/fp16: TFLite has no int8 Conv3D kernel (measured, see DESIGN.md), so
int8/dynamic 3D graphs would either fail or fall back to slow reference kernels.
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
    model: keras.Model, mode: str, representative: npt.NDArray[np.float32] | None = None
) -> bytes:
    """Convert ``model`` to a .tflite flatbuffer.

    ``representative`` (N, *input) float32 samples drawn from the training pipeline are required for
    ``int8``; the result then has int8 input and output tensors (the runtime (de)quantises).
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
    flat = converter.convert()
    log.info("converted %s to TFLite %s: %.1f kB", model.name, mode, len(flat) / 1024)
    return bytes(flat)


def _representative_fn(samples: npt.NDArray[np.float32]) -> object:
    def gen() -> Iterator[list[npt.NDArray[np.float32]]]:
        for i in range(len(samples)):
            yield [samples[i : i + 1].astype(np.float32)]

    return gen
