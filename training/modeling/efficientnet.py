"""EfficientNet B0-B3 slice classifier (tf-keras applications architecture, no downloaded weights).

The backbone is built on our own input tensor so the result is one flat functional model: tfmot's
``quantize_apply`` refuses nested models, and a flat graph exports identically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from training.modeling.common import classification_head
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
        include_top=False, weights=None, input_tensor=inputs, pooling="avg"
    )
    if cfg.weights is not None:
        _load_local_weights(backbone, cfg.weights)
    outputs = classification_head(backbone.output, cfg.dropout)
    return keras.Model(inputs, outputs, name=f"efficientnet{cfg.efficientnet_variant.lower()}")


def _load_local_weights(backbone: keras.Model, path: Path) -> None:
    """Load a user-supplied .h5 by layer name; mismatching layers (e.g. a 3-channel stem) are skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: {path} does not exist")
    backbone.load_weights(str(path), by_name=True, skip_mismatch=True)
    log.info("loaded backbone weights from %s (by name, mismatches skipped)", path)
