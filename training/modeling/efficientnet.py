"""EfficientNet B0-B3 slice classifier (tf-keras applications architecture, no downloaded weights).

The backbone is built on our own input tensor so the result is one flat functional model: tfmot's
``quantize_apply`` refuses nested models, and a flat graph exports identically.

keras EfficientNet begins with ``Rescaling(1/255)`` (it expects 0-255 pixels), but our preprocessing
already delivers window values in [0, 1]: the stem then saw [0, 1/255].  Float training ran (the stem
BatchNorm renormalises), but quantization-aware training did not: its first step turned every variable from
the stem up to block4a into NaN (B0 32x32, lr 1e-4), while the same model fed [0, 255] fine-tuned
cleanly.  ImageNet weights loaded by name expect [0, 1] after that layer too.  So the built-in rescaling
is made an identity (scale 1); the TFLite converters fold it (and the identity Normalization of
``weights=None``) into the stem conv, so the exported graphs have the same ops as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from training.modeling.common import model_head
from training.modeling.config import ModelConfig
from training.tfenv import keras

log = logging.getLogger(__name__)

_BACKBONES: dict[str, Callable[..., keras.Model]] = {
    "B0": keras.applications.EfficientNetB0,
    "B1": keras.applications.EfficientNetB1,
    "B2": keras.applications.EfficientNetB2,
    "B3": keras.applications.EfficientNetB3,
}


def build_efficientnet(input_shape: tuple[int, int, int], cfg: ModelConfig) -> keras.Model:
    """EfficientNet body (weights=None) + global average pooling + float32 sigmoid head."""
    inputs = keras.Input(shape=input_shape, name="image")
    backbone = _BACKBONES[cfg.efficientnet_variant](
        include_top=False, weights=None, input_tensor=inputs, pooling=cfg.head_pooling
    )
    _unit_input_scale(backbone)
    if cfg.weights is not None:
        _load_local_weights(backbone, cfg.weights)
    outputs = model_head(backbone.output, cfg)
    return keras.Model(inputs, outputs, name=f"efficientnet{cfg.efficientnet_variant.lower()}")


def _unit_input_scale(backbone: keras.Model) -> None:
    """Make the backbone's built-in ``Rescaling(1/255)`` an identity: our inputs are already in [0, 1].

    Set before the model is first called (a functional model re-runs each layer's ``call``) and kept in the
    layer config, so saved and reloaded models keep the scale they were trained with (models saved before
    this change reload with 1/255, consistent with their training).
    """
    rescalings = [la for la in backbone.layers if isinstance(la, keras.layers.Rescaling)]
    if len(rescalings) != 1:
        raise RuntimeError(f"expected one Rescaling layer in {backbone.name}, found {len(rescalings)}")
    rescalings[0].scale = 1.0
    rescalings[0].offset = 0.0


def _load_local_weights(backbone: keras.Model, path: Path) -> None:
    """Load a user-supplied .h5 by layer name; mismatching layers (e.g. a 3-channel stem) are skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: {path} does not exist")
    backbone.load_weights(str(path), by_name=True, skip_mismatch=True)
    log.info("loaded backbone weights from %s (by name, mismatches skipped)", path)
