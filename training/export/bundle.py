"""`export`: a trained run -> a model directory the node loads (artifacts + checks + manifest.json).

For each requested mode the artifact is written, then checked: TFLite outputs against the Keras
model on held-out samples (per-precision tolerance), and each artifact's AUC on the held-out split
against the fp32 Keras AUC.  The manifest records sha256s, the preprocessing spec, threshold,
metrics (including the int8 AUC delta) and provenance.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medclf_node.inference.manifest import (
    Artifact,
    Labels,
    Manifest,
    Provenance,
    sha256_path,
    write_manifest,
)
from training.export.savedmodel import export_saved_model
from training.export.tflite import ExportError, convert, supported_tflite_modes
from training.tfenv import keras
from training.train import Split, batched, class_weights, split_auc
from training.train_config import TrainConfig

log = logging.getLogger(__name__)

#: |p_tflite - p_keras| accepted per precision (probabilities in [0, 1]): the max over the parity
#: samples, except for int8 (see INT8_PARITY).
TOLERANCE: dict[str, float] = {"fp32": 1e-5, "fp16": 5e-3, "dynamic": 5e-2, "int8": 0.06, "qat_int8": 0.06}
#: int8 parity is held to the 99th percentile and the mean of |p_int8 - p_keras| over every held-out
#: input, not to the max over 32.  Measured on the shipped nodule-2p5d-int8 (int8 body, float head)
#: against its fp32 artifact on all 3433 validation slices: max 0.143, 99th percentile 0.045, mean
#: 0.0069; series probabilities (what the node reports) max 0.064, mean 0.021.  The max is set by a
#: handful of inputs on the steep middle of the sigmoid, so a max tolerance either fails a good model
#: or (the former 0.1) lets a broken one through; p99 <= 0.06 and mean <= 0.02 fail an int8 artifact
#: whose bulk drifts (a 1/256 int8 output step is 0.004) with ~35% / ~3x margin over the shipped model.
INT8_PARITY: dict[str, float] = {"p99": 0.06, "mean": 0.02}


def parity_check(mode: str, tflite_p: npt.ArrayLike, ref_p: npt.ArrayLike, n_par: int) -> dict[str, Any]:
    """Parity of one artifact's probabilities with the reference (Keras) model's.

    fp32/fp16/dynamic: max |difference| over the first ``n_par`` inputs <= ``TOLERANCE[mode]``.
    int8 / qat_int8: over every input, the 99th percentile <= INT8_PARITY["p99"] (= TOLERANCE[mode])
    and the mean <= INT8_PARITY["mean"].
    """
    t = np.asarray(tflite_p, np.float64).reshape(-1)
    r = np.asarray(ref_p, np.float64).reshape(-1)
    if mode in ("int8", "qat_int8"):
        d = np.abs(t - r)
        p99 = float(np.quantile(d, 0.99)) if d.size else 0.0
        mean = float(d.mean()) if d.size else 0.0
        return {"max_abs_diff_vs_keras": float(d.max()) if d.size else 0.0, "p99_abs_diff_vs_keras": p99,
                "mean_abs_diff_vs_keras": mean, "tolerance": TOLERANCE[mode], "tolerance_statistic": "p99",
                "mean_tolerance": INT8_PARITY["mean"], "parity_samples": int(d.size),
                "ok": p99 <= TOLERANCE[mode] and mean <= INT8_PARITY["mean"]}
    d = np.abs(t[:n_par] - r[:n_par])
    diff = float(d.max()) if d.size else 0.0
    return {"max_abs_diff_vs_keras": diff, "tolerance": TOLERANCE[mode], "tolerance_statistic": "max",
            "parity_samples": int(d.size), "ok": diff <= TOLERANCE[mode]}
ARTIFACT_NAMES: dict[str, str] = {
    "saved_model": "saved_model",
    "fp32": "model_fp32.tflite",
    "fp16": "model_fp16.tflite",
    "dynamic": "model_dynamic.tflite",
    "int8": "model_int8.tflite",
    "qat_int8": "model_qat_int8.tflite",
}
_PRECISION = {"saved_model": "fp32", "fp32": "fp32", "fp16": "fp16", "dynamic": "dynamic", "int8": "int8",
              "qat_int8": "int8"}


@dataclass
class ExportResult:
    """What export wrote and how the checks went."""

    model_dir: Path
    manifest: Manifest
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.get("ok", True) for c in self.checks.values())


def representative_samples(split: Split, n: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """``n`` training inputs drawn at random (uniformly over the split) for int8 calibration."""
    xs = np.stack([x for x, _ in split.dataset.as_numpy_iterator()]) if len(split) else np.zeros((0,))
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(xs), size=min(n, len(xs)), replace=False)
    return xs[np.sort(pick)].astype(np.float32)


def _holdout_arrays(split: Split) -> npt.NDArray[np.float32]:
    return np.stack([x for x, _ in split.dataset.as_numpy_iterator()]).astype(np.float32)


def _tflite_predict(path: Path, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    from medclf_node.inference.runtime import LiteRTRuntime

    return LiteRTRuntime(path, threads=2).predict(x).reshape(-1)


def _qat(cfg: TrainConfig, model: keras.Model, train: Split | None) -> keras.Model:
    from training.export.qat import fine_tune, qat_model

    if train is None:
        raise ExportError("qat_int8 needs the training split for fine-tuning")
    try:
        q = qat_model(model)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    steps = max(1, len(train) // cfg.fit.batch_size)
    fine_tune(q, batched(train, cfg.fit.batch_size, shuffle=cfg.data.shuffle_buffer, seed=cfg.fit.seed),
              cfg.export.qat_epochs, steps, cfg.fit.learning_rate * cfg.fit.min_lr_ratio * 10,
              class_weights(train.labels) if cfg.fit.class_weights else None)
    return q


def export_model(
    cfg: TrainConfig,
    model: keras.Model,
    model_dir: Path,
    *,
    holdout: Split,
    train: Split | None,
    threshold: float,
    metrics: dict[str, float] | None = None,
    modes: tuple[str, ...] | None = None,
    default: str | None = None,
) -> ExportResult:
    """Write every artifact of ``modes`` (default: the config's), check them, write the manifest."""
    exp = cfg.export
    modes = modes or tuple(exp.modes)
    default = default or exp.default
    unknown = [m for m in modes if m not in ARTIFACT_NAMES]
    if unknown:
        raise ExportError(f"unknown export mode(s) {unknown}; choose from {list(ARTIFACT_NAMES)}")
    if default not in modes:
        raise ExportError(f"default artifact mode {default!r} is not among the exported modes {list(modes)}")
    tfl = supported_tflite_modes(model)
    bad = [m for m in modes if m != "saved_model" and m.removeprefix("qat_") not in tfl]
    if bad:
        raise ExportError(f"mode(s) {bad} not supported for this model; supported: saved_model, {list(tfl)}")
    model_dir.mkdir(parents=True, exist_ok=True)
    x_hold = _holdout_arrays(holdout)
    keras_p = np.asarray(model.predict(x_hold, verbose=0), np.float32).reshape(-1)
    fp32_auc = split_auc(cfg, holdout, keras_p)
    n_par = min(exp.parity_samples, len(x_hold))
    rep = representative_samples(train, exp.representative_samples, cfg.fit.seed) if train is not None else None
    artifacts: list[Artifact] = []
    checks: dict[str, dict[str, Any]] = {}
    for mode in modes:
        name = ARTIFACT_NAMES[mode]
        path = model_dir / name
        if mode == "saved_model":
            export_saved_model(model, path)
            artifacts.append(Artifact(path=name, format="saved_model", precision="fp32", sha256=sha256_path(path)))
            continue
        ref_model, ref_p = model, keras_p
        if mode == "qat_int8":
            ref_model = _qat(cfg, model, train)
            ref_p = np.asarray(ref_model.predict(x_hold, verbose=0), np.float32).reshape(-1)
        tfl_mode = "int8" if mode == "qat_int8" else mode
        if tfl_mode == "int8" and rep is None:
            raise ExportError("int8 export needs the training split for representative samples")
        path.write_bytes(convert(ref_model, tfl_mode, rep))
        tfl_p = _tflite_predict(path, x_hold)
        auc = split_auc(cfg, holdout, tfl_p)
        par = parity_check(mode, tfl_p, ref_p, n_par)
        checks[mode] = {**par, "holdout_auc": auc, "auc_delta_vs_fp32_keras": auc - fp32_auc,
                        "size_bytes": path.stat().st_size}
        if not par["ok"]:
            log.warning("%s: TFLite differs from Keras beyond tolerance: %s", name,
                        {k: v for k, v in par.items() if k.endswith("diff_vs_keras")})
        artifacts.append(Artifact(path=name, format="tflite", precision=_PRECISION[mode], sha256=sha256_path(path),
                                  input_dtype="int8" if tfl_mode == "int8" else "float32"))
    all_metrics = {"holdout_auc_fp32_keras": fp32_auc, **(metrics or {})}
    for mode, c in checks.items():
        all_metrics[f"holdout_auc_{mode}"] = float(c["holdout_auc"])
        if mode in ("int8", "qat_int8"):
            all_metrics[f"{mode}_auc_delta_vs_fp32"] = float(c["auc_delta_vs_fp32_keras"])
    manifest = build_manifest(cfg, artifacts, ARTIFACT_NAMES[default], threshold, all_metrics)
    write_manifest(manifest, model_dir)
    (model_dir / "export_checks.json").write_text(json.dumps(checks, indent=2), encoding="utf-8")
    result = ExportResult(model_dir, manifest, checks)
    log.info("exported %s to %s: %s; checks %s", cfg.name, model_dir, [a.path for a in artifacts],
             "ok" if result.ok else "FAILED")
    return result


def build_manifest(
    cfg: TrainConfig, artifacts: list[Artifact], default_path: str, threshold: float, metrics: dict[str, float]
) -> Manifest:
    """The node's manifest for an export of ``cfg`` (through the one builder, training.export.manifest_builder)."""
    from training.export.manifest_builder import build_manifest as build

    spec = cfg.preprocess
    return build(
        name=cfg.name,
        version=cfg.version,
        description=f"{cfg.model.family} {spec.mode} classifier of {cfg.export.finding.meaning}",
        labels=Labels(finding=cfg.export.finding),
        preprocessing=spec,
        artifacts=artifacts,
        default_artifact=default_path,
        threshold=threshold,
        metrics=metrics,
        aggregation=None if spec.mode == "3d" else cfg.evaluate.aggregation,
        provenance=Provenance(dataset=cfg.export.dataset_description, seed=cfg.fit.seed,
                              command=shlex.join(sys.argv)),
    )
