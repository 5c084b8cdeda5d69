"""The model factory: (model config, preprocess spec) -> compiled-ready tf-keras model."""

from __future__ import annotations

import logging

from medclf_node.preprocess import PreprocessSpec
from training.modeling.cbam3d import build_cnn3d_cbam
from training.modeling.cnn2d import build_cnn2d
from training.modeling.config import ModelConfig
from training.modeling.densenet3d import build_densenet3d
from training.modeling.efficientnet import build_efficientnet
from training.modeling.multiscale2d import build_multiscale2d
from training.tfenv import keras

log = logging.getLogger(__name__)


def model_input_shape(spec: PreprocessSpec) -> tuple[int, ...]:
    """Per-sample input shape (channels last) that the preprocess spec produces."""
    return (*spec.input_shape, spec.channels)


def build_model(cfg: ModelConfig, spec: PreprocessSpec) -> keras.Model:
    """Build the configured architecture for the tensors ``spec`` produces.

    Raises ValueError when a 2D family meets a 3D spec or vice versa, so a config mistake fails
    before any training time is spent.
    """
    spec_dims = 3 if spec.mode == "3d" else 2
    if cfg.dims != spec_dims:
        raise ValueError(
            f"model family {cfg.family!r} is {cfg.dims}D but preprocess mode {spec.mode!r} is {spec_dims}D"
        )
    shape = model_input_shape(spec)
    if cfg.family == "efficientnet":
        model = build_efficientnet((shape[0], shape[1], shape[2]), cfg)
    elif cfg.family == "cnn2d":
        model = build_cnn2d((shape[0], shape[1], shape[2]), cfg)
    elif cfg.family == "multiscale2d":
        model = build_multiscale2d((shape[0], shape[1], shape[2]), cfg)
    elif cfg.family == "cnn3d_cbam":
        model = build_cnn3d_cbam((shape[0], shape[1], shape[2], shape[3]), cfg)
    else:
        model = build_densenet3d((shape[0], shape[1], shape[2], shape[3]), cfg)
    log.info("built %s: input %s, %d parameters", model.name, shape, model.count_params())
    return model
