"""The shipped 2D image model models/dr-grade-int8: schema 2 manifest, honest card, served on LiteRT alone.

Its card must carry the recipe's kappa with its CI (from evaluation.json), state synthetic-only
evidence, and the default int8 artifact must grade synthetic photographs (never seen in training)
sensibly through the node's own image path in a process that never imports TensorFlow.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medclf_node.config import DEFAULT_MODELS_DIR
from medclf_node.inference.manifest import load_manifest, verify_artifacts

DR_DIR = DEFAULT_MODELS_DIR / "dr-grade-int8"
pytestmark = pytest.mark.skipif(not (DR_DIR / "manifest.json").exists(), reason="dr-grade-int8 not shipped")


def test_manifest_is_schema_2_ordinal_image_model() -> None:
    man = load_manifest(DR_DIR)
    verify_artifacts(man, DR_DIR)
    assert man.schema_version == 2 and man.task == "multiclass" and man.ordinal
    assert man.input.kind == "image" and man.preprocessing.mode == "image" and man.preprocessing.color == "rgb"
    assert len(man.classes) == 5 and man.positive_class_indices() == (2, 3, 4)
    assert man.artifact().precision == "int8" and man.artifact().format == "tflite"
    for a in man.artifacts:
        assert (DR_DIR / a.path).stat().st_size < 5 * 1024 * 1024


def test_card_reports_kappa_with_ci_and_synthetic_only_evidence() -> None:
    man = load_manifest(DR_DIR)
    report = json.loads((DR_DIR / "evaluation.json").read_text(encoding="utf-8"))
    card = (DR_DIR / "MODEL_CARD.md").read_text(encoding="utf-8")
    t = report["evaluation"]["model_int8.tflite"]["test"]
    assert f"**{t['qwk']:.3f} (95% CI {t['qwk_ci95'][0]:.3f} to {t['qwk_ci95'][1]:.3f})**" in card
    assert f"{t['referable_auc']:.3f} (95% CI" in card
    assert "NOT for clinical use" in card and "only on synthetic fundus photographs" in card
    assert report["command"] in card
    assert man.metrics["test_qwk"] == pytest.approx(t["qwk"])
    assert report["node_parity"]["max_abs_diff"] <= 1e-5
    par = report["evaluation"]["parity_int8_vs_fp32"]["test"]
    assert len(par["per_output"]) == 5 and par["grade_agreement"] >= 0.8
    for p in report["evaluation"]["plots"]:
        assert (DR_DIR / p).read_bytes()[:4] == b"\x89PNG"


_SERVE = r"""
import json, sys
from pathlib import Path
import numpy as np
from medclf_node.domain import Image2D, SliceRef
from medclf_node.inference.registry import load_model
from medclf_node.inference.predict_image import predict_images
from medclf_node.synthetic.fundus import make_fundus
model = load_model(Path(sys.argv[1]), threads=1)
out = []
for seed in range(1_400_000, 1_400_030):  # outside the recipe's seed ranges
    f = make_fundus(seed, size=512, target_grade=seed % 5)
    ref = SliceRef("1.2.840.10008.5.1.4.1.1.77.1.5.1", f"2.25.{seed}")
    img = Image2D(f.image.astype(np.float32) / 255.0, ref, "RGB", None)
    r = predict_images(model, [img], heatmap=False)
    out.append([f.grade, r.images[0].predicted])
print(json.dumps({"pairs": out, "tf": any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)}))
"""


def test_serves_without_tensorflow_and_grades_unseen_photographs() -> None:
    from training.evaluate_multiclass import quadratic_weighted_kappa

    proc = subprocess.run([sys.executable, "-c", _SERVE, str(DR_DIR)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["tf"] is False
    truth, pred = zip(*res["pairs"], strict=True)
    # 512-pixel photographs (twice the training size, box-averaged by the node): far better than chance
    assert quadratic_weighted_kappa(truth, pred, 5) > 0.5


FINDINGS_DIR = DEFAULT_MODELS_DIR / "fundus-findings"


@pytest.mark.skipif(not (FINDINGS_DIR / "manifest.json").exists(), reason="fundus-findings not shipped")
def test_findings_model_is_multilabel_with_thresholds_from_validation() -> None:
    man = load_manifest(FINDINGS_DIR)
    verify_artifacts(man, FINDINGS_DIR)
    assert man.schema_version == 2 and man.task == "multilabel" and man.input.kind == "image"
    report = json.loads((FINDINGS_DIR / "evaluation.json").read_text(encoding="utf-8"))
    assert [f.threshold for f in man.findings] == pytest.approx(report["evaluation"]["thresholds"])
    card = (FINDINGS_DIR / "MODEL_CARD.md").read_text(encoding="utf-8")
    for f in man.findings:
        r = report["evaluation"]["model_int8.tflite"]["test"][f.code.meaning]
        assert f"| {f.code.meaning} | {r['positive']}/{r['n']} | {r['auc']:.3f} (95% CI" in card
    assert "NOT for clinical use" in card and "trivially separable" in card
    assert report["node_parity"]["max_abs_diff"] <= 1e-5
