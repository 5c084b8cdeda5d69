"""Evaluation metrics against brute force, the validation-chosen threshold, the node's aggregation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medclf_node.inference.manifest import Aggregation
from medclf_node.inference.predict import aggregate
from training.evaluate import (
    aggregate_series,
    bootstrap_auc_ci,
    calibration,
    choose_threshold,
    confusion,
    evaluate_scores,
    pr_curve,
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
    for kind in ("roc", "pr", "reliability"):
        png = tmp_path / f"test_series_{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
