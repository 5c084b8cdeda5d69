"""The evidence and card stages shared by the CT nodule recipes (2.5D and 3D).

``evidence`` re-scores a built model directory's artifacts (no training; see
:mod:`training.recipes.evidence`) and rewrites ``evaluation.json`` (key ``evidence``), the manifest's
threshold and metrics (through the one manifest builder) and ``MODEL_CARD.md``.  ``card`` alone
re-renders the card from ``evaluation.json``.  Both only need the model directory, which is why
``--evidence-only`` and ``--card-only`` run them on shipped models.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medclf_node.inference.manifest import Manifest, load_manifest, write_manifest
from training.export.manifest_builder import update_manifest
from training.recipes.recipe_output import REPORT_FILE, write_evaluation

log = logging.getLogger(__name__)

CardRenderer = Callable[[dict[str, Any], Manifest], str]

#: Evidence-stage sizes (training.recipes.evidence): series in the locked set / each shift set.
EVIDENCE_FULL: dict[str, Any] = {"n_locked": 60, "n_shift": 40, "n_boot": 2000, "split_limit": None}
EVIDENCE_TINY: dict[str, Any] = {"n_locked": 4, "n_shift": 2, "n_boot": 50, "split_limit": 4}


def rerender_card(model_dir: Path, report: dict[str, Any], render: CardRenderer) -> None:
    """evaluation.json + MODEL_CARD.md from ``report`` (the card only renders what the report holds)."""
    write_evaluation(model_dir, report, render(report, load_manifest(model_dir)))


def card_from_disk(model_dir: Path, render: CardRenderer) -> None:
    """Re-render MODEL_CARD.md from the evaluation.json already in ``model_dir``."""
    rerender_card(model_dir, json.loads((model_dir / REPORT_FILE).read_text(encoding="utf-8")), render)


def run_evidence_stage(model_dir: Path, *, served: str, reference: str, render: CardRenderer, tiny: bool = False,
                       threads: int = 2, command: str = "", baseline_cache: Path | None = None,
                       sizes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score validation, the earlier test split, the locked range and the shift sets with ``served`` and
    ``reference``; write the evidence into evaluation.json, the manifest and the card; return the report."""
    from training.recipes.evidence import run_evidence

    report = json.loads((model_dir / REPORT_FILE).read_text(encoding="utf-8"))
    manifest = load_manifest(model_dir)
    sz = dict(sizes or (EVIDENCE_TINY if tiny else EVIDENCE_FULL))
    ev = run_evidence(model_dir, report, served=served, reference=reference, threads=threads,
                      plots_dir=model_dir / "plots", model_name=manifest.name, baseline_cache=baseline_cache, **sz)
    ev["recipe_threshold_reproduced"] = abs(ev["thresholds"][served] - float(report["threshold"])) < 1e-6
    ev["command"] = command
    report["evidence"] = ev
    report["threshold"] = ev["thresholds"][served]
    metrics = dict(manifest.metrics)
    locked = ev["sets"]["locked"]["artifacts"][served]
    metrics.update({
        "locked_test_series_auc": float(locked["auc"]),
        "locked_test_series_auc_ci95_low": float(locked["auc_ci95"][0]),
        "locked_test_series_auc_ci95_high": float(locked["auc_ci95"][1]),
        "locked_test_sensitivity": float(locked["confusion"]["sensitivity"]),
        "locked_test_specificity": float(locked["confusion"]["specificity"]),
        "series_probability_shift_max": float(ev["artifact_shift"]["series"]["max"]),
        "series_probability_shift_mean": float(ev["artifact_shift"]["series"]["mean"]),
    })
    for name, r in ev["sets"].items():
        if name not in ("validation", "earlier_test", "locked"):
            metrics[f"shift_{name}_auc"] = float(r["artifacts"][served]["auc"])
    manifest = update_manifest(manifest, metrics={k: v for k, v in metrics.items() if np.isfinite(v)},
                               threshold=float(ev["thresholds"][served]))
    write_manifest(manifest, model_dir)
    rerender_card(model_dir, report, render)
    return report


__all__ = ["EVIDENCE_FULL", "EVIDENCE_TINY", "card_from_disk", "rerender_card", "run_evidence_stage"]
