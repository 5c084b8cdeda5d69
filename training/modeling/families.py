"""The registry of model families: name -> (dimensionality, builder).

Why a registry: the factory used to end in an ``else`` that built a 3D DenseNet for any family it did
not know, so a typo trained the wrong network.  Now a family exists only once it is registered, an
unknown name is refused with the list of known ones (at config validation and again at build time),
and a new family is one :func:`register_family` call instead of an edit to the factory.

This module imports no TensorFlow: builders are registered as ``"module:function"`` strings and
imported only when a model is built, so configs validate in a process that never starts TF.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class UnknownFamilyError(ValueError):
    """A model family that is not registered; the message lists the registered ones."""


@dataclass(frozen=True)
class Family:
    """One registered architecture: 2 (slice) or 3 (volume) input dimensions and where its builder lives."""

    name: str
    dims: int
    builder: str | Callable[..., Any]
    description: str = ""

    def build_fn(self) -> Callable[..., Any]:
        """The builder ``(input_shape, ModelConfig) -> keras.Model`` (imported on first use)."""
        if callable(self.builder):
            return self.builder
        module, _, attr = self.builder.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        if not callable(fn):
            raise TypeError(f"family {self.name!r}: {self.builder} is not callable")
        return fn


_REGISTRY: dict[str, Family] = {}


def register_family(name: str, dims: int, builder: str | Callable[..., Any], description: str = "",
                    *, replace: bool = False) -> Family:
    """Register ``name``; refuses a second registration of the same name unless ``replace``."""
    if dims not in (2, 3):
        raise ValueError(f"family {name!r}: dims must be 2 or 3, not {dims}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"model family {name!r} is already registered")
    fam = Family(name, dims, builder, description)
    _REGISTRY[name] = fam
    log.debug("registered model family %s (%dD)", name, dims)
    return fam


def unregister_family(name: str) -> None:
    """Remove a family (tests and plug-ins that registered a temporary one)."""
    _REGISTRY.pop(name, None)


def known_families() -> tuple[str, ...]:
    """Registered family names, sorted."""
    return tuple(sorted(_REGISTRY))


def get_family(name: str) -> Family:
    """The registered family ``name``; :class:`UnknownFamilyError` naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownFamilyError(
            f"unknown model family {name!r}; registered families: {', '.join(known_families())}"
        ) from None


register_family("cnn2d", 2, "training.modeling.cnn2d:build_cnn2d", "small 2D/2.5D slice CNN")
register_family("multiscale2d", 2, "training.modeling.multiscale2d:build_multiscale2d",
                "full-resolution + downsampled 2D paths, fused")
register_family("efficientnet", 2, "training.modeling.efficientnet:build_efficientnet",
                "keras.applications EfficientNet B0-B3 (weights=None or a local weights file)")
register_family("cnn3d_cbam", 3, "training.modeling.cbam3d:build_cnn3d_cbam", "3D CNN with CBAM attention")
register_family("densenet3d", 3, "training.modeling.densenet3d:build_densenet3d", "3D DenseNet")

__all__ = ["Family", "UnknownFamilyError", "get_family", "known_families", "register_family",
           "unregister_family"]
