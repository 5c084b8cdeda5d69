"""The shipped-model recipe, run with --tiny: same command and code path, tiny data, one epoch.

It must produce a model directory the node loads (manifest, sha256s, LiteRT runtime) and a card
whose figures are the run's own; the full recipe (minutes) is what produced models/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medclf_node.inference.manifest import load_manifest, verify_artifacts
from medclf_node.inference.registry import load_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_tiny_recipe_builds_a_loadable_model(tmp_path: Path) -> None:
    out, work = tmp_path / "models", tmp_path / "work"
    cmd = [sys.executable, "-m", "training.recipes.default_models", "--tiny", "--out", str(out),
           "--work-dir", str(work)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, check=False,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-4000:]

    model_dir = out / "nodule-2p5d-int8"
    man = load_manifest(model_dir)
    verify_artifacts(man, model_dir)
    assert man.default_artifact.endswith(".tflite") and man.artifact().precision == "int8"
    assert {a.precision for a in man.artifacts} == {"int8", "fp32"}
    assert man.preprocessing.mode == "2.5d" and man.aggregation is not None
    assert 0.0 <= man.threshold <= 1.0

    report = json.loads((model_dir / "evaluation.json").read_text(encoding="utf-8"))
    assert report["recipe_size"] == "tiny"
    assert report["node_parity"]["max_abs_diff"] <= 1e-5
    assert report["splits"]["train"]["first_seed"] != report["splits"]["test"]["first_seed"]
    card = (model_dir / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "--tiny" in card and "NOT for clinical use" in card
    assert f"{report['int8']['test_series']['auc']:.4f}" in card
    # the evidence stage ran on the fresh model: locked range, shift sets, baselines, per-artifact thresholds
    ev = report["evidence"]
    assert {"validation", "earlier_test", "locked", "small_nodules", "thin_slices", "prone", "feet_first",
            "high_noise", "geometry"} <= set(ev["sets"])
    assert set(ev["thresholds"]) == {"model_int8.tflite", "model_fp32.tflite"}
    assert man.threshold == ev["thresholds"]["model_int8.tflite"] == report["threshold"]
    assert "### Shift report" in card and "### Trivial baselines" in card and "Fewer than 30 cases" in card
    assert ev["sets"]["locked"]["warnings"]  # 4 series: flagged as too few

    loaded = load_model(model_dir, threads=1)
    x = np.zeros((2, *man.input.shape), np.float32)
    y = loaded.runtime.predict(x)
    assert y.shape == (2, 1) and np.all((y >= 0) & (y <= 1))
