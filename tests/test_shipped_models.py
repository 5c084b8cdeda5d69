"""The models shipped in models/: valid manifests, intact artifacts, honest cards, served without TensorFlow.

The default model must load through the node's own registry in a process that never imports
TensorFlow (the node's slim install), and must score a phantom with nodules above one without.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medclf_node.config import DEFAULT_MODELS_DIR, Config
from medclf_node.inference.manifest import load_manifest, verify_artifacts

MAX_BYTES = 10 * 1024 * 1024
ALL_MODEL_DIRS = sorted(p.parent for p in DEFAULT_MODELS_DIR.glob("*/manifest.json"))
#: CT (volume) models; the 2D image models (fundus) are checked by tests/test_shipped_image_models.py
MODEL_DIRS = [d for d in ALL_MODEL_DIRS if load_manifest(d).input.kind == "volume"]
DEFAULT_NAME = Config().models.default_model


def test_default_model_is_shipped() -> None:
    names = [load_manifest(d).name for d in ALL_MODEL_DIRS]
    assert DEFAULT_NAME in names, f"no model named {DEFAULT_NAME!r} under {DEFAULT_MODELS_DIR} (found {names})"


@pytest.mark.parametrize("model_dir", ALL_MODEL_DIRS, ids=[d.name for d in ALL_MODEL_DIRS])
def test_manifest_valid_and_artifacts_match(model_dir: Path) -> None:
    man = load_manifest(model_dir)
    verify_artifacts(man, model_dir)  # every artifact present with its recorded sha256
    assert man.name == model_dir.name
    for art in man.artifacts:
        target = model_dir / art.path
        size = target.stat().st_size if target.is_file() else sum(p.stat().st_size for p in target.rglob("*"))
        assert size < MAX_BYTES, f"{art.path} is {size} bytes"


@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=[d.name for d in MODEL_DIRS])
def test_model_card_carries_the_recipe_figures(model_dir: Path) -> None:
    man = load_manifest(model_dir)
    card = (model_dir / "MODEL_CARD.md").read_text(encoding="utf-8")
    report = json.loads((model_dir / "evaluation.json").read_text(encoding="utf-8"))
    assert "NOT for clinical use" in card
    assert report["command"] and report["command"] in card
    served = report["int8"] if "int8" in report else report["served"]  # 2.5D: int8; 3D: the fp16 default
    test = served["test_series"]
    assert f"{test['auc']:.4f} ({test['auc_ci95'][0]:.4f}-{test['auc_ci95'][1]:.4f})" in card
    delta_key = "int8_minus_fp32_test_auc" if "int8" in report else "fp16_minus_fp32_test_auc"
    assert f"{report[delta_key]:+.4f}" in card
    assert man.metrics["test_series_auc"] == pytest.approx(test["auc"])
    assert man.threshold == pytest.approx(report["threshold"])
    assert re.search(r"threshold.*chosen on the \*\*validation\*\*", card, re.IGNORECASE)


_SERVE_AND_SCORE = r"""
import json, sys
from medclf_node.config import Config
from medclf_node.inference.registry import ModelRegistry
from medclf_node.inference.predict import predict_series
from training.recipes.series_eval import EvalSeries
from medclf_node.synthetic.phantoms import make_phantom
import numpy as np

if sys.argv[1] == "default":
    cfg = Config()
    reg = ModelRegistry.from_config(cfg)
    model = reg.get(cfg.models.default_model)
else:  # one model directory, loaded with its default artifact
    from pathlib import Path
    from medclf_node.inference.registry import load_model
    model = load_model(Path(sys.argv[1]), threads=1)
out = {"artifact": model.artifact_path, "threshold": model.manifest.threshold, "pairs": []}
for arg in sys.argv[2:]:
    seed, size = map(int, arg.split(":"))
    # 160 px: like the training data; 512 px at 0.7 x 0.7 x 2.5 mm: a real CT matrix, like the demo's
    shape, spacing = ((100, 160, 160), None) if size == 160 else ((96, size, size), (2.5, 0.7, 0.7))
    probs = []
    for n in (2, 0):
        ph = make_phantom(seed, shape=shape, spacing=spacing, nodules=n, radius_range_mm=(6.0, 12.0))
        es = EvalSeries(ph.patient_id, seed, ph.label, np.rint(ph.hu).astype(np.int16), ph.spacing,
                        np.zeros(1, np.uint8), np.zeros(1, bool))
        probs.append(predict_series(model, es.volume(), heatmap=False).probability)
    out["pairs"].append(probs)
out["tensorflow_imported"] = any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
print(json.dumps(out))
"""


def test_default_model_serves_without_tensorflow_and_ranks_nodules() -> None:
    # Seeds 500000+ are outside every recipe split (train 100000+, val 200000+, test 300000+).
    proc = subprocess.run(
        [sys.executable, "-c", _SERVE_AND_SCORE, "default", "500001:160", "500002:160", "500003:512"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["tensorflow_imported"] is False
    assert res["artifact"].endswith(".tflite")
    for with_nodules, without in res["pairs"]:
        assert with_nodules > without, res


@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=[d.name for d in MODEL_DIRS])
def test_every_model_default_artifact_serves_without_tensorflow(model_dir: Path) -> None:
    """Each shipped model's default artifact (int8 2.5D, fp16 3D) runs on LiteRT alone and ranks nodules."""
    man = load_manifest(model_dir)
    default = next(a for a in man.artifacts if a.path == man.default_artifact)
    assert default.format == "tflite", "the default artifact must serve on the slim (LiteRT-only) node"
    proc = subprocess.run(
        [sys.executable, "-c", _SERVE_AND_SCORE, str(model_dir), "500011:160", "500013:512"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["tensorflow_imported"] is False
    assert res["artifact"].endswith(man.default_artifact)
    for with_nodules, without in res["pairs"]:
        assert with_nodules > without, res


SHIFT_SETS = ("small_nodules", "thin_slices", "prone", "feet_first", "high_noise", "geometry")


def _evidence(model_dir: Path) -> tuple[dict, dict, str]:
    report = json.loads((model_dir / "evaluation.json").read_text(encoding="utf-8"))
    card = (model_dir / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "evidence" in report, f"{model_dir.name}: run the recipe's evidence stage (--evidence-only)"
    return report, report["evidence"], card


def _ci(r: dict) -> str:
    return f"{r['auc']:.4f} ({r['auc_ci95'][0]:.4f}-{r['auc_ci95'][1]:.4f})"


@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=[d.name for d in MODEL_DIRS])
def test_card_reports_the_locked_range_the_shift_table_and_baselines(model_dir: Path) -> None:
    from training.recipes.evidence import USED_SEED_RANGES, check_locked_ranges, evidence_sets

    man = load_manifest(model_dir)
    report, ev, card = _evidence(model_dir)
    served, ref = ev["served_artifact"], ev["reference_artifact"]
    assert served == man.default_artifact
    sets = ev["sets"]
    assert {"validation", "earlier_test", "locked", *SHIFT_SETS} <= set(sets)
    # the locked range and every shift set: seeds disjoint from every range used before
    defined = [s for s in evidence_sets(1, 1)]
    check_locked_ranges(defined, report["splits"])
    for name in ("locked", *SHIFT_SETS):
        d = sets[name]["definition"]
        for a, b in [*USED_SEED_RANGES.values()] + [(p["first_seed"], p["first_seed"] + p["count"] - 1)
                                                     for p in report["splits"].values()]:
            assert d["first_seed"] + d["count"] - 1 < a or d["first_seed"] > b, name
    assert "earlier test split" in card and "model selection" in card and "Locked test range" in card
    assert f"**AUC {_ci(sets['locked']['artifacts'][served])}**" in card
    # shift table: n, AUC with CI and sensitivity/specificity per set, both artifacts
    assert "### Shift report" in card
    for name in ("locked", *SHIFT_SETS):
        r = sets[name]
        assert r["n"] >= 30, f"{name}: n={r['n']}"
        a, b = r["artifacts"][served], r["artifacts"][ref]
        row = next(line for line in card.splitlines() if r["title"] in line and line.startswith("|")
                   and _ci(a) in line)
        assert f"| {r['n']} ({r['n_positive']}) |" in row and _ci(b) in row
        assert f"{a['confusion']['sensitivity']:.2f} | {a['confusion']['specificity']:.2f}" in row
        assert a["confusion"]["threshold"] == pytest.approx(ev["thresholds"][served])
        assert b["confusion"]["threshold"] == pytest.approx(ev["thresholds"][ref])
    # baselines on the same series
    assert "### Trivial baselines" in card
    for name in ("earlier_test", "locked", *SHIFT_SETS):
        r = sets[name]
        assert set(r["baselines"]) == set(ev["baseline_definitions"])
        row = next(line for line in card.splitlines() if line.startswith(f"| {r['title']} | {r['n']} |"))
        for b in r["baselines"].values():
            assert _ci(b) in row
    # orientation: the prone / feet-first series went through the node's assemble_volume
    for name in ("prone", "feet_first"):
        o = sets[name]["node_canonical_orientation"]
        assert o["series"] == sets[name]["n"]
    # per-artifact thresholds; the manifest holds the served one
    assert man.threshold == pytest.approx(ev["thresholds"][served])
    for art, t in ev["thresholds"].items():
        assert f"| `{art}`" in card and f"{t:.4f}" in card
    # artifact shift as max / mean of series probabilities, not only an AUC delta
    sh = ev["artifact_shift"]["series"]
    assert f"**{sh['max']:.4f}**, mean **{sh['mean']:.4f}**" in card
    assert man.metrics["series_probability_shift_max"] == pytest.approx(sh["max"])
    assert man.metrics["locked_test_series_auc"] == pytest.approx(sets["locked"]["artifacts"][served]["auc"])
    for p in ev["plots"]:
        assert (model_dir / p).read_bytes()[:4] == b"\x89PNG"
    assert ev["command"] in card


def test_3d_card_says_its_earlier_test_split_chose_the_model() -> None:
    card = (DEFAULT_MODELS_DIR / "nodule-3d-cbam" / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "0.894 -> 0.937 -> 0.962" in card and "model selection" in card


def test_shipped_int8_meets_the_export_parity_tolerance() -> None:
    """The int8 parity rule (training.export.bundle: p99 <= 0.06, mean <= 0.02) holds for the shipped
    int8 artifact against its fp32 sibling: as recorded by the evidence stage, and live on 6 validation phantoms."""
    import numpy as np

    from medclf_node.inference.manifest import OutputSpec
    from medclf_node.inference.runtime import LiteRTRuntime
    from training.export.bundle import INT8_PARITY, TOLERANCE, parity_check
    from training.recipes.default_models import FP32_FILE, FULL, INT8_FILE, SPEC, split_plans
    from training.recipes.phantom_sets import SplitPlan
    from training.recipes.series_eval import build_eval_series, slice_scores

    model_dir = DEFAULT_MODELS_DIR / "nodule-2p5d-int8"
    _, ev, _ = _evidence(model_dir)
    rec = ev["artifact_shift"]["validation_inputs"]
    assert rec["p99"] <= TOLERANCE["int8"] and rec["mean"] <= INT8_PARITY["mean"]
    val = split_plans(FULL)["val"]
    plan = SplitPlan("val", val.first_seed, 6, val.shapes)
    series = build_eval_series(plan, SPEC)
    out = OutputSpec()
    p = {a: np.concatenate([slice_scores(LiteRTRuntime(model_dir / a, threads=1), SPEC, out, s) for s in series])
         for a in (INT8_FILE, FP32_FILE)}
    check = parity_check("int8", p[INT8_FILE], p[FP32_FILE], 32)
    assert check["ok"], check
