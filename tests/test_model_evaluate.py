"""Evaluation metrics against brute force, the validation-chosen threshold, the node's aggregation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medclf_node.inference.manifest import Aggregation
from medclf_node.inference.predict import aggregate
from training.evaluate import (
    MIN_CASES,
    aggregate_series,
    binary_report,
    bootstrap_auc_ci,
    calibration,
    choose_threshold,
    confusion,
    curve_title,
    cv_summary,
    evaluate_scores,
    plot_curves,
    pr_curve,
    pr_step_path,
    roc_auc,
    roc_curve,
)


def _pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = np.round(y * 0.4 + rng.random(300), 1)  # rounding makes many ties
    assert roc_auc(y, s) == pytest.approx(_pairwise_auc(y, s))
    fpr, tpr, _ = roc_curve(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, s))
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_bootstrap_ci_contains_auc_and_narrows_with_n() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    s = y * 0.6 + rng.random(400)
    lo, hi = bootstrap_auc_ci(y, s, n_boot=300, seed=1)
    assert lo < roc_auc(y, s) < hi
    lo_small, hi_small = bootstrap_auc_ci(y[:40], s[:40], n_boot=300, seed=1)
    assert hi_small - lo_small > hi - lo


def test_threshold_rules_and_confusion() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    t = choose_threshold(y, s, "youden")
    c = confusion(y, s, t)
    assert (c.sensitivity - (1 - c.specificity)) == pytest.approx(0.75)  # best J on this data
    t90 = choose_threshold(y, s, "sensitivity", target_sensitivity=1.0)
    assert t90 == pytest.approx(0.4) and confusion(y, s, t90).sensitivity == 1.0
    assert c.tp + c.fp + c.tn + c.fn == 8


def test_pr_and_calibration() -> None:
    y = np.array([0, 1, 0, 1])
    s = np.array([0.0, 1.0, 0.0, 1.0])
    _, _, ap = pr_curve(y, s)
    assert ap == pytest.approx(1.0)
    cal = calibration(y, s, bins=4)
    assert cal["brier"] == 0.0 and cal["ece"] == 0.0
    assert calibration(y, np.full(4, 0.5))["brier"] == pytest.approx(0.25)


def test_series_aggregation_is_the_nodes() -> None:
    rng = np.random.default_rng(5)
    ids = np.repeat(["a", "b", "c"], 7)
    scores = rng.random(21).astype(np.float32)
    labels = np.zeros(21, int)
    labels[9] = 1  # one positive slice makes series "b" positive
    for agg in (Aggregation(method="max"), Aggregation(method="topk_mean", k=3)):
        uniq, s, y = aggregate_series(ids, scores, labels, agg)
        assert list(uniq) == ["a", "b", "c"] and list(y) == [0, 1, 0]
        for i, sid in enumerate(uniq):
            assert s[i] == aggregate(scores[ids == sid], agg)[0]


def test_evaluate_scores_picks_threshold_on_validation_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n = 40
    ids = np.repeat(np.arange(n).astype(str), 5)
    y_series = np.arange(n) % 2
    labels = np.repeat(y_series, 5)
    val_scores = (labels * 0.3 + rng.random(n * 5) * 0.7).astype(np.float32)
    test_scores = np.clip(val_scores + 0.2, 0, 1)  # a shifted test set must not move the threshold
    agg = Aggregation(method="topk_mean", k=2)
    rep = evaluate_scores((ids, labels, val_scores), (ids, labels, test_scores), agg, tmp_path, n_boot=50)
    _, vs, vy = aggregate_series(ids, val_scores, labels, agg)
    assert rep["threshold"] == pytest.approx(choose_threshold(vy, vs))
    t = rep["test_series"]
    assert t["n"] == n and t["auc_ci95"][0] <= t["auc"] <= t["auc_ci95"][1]
    assert rep["test_slices"]["n"] == n * 5
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["threshold"] == rep["threshold"]
    for split in ("validation", "test"):  # plots for both splits
        for kind in ("roc", "pr", "reliability"):
            png = tmp_path / f"{split}_series_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert png.name in rep["plots"]
    assert rep["warnings"] == [] and saved["warnings"] == []  # 40 series each: no small-set warning


def _average_precision_bruteforce(y: np.ndarray, s: np.ndarray) -> float:
    """AP = sum over distinct thresholds of (recall step) x precision at that threshold."""
    ap, prev_r = 0.0, 0.0
    for t in np.unique(s)[::-1]:
        pred = s >= t
        r = (pred & (y == 1)).sum() / y.sum()
        ap += (r - prev_r) * (pred & (y == 1)).sum() / pred.sum()
        prev_r = r
    return float(ap)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pr_curve_as_drawn_has_the_ap_as_its_area(seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plotted PR path (steps-pre) encloses exactly the AP printed beside it (the old
    where='post' drawing did not)."""
    import matplotlib.figure

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    s = np.round(y * 0.3 + rng.random(60), 1)  # ties
    rec, prec, ap = pr_curve(y, s)
    assert ap == pytest.approx(_average_precision_bruteforce(y, s))
    xs, ys = pr_step_path(rec, prec)
    assert np.trapezoid(ys, xs) == pytest.approx(ap, abs=1e-12)
    post_area = float(np.sum(np.diff(rec) * prec[:-1]))  # what where="post" drew
    assert abs(post_area - ap) > 1e-3

    drawn: dict[str, object] = {}
    orig = matplotlib.figure.Figure.savefig

    def capture(self: matplotlib.figure.Figure, fname: object, *a: object, **k: object) -> None:
        drawn[str(fname)] = [(ln.get_xydata().copy(), ln.get_label()) for ln in self.axes[0].lines]
        drawn[str(fname) + ":title"] = self.axes[0].get_title()
        orig(self, fname, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    paths = plot_curves(y, s, tmp_path, "test_series", model="m1", split="test", threshold=0.7)
    pr_png = str(next(p for p in paths if p.name.endswith("_pr.png")))
    curve, label = drawn[pr_png][0]  # type: ignore[index]
    assert np.trapezoid(curve[:, 1], curve[:, 0]) == pytest.approx(ap, abs=1e-12)
    assert f"AP {ap:.3f}" in label
    # operating point marked on ROC and PR, titles with model, split and n
    c = confusion(y, s, 0.7)
    op_pr = drawn[pr_png][1][0]  # type: ignore[index]
    assert op_pr[0] == pytest.approx([c.sensitivity, c.tp / (c.tp + c.fp)])
    roc_png = str(next(p for p in paths if p.name.endswith("_roc.png")))
    assert drawn[roc_png][2][0][0] == pytest.approx([1 - c.specificity, c.sensitivity])  # type: ignore[index]
    for p in paths:
        title = drawn[str(p) + ":title"]
        assert "m1 - test" in title and f"n=60 ({int(y.sum())} positive)" in title  # type: ignore[operator]


def test_curve_title_names_model_split_and_n() -> None:
    assert curve_title("pr", [0, 1, 1], model="nodule-x", split="validation") == \
        "nodule-x - validation PR\nn=3 (2 positive)"


def test_small_sets_warn_in_log_and_json(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(1)
    y = np.arange(12) % 2
    s = y * 0.5 + rng.random(12)
    with caplog.at_level("WARNING", logger="training.evaluate"):
        rep = binary_report(y, s, 0.5, n_boot=20, name="tiny test set")
    assert rep["warnings"] and "tiny test set: only 12 case(s) (< 30)" in rep["warnings"][0]
    assert "only 12 case(s)" in caplog.text
    assert binary_report(np.arange(MIN_CASES) % 2, np.arange(MIN_CASES) / MIN_CASES, 0.5, n_boot=5)["warnings"] == []
    ids = np.arange(12).astype(str)
    out = evaluate_scores((ids, y, s), (ids, y, s), None, tmp_path, n_boot=20)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert len(saved["warnings"]) == 2 and saved["warnings"] == out["warnings"]
    assert "validation set" in saved["warnings"][0] and "test set" in saved["warnings"][1]


def test_cv_summary_gives_every_fold_a_ci_and_flags_small_folds(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(2)
    folds = []
    for n in (40, 8, 36):
        y = np.arange(n) % 2
        folds.append((y, y * 0.3 + rng.random(n)))
    with caplog.at_level("WARNING", logger="training.evaluate"):
        cv = cv_summary(folds, n_boot=200, seed=3)
    assert [f["n"] for f in cv["folds"]] == [40, 8, 36]
    for f, (y, s) in zip(cv["folds"], folds, strict=True):
        assert f["auc"] == pytest.approx(roc_auc(y, s))
        lo, hi = f["auc_ci95"]
        assert lo <= f["auc"] <= hi
    small = cv["folds"][1]["auc_ci95"]
    big = cv["folds"][0]["auc_ci95"]
    assert small[1] - small[0] > big[1] - big[0]  # 8 cases: a wider interval
    assert len(cv["warnings"]) == 1 and "CV fold 1: only 8 case(s)" in cv["warnings"][0]
    assert "CV fold 1" in caplog.text
    aucs = [f["auc"] for f in cv["folds"]]
    assert cv["auc_mean"] == pytest.approx(np.mean(aucs)) and cv["auc_sd"] == pytest.approx(np.std(aucs, ddof=1))
    assert cv["pooled"]["n"] == 84
