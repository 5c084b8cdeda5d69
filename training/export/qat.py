"""Quantization-aware training (tensorflow-model-optimization) for the 2D models.

Only layers tfmot's default 8-bit registry supports are annotated (Conv2D, DepthwiseConv2D, Dense,
BN/ReLU patterns...); anything else stays float during fine-tuning and is calibrated by the
representative dataset at conversion.
"""

from __future__ import annotations

import logging
from typing import Any

from training.tfenv import keras, tf

log = logging.getLogger(__name__)


def _tfmot() -> Any:
    import tensorflow_model_optimization as tfmot

    return tfmot


def _supported(layer: keras.layers.Layer) -> bool:
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry as registry,
    )

    if isinstance(layer, keras.layers.InputLayer):
        return False
    return bool(registry.Default8BitQuantizeRegistry().supports(layer))


def annotate(model: keras.Model) -> tuple[keras.Model, int, int]:
    """Clone ``model`` with every tfmot-supported layer annotated; returns (model, annotated, total)."""
    tfmot = _tfmot()
    if len(model.input_shape) != 4:
        raise ValueError("QAT is only offered for 2D models (tfmot has no Conv3D quantize config)")
    counts = [0, 0]

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        counts[1] += 1
        if _supported(layer):
            counts[0] += 1
            return tfmot.quantization.keras.quantize_annotate_layer(layer.__class__.from_config(layer.get_config()))
        return layer.__class__.from_config(layer.get_config())

    annotated = keras.models.clone_model(model, clone_function=clone)
    annotated.set_weights(model.get_weights())
    return annotated, counts[0], counts[1]


#: Model names (``keras.Model.name``) whose QAT is verified: fine-tune + int8 conversion in tests
#: (EfficientNet on B0; B1-B3 are the same blocks, wider and deeper).  EfficientNet's QAT used to turn
#: every variable from the stem to block4a into NaN on the first step because its built-in
#: Rescaling(1/255) shrank our [0, 1] inputs to [0, 1/255]; the model now makes that layer an identity
#: (training/modeling/efficientnet.py), and models saved before that change are refused below.
QAT_FAMILIES: tuple[str, ...] = (
    "cnn2d",
    "multiscale2d",
    "efficientnetb0",
    "efficientnetb1",
    "efficientnetb2",
    "efficientnetb3",
)


def qat_model(model: keras.Model) -> keras.Model:
    """A quantization-aware copy of a trained float model (weights carried over), ready to fine-tune."""
    if model.name not in QAT_FAMILIES:
        raise ValueError(
            f"QAT is supported for {list(QAT_FAMILIES)}, not {model.name!r}; export it with post-training 'int8'"
        )
    _refuse_input_rescaling(model)
    tfmot = _tfmot()
    annotated, n_ann, n_all = annotate(model)
    with tfmot.quantization.keras.quantize_scope():
        q = tfmot.quantization.keras.quantize_apply(annotated)
    log.info("QAT: annotated %d of %d layers of %s", n_ann, n_all, model.name)
    return q


def _refuse_input_rescaling(model: keras.Model) -> None:
    """Refuse an EfficientNet saved with keras' ``Rescaling(1/255)`` still active (before the fix).

    Its stem sees [0, 1/255] and QAT turns the weights into NaN on the first step; the float model and
    its post-training int8 export are unaffected.
    """
    for layer in model.layers:
        if isinstance(layer, keras.layers.Rescaling) and (layer.scale != 1.0 or layer.offset != 0.0):
            raise ValueError(
                f"{model.name} rescales its [0, 1] inputs ({layer.name}: scale {layer.scale}): QAT diverges to NaN "
                "on such a model; retrain it with the current code or export it with post-training 'int8'"
            )


def fine_tune(
    q: keras.Model,
    train: tf.data.Dataset,
    epochs: int,
    steps: int,
    learning_rate: float,
    class_weight: dict[int, float] | None = None,
) -> dict[str, list[float]]:
    """Short low-LR fine-tune of the QAT model (fake-quant ranges settle, weights adapt)."""
    q.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.AUC(name="auc")],
    )
    hist = q.fit(train, epochs=epochs, steps_per_epoch=steps, class_weight=class_weight, verbose=2)
    return {k: [float(v) for v in vs] for k, vs in hist.history.items()}
