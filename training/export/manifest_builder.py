"""THE manifest builder: every recipe and ``medclf-train export`` write their manifest through here.

Why one: there were three (two recipes and the export bundle), each deriving the input layout and
dtype by hand, and two of them stamped ``training_package_version`` with the *model's* version
(1.0.0) instead of the package's (0.1.0).  Here the layout follows the preprocessing mode, the input
dtype follows the default artifact, the package version comes from the installed distribution's
metadata, and non-finite metrics are dropped (JSON has no NaN).  Schema-specific keys (e.g. a
manifest v2 task or class list) go through ``extra`` unchanged, so the builder does not fork when
the schema grows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

from medclf_node.inference.manifest import (
    Aggregation,
    Artifact,
    Labels,
    Manifest,
    OutputSpec,
    Provenance,
    SlidingWindow,
    parse_manifest,
)
from medclf_node.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

DISTRIBUTION = "medclf-node"


def package_version() -> str:
    """Version of the installed ``medclf-node`` distribution (the one that holds ``training``)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # running from a source tree without an install
        from medclf_node import __version__

        return __version__


def build_manifest(
    *,
    name: str,
    version: str,
    description: str,
    labels: Labels | Mapping[str, Any],
    preprocessing: PreprocessSpec,
    artifacts: Sequence[Artifact],
    default_artifact: str,
    threshold: float,
    metrics: Mapping[str, float],
    provenance: Provenance,
    aggregation: Aggregation | None = None,
    sliding_window: SlidingWindow | None = None,
    output: OutputSpec | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Manifest:
    """A validated :class:`Manifest` (raises ManifestError naming the bad key)."""
    by_path = {a.path: a for a in artifacts}
    if default_artifact not in by_path:
        raise ValueError(f"default artifact {default_artifact!r} is not among {sorted(by_path)}")
    data: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": description,
        "labels": labels.model_dump(mode="json") if isinstance(labels, Labels) else dict(labels),
        "input": {
            "shape": [*preprocessing.input_shape, preprocessing.channels],
            "layout": "NDHWC" if preprocessing.mode == "3d" else "NHWC",
            "dtype": by_path[default_artifact].input_dtype,
        },
        "preprocessing": preprocessing.model_dump(mode="json"),
        "output": (output or OutputSpec(kind="probability", positive_index=0)).model_dump(mode="json"),
        "aggregation": aggregation.model_dump(mode="json") if aggregation is not None else None,
        "threshold": min(1.0, max(0.0, float(threshold))),
        "metrics": {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))},
        "artifacts": [a.model_dump(mode="json") for a in artifacts],
        "default_artifact": default_artifact,
        "provenance": provenance.model_dump(mode="json"),
        "training_package_version": package_version(),
    }
    if preprocessing.mode == "image":  # schema 2: one 2D image per instance
        data["input"]["kind"] = "image"
    if sliding_window is not None:
        data["sliding_window"] = sliding_window.model_dump(mode="json")
    data.update(extra or {})
    return parse_manifest(data, f"manifest of {name}")


def update_manifest(manifest: Manifest, **changes: Any) -> Manifest:
    """``manifest`` with ``changes`` (metrics filtered for finiteness), re-stamped with the package version."""
    if "metrics" in changes:
        changes["metrics"] = {k: float(v) for k, v in changes["metrics"].items() if math.isfinite(float(v))}
    data = {**manifest.model_dump(mode="json"), **changes, "training_package_version": package_version()}
    return parse_manifest(data, f"manifest of {manifest.name}")


__all__ = ["build_manifest", "package_version", "update_manifest"]
