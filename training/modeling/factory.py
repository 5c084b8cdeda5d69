"""The model factory: (model config, preprocess spec) -> compiled-ready tf-keras model.

The architecture comes from the family registry (:mod:`training.modeling.families`); there is no
fallback: an unregistered family raises :class:`UnknownFamilyError` listing the registered ones.
"""

from __future__ import annotations

import logging

from medclf_node.preprocess import PreprocessSpec
from training.modeling.config import ModelConfig
from training.modeling.families import UnknownFamilyError, get_family, known_families
from training.tfenv import keras

log = logging.getLogger(__name__)


def model_input_shape(spec: PreprocessSpec) -> tuple[int, ...]:
    """Per-sample input shape (channels last) that the preprocess spec produces."""
    return (*spec.input_shape, spec.channels)


def build_model(cfg: ModelConfig, spec: PreprocessSpec) -> keras.Model:
    """Build the configured architecture for the tensors ``spec`` produces.

    Raises UnknownFamilyError for an unregistered family (also for a config built without
    validation), and ValueError when a 2D family meets a 3D spec or vice versa, so a config
    mistake fails before any training time is spent.
    """
    family = get_family(cfg.family)
    spec_dims = 3 if spec.mode == "3d" else 2
    if family.dims != spec_dims:
        raise ValueError(
            f"model family {cfg.family!r} is {family.dims}D but preprocess mode {spec.mode!r} is {spec_dims}D"
        )
    shape = model_input_shape(spec)
    model = family.build_fn()(shape, cfg)
    log.info("built %s: input %s, %d parameters", model.name, shape, model.count_params())
    return model


__all__ = ["UnknownFamilyError", "build_model", "known_families", "model_input_shape"]
