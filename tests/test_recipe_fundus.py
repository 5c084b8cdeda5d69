"""The fundus recipes (training.recipes.fundus_recipes) with --tiny: the same stages and code path on 40 images.

Each must produce a schema 2 model directory the node loads and serves through its image path with
the recipe's own probabilities, a card with the run's figures, and resume without retraining.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medclf_node.inference.manifest import load_manifest, verify_artifacts

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "training.recipes.fundus_recipes", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


@pytest.mark.slow
def test_tiny_dr_recipe_builds_an_ordinal_image_model_and_resumes(tmp_path: Path) -> None:
    out, work = tmp_path / "models", tmp_path / "work"
    proc = _run("--recipe", "dr-grade", "--tiny", "--out", str(out), "--work-dir", str(work))
    assert proc.returncode == 0, proc.stderr[-4000:]
    d = out / "dr-grade-int8"
    man = load_manifest(d)
    verify_artifacts(man, d)
    assert man.schema_version == 2 and man.task == "multiclass" and man.ordinal and man.input.kind == "image"
    assert [c.code.value for c in man.classes][0] == "260413007" and man.positive_class_indices() == (2, 3, 4)
    from training.export.manifest_builder import package_version

    assert man.training_package_version == package_version()
    report = json.loads((d / "evaluation.json").read_text(encoding="utf-8"))
    t = report["evaluation"]["model_int8.tflite"]["test"]
    assert {"qwk", "qwk_ci95", "per_class", "confusion", "referable_auc", "referable_auc_ci95"} <= set(t)
    assert len(report["evaluation"]["parity_int8_vs_fp32"]["test"]["per_output"]) == 5
    assert report["node_parity"]["max_abs_diff"] <= 1e-5 and report["node_parity"]["dicom_images"] == 3
    card = (d / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert f"{t['qwk']:.3f} (95% CI" in card and "--tiny" in card and "synthetic" in card
    assert all((d / p).exists() for p in report["evaluation"]["plots"])
    # resume: every recorded stage is skipped (train would take the same again)
    again = _run("--recipe", "dr-grade", "--tiny", "--out", str(out), "--work-dir", str(work), "--resume")
    assert again.returncode == 0, again.stderr[-4000:]
    ran = re.findall(r": stage (\w+)$", again.stderr, re.MULTILINE)
    assert ran == [] and "stage train already done" in again.stderr


@pytest.mark.slow
def test_tiny_findings_recipe_builds_a_multilabel_model(tmp_path: Path) -> None:
    out = tmp_path / "models"
    proc = _run("--recipe", "fundus-findings", "--tiny", "--out", str(out), "--work-dir", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    d = out / "fundus-findings"
    man = load_manifest(d)
    assert man.task == "multilabel" and [f.code.meaning for f in man.findings] == ["Hemorrhage", "Retinal exudate"]
    report = json.loads((d / "evaluation.json").read_text(encoding="utf-8"))
    thr = report["evaluation"]["thresholds"]
    assert [f.threshold for f in man.findings] == pytest.approx(thr)  # per-finding thresholds from validation
    assert report["node_parity"]["max_abs_diff"] <= 1e-5
