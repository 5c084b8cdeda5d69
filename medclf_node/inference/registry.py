"""Load the configured models once at start-up: validate manifests, verify sha256, warm up.

A model that fails any check stops start-up with a :class:`ModelLoadError` naming the model
directory and the offending key, so an admin never discovers a broken model on the first series.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medclf_node.config import Config, ModelsSection
from medclf_node.inference.manifest import (
    MANIFEST_FILE,
    Manifest,
    ManifestError,
    load_manifest,
    verify_artifacts,
)
from medclf_node.inference.runtime import Runtime, RuntimeLoadError, open_runtime

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A configured model cannot be served; the message says which directory and key."""


@dataclass(frozen=True)
class LoadedModel:
    """A manifest together with the warmed-up runtime of its served artifact."""

    manifest: Manifest
    runtime: Runtime
    directory: Path
    artifact_path: str
    load_seconds: float

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version


def load_model(model_dir: Path, *, threads: int = 2, artifact: str | None = None) -> LoadedModel:
    """Validate, verify and open one model directory (``artifact``: a path other than the default)."""
    t0 = time.perf_counter()
    try:
        manifest = load_manifest(model_dir)
        art = manifest.artifact(artifact)
    except ManifestError as exc:
        raise ModelLoadError(str(exc)) from None
    except KeyError:
        raise ModelLoadError(f"{model_dir}: artifacts: no artifact with path {artifact!r}") from None
    if manifest.input.kind == "volume" and manifest.kind != "binary":
        # the volume path (predict_series, the CT SR/SC) reports one finding; refusing here beats serving
        # a softmax as if its first unit were P(finding)
        raise ModelLoadError(f"{model_dir}: task: {manifest.kind!r} is served for input.kind 'image' only; "
                             "volume models are 'binary' in this version")
    try:
        verify_artifacts(manifest, model_dir, only=art.path)
    except ManifestError as exc:
        raise ModelLoadError(str(exc)) from None
    try:
        runtime = open_runtime(Path(model_dir) / art.path, art.format, threads=threads)
    except RuntimeLoadError as exc:
        raise ModelLoadError(f"{model_dir}: artifacts[{art.path!r}]: {exc}") from None
    if tuple(runtime.input_shape) != tuple(manifest.input.shape):
        raise ModelLoadError(
            f"{model_dir}: input.shape {list(manifest.input.shape)} does not match the artifact "
            f"{art.path!r} input {list(runtime.input_shape)}"
        )
    actual_dtype = getattr(runtime, "input_dtype", "float32")
    if actual_dtype != art.input_dtype:
        raise ModelLoadError(
            f"{model_dir}: artifacts[{art.path!r}].input_dtype is {art.input_dtype} but the model "
            f"takes {actual_dtype}"
        )
    _check_outputs(manifest, runtime, Path(model_dir), art.path)
    secs = time.perf_counter() - t0
    log.info("loaded model %s %s from %s (%s, %.2f s incl. warm-up)", manifest.name, manifest.version,
             model_dir, art.path, secs)
    return LoadedModel(manifest, runtime, Path(model_dir), art.path, secs)


def _check_outputs(manifest: Manifest, runtime: Runtime, model_dir: Path, art_path: str) -> None:
    """The artifact's output units fit the task (one per class / finding; binary: positive_index)."""
    try:
        units = int(runtime.predict(np.zeros((1, *runtime.input_shape), np.float32)).reshape(1, -1).shape[1])
    except Exception as exc:  # noqa: BLE001 - a model that cannot run once must not be served
        raise ModelLoadError(f"{model_dir}: artifacts[{art_path!r}]: the model does not run: {exc}") from None
    want = manifest.output_units
    if want is not None and units != want:
        key = "classes" if manifest.kind == "multiclass" else "findings"
        raise ModelLoadError(f"{model_dir}: {key}: the manifest names {want} but the artifact {art_path!r} "
                             f"has {units} output unit(s)")
    if want is None and manifest.output.positive_index >= units:
        raise ModelLoadError(f"{model_dir}: output.positive_index {manifest.output.positive_index} but the "
                             f"artifact {art_path!r} has {units} output unit(s)")


def wanted_model_names(config: Config) -> set[str]:
    """Models to load: ``models.enabled`` if given, else every model named by the effective rules."""
    if config.models.enabled:
        return set(config.models.enabled)
    return {m for rule in config.effective_rules() for m in rule.models}


def discover(directory: Path) -> tuple[dict[str, Path], dict[Path, str]]:
    """Map manifest ``name`` -> model directory for every sub-directory holding a manifest.

    Also returns the directories whose manifest is invalid, with the error: they only stop
    start-up when a wanted model is among them (their name cannot be known for sure).
    """
    found: dict[str, Path] = {}
    broken: dict[Path, str] = {}
    if not directory.is_dir():
        raise ModelLoadError(f"models.directory {directory}: not a directory")
    for sub in sorted(p for p in directory.iterdir() if (p / MANIFEST_FILE).is_file()):
        try:
            name = load_manifest(sub).name
        except ManifestError as exc:
            broken[sub] = str(exc)
            continue
        if name in found:
            raise ModelLoadError(f"{sub}: name: model name {name!r} is also used by {found[name]}")
        found[name] = sub
    return found, broken


class ModelRegistry:
    """The loaded models by name."""

    def __init__(self, models: Iterable[LoadedModel] = ()) -> None:
        self._models = {m.name: m for m in models}

    @classmethod
    def from_config(cls, config: Config) -> ModelRegistry:
        return cls.load(config.models, wanted_model_names(config))

    @classmethod
    def load(cls, section: ModelsSection, names: Iterable[str]) -> ModelRegistry:
        """Load ``names`` from ``section.directory``; every name must exist and load cleanly."""
        wanted = sorted(set(names))
        available, broken = discover(section.directory)
        missing = [n for n in wanted if n not in available]
        if missing and broken:  # the wanted model is probably the broken one: show why
            named = [err for path, err in broken.items() if path.name in missing]
            raise ModelLoadError((named or list(broken.values()))[0])
        for err in broken.values():
            log.warning("ignoring an unused model directory with an invalid manifest: %s", err)
        if missing:
            raise ModelLoadError(
                f"models.directory {section.directory}: no model named {missing} (found: {sorted(available)}); "
                "check rules[].models / models.enabled / models.default_model"
            )
        return cls(load_model(available[n], threads=section.threads) for n in wanted)

    def get(self, name: str) -> LoadedModel:
        try:
            return self._models[name]
        except KeyError:
            raise KeyError(f"model {name!r} is not loaded (loaded: {sorted(self._models)})") from None

    def names(self) -> list[str]:
        return sorted(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __len__(self) -> int:
        return len(self._models)
