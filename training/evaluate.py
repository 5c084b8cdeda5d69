"""Evaluation: AUC with bootstrap CI, operating point chosen on validation, calibration, plots, report.

numpy/scipy only (no scikit-learn in the environment); matplotlib with the Agg backend for PNGs.
Series-level scores are built from slice scores exactly as the node does (manifest ``aggregation``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata

from medclf_node.inference.manifest import Aggregation
from medclf_node.inference.predict import aggregate

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]


def _xy(y_true: npt.ArrayLike, y_score: npt.ArrayLike) -> tuple[npt.NDArray[np.int64], F64]:
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    s = np.asarray(y_score, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    return y, s


def roc_auc(y_true: npt.ArrayLike, y_score: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN with one class only."""
    y, s = _xy(y_true, y_score)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true: npt.ArrayLike, y_score: npt.ArrayLike) -> tuple[F64, F64, F64]:
    """(fpr, tpr, thresholds), thresholds descending; predicted positive means score >= threshold."""
    y, s = _xy(y_true, y_score)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last].astype(np.float64)
    fps = (last + 1 - tps).astype(np.float64)
    tpr = np.r_[0.0, tps / max(1.0, float(y.sum()))]
    fpr = np.r_[0.0, fps / max(1.0, float(len(y) - y.sum()))]
    return fpr, tpr, np.r_[np.inf, s[last]]


def pr_curve(y_true: npt.ArrayLike, y_score: npt.ArrayLike) -> tuple[F64, F64, float]:
    """(recall, precision, average precision)."""
    y, s = _xy(y_true, y_score)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[last].astype(np.float64)
    predicted = (last + 1).astype(np.float64)
    recall = tps / max(1.0, float(y.sum()))
    precision = tps / predicted
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return np.r_[0.0, recall], np.r_[1.0, precision], ap


def bootstrap_auc_ci(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUC (resamples with a single class are skipped)."""
    y, s = _xy(y_true, y_score)
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        a = roc_auc(y[idx], s[idx])
        if not np.isnan(a):
            aucs.append(a)
    if not aucs:
        return float("nan"), float("nan")
    lo, hi = np.quantile(aucs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def choose_threshold(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike, rule: str = "youden", target_sensitivity: float = 0.9
) -> float:
    """Operating point on VALIDATION scores: max Youden J, or the highest threshold reaching a sensitivity."""
    fpr, tpr, thr = roc_curve(y_true, y_score)
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # drop the +inf point
    if rule == "youden":
        i = int(np.argmax(tpr - fpr))
    elif rule == "sensitivity":
        ok = np.nonzero(tpr >= target_sensitivity)[0]
        i = int(ok[0]) if len(ok) else len(thr) - 1
    else:
        raise ValueError(f"unknown threshold rule {rule!r}")
    return float(np.clip(thr[i], 0.0, 1.0))


@dataclass(frozen=True)
class Confusion:
    """Counts and rates at one threshold (positive means score >= threshold)."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def sensitivity(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def specificity(self) -> float:
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "sensitivity": self.sensitivity, "specificity": self.specificity}


def confusion(y_true: npt.ArrayLike, y_score: npt.ArrayLike, threshold: float) -> Confusion:
    y, s = _xy(y_true, y_score)
    pred = s >= threshold
    return Confusion(
        threshold=float(threshold),
        tp=int(np.sum(pred & (y == 1))),
        fp=int(np.sum(pred & (y == 0))),
        tn=int(np.sum(~pred & (y == 0))),
        fn=int(np.sum(~pred & (y == 1))),
    )


def calibration(y_true: npt.ArrayLike, y_score: npt.ArrayLike, bins: int = 10) -> dict[str, Any]:
    """Reliability curve on equal-width bins, Brier score and expected calibration error."""
    y, s = _xy(y_true, y_score)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(s, edges[1:-1]), 0, bins - 1)
    curve = []
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            conf, frac = float(s[m].mean()), float(y[m].mean())
            curve.append({"bin_low": float(edges[b]), "bin_high": float(edges[b + 1]), "mean_predicted": conf,
                          "fraction_positive": frac, "count": int(m.sum())})
            ece += m.mean() * abs(conf - frac)
    return {"brier": float(np.mean((s - y) ** 2)), "ece": float(ece), "reliability": curve}


def aggregate_series(
    series_ids: npt.ArrayLike, scores: npt.ArrayLike, labels: npt.ArrayLike, agg: Aggregation
) -> tuple[npt.NDArray[np.str_], F64, npt.NDArray[np.int64]]:
    """Slice scores -> one score per series as the node does: max, or mean of the top-k slices.

    A series is positive when any of its slices is.  Returns (ids, scores, labels) sorted by id.
    """
    ids = np.asarray(series_ids).astype(str).reshape(-1)
    y, s = _xy(labels, scores)
    uniq, inverse = np.unique(ids, return_inverse=True)
    out_s = np.empty(len(uniq))
    out_y = np.empty(len(uniq), dtype=np.int64)
    for i in range(len(uniq)):
        m = inverse == i
        out_s[i] = series_score(s[m], agg)
        out_y[i] = int(y[m].max())
    return uniq, out_s, out_y


def series_score(slice_scores: npt.ArrayLike, agg: Aggregation) -> float:
    """One series' score from its slice scores: the node's own aggregation (max, or mean of the k highest)."""
    return aggregate(np.asarray(slice_scores, dtype=np.float32).reshape(-1), agg)[0]


def binary_report(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike, threshold: float, *, n_boot: int = 1000, bins: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric for one set of scores at a threshold fixed beforehand."""
    y, s = _xy(y_true, y_score)
    lo, hi = bootstrap_auc_ci(y, s, n_boot, seed)
    _, _, ap = pr_curve(y, s)
    return {
        "n": len(y),
        "n_positive": int(y.sum()),
        "auc": roc_auc(y, s),
        "auc_ci95": [lo, hi],
        "average_precision": ap,
        "confusion": confusion(y, s, threshold).as_dict(),
        "calibration": calibration(y, s, bins),
    }


def plot_curves(y_true: npt.ArrayLike, y_score: npt.ArrayLike, out_dir: Path, prefix: str) -> list[Path]:
    """ROC, PR and reliability PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fpr, tpr, _ = roc_curve(y_true, y_score)
    rec, prec, ap = pr_curve(y_true, y_score)
    cal = calibration(y_true, y_score)
    paths = []
    for kind in ("roc", "pr", "reliability"):
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        if kind == "roc":
            ax.plot(fpr, tpr, label=f"AUC {roc_auc(y_true, y_score):.3f}")
            ax.plot([0, 1], [0, 1], "k--", lw=0.5)
            ax.set_xlabel("1 - specificity")
            ax.set_ylabel("sensitivity")
        elif kind == "pr":
            ax.step(rec, prec, where="post", label=f"AP {ap:.3f}")
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
        else:
            pts = cal["reliability"]
            ax.plot([p["mean_predicted"] for p in pts], [p["fraction_positive"] for p in pts], "o-",
                    label=f"Brier {cal['brier']:.3f}")
            ax.plot([0, 1], [0, 1], "k--", lw=0.5)
            ax.set_xlabel("mean predicted probability")
            ax.set_ylabel("fraction positive")
        ax.set_title(f"{prefix} {kind}")
        ax.legend(loc="best")
        fig.tight_layout()
        path = out_dir / f"{prefix}_{kind}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def evaluate_scores(
    val: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike],
    test: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike],
    agg: Aggregation | None,
    out_dir: Path,
    *,
    threshold_rule: str = "youden",
    target_sensitivity: float = 0.9,
    n_boot: int = 1000,
    bins: int = 10,
) -> dict[str, Any]:
    """The full evaluation: threshold on validation (series level), metrics + plots on test.

    ``val``/``test`` are (series_ids, labels, scores) per example; with ``agg`` (2D models) the
    examples are slices and are aggregated to series first, exactly as the node does; 3D models pass
    ``agg=None`` and one example per series.  Writes ``report.json`` and PNGs into ``out_dir``.
    """
    def _series(part: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike]) -> tuple[Any, F64, Any]:
        ids, y, s = part
        if agg is None:
            yy, ss = _xy(y, s)
            return np.asarray(ids).astype(str), ss, yy
        return aggregate_series(ids, s, y, agg)

    _, vs, vy = _series(val)
    _, ts, ty = _series(test)
    threshold = choose_threshold(vy, vs, threshold_rule, target_sensitivity)
    report: dict[str, Any] = {
        "threshold": threshold,
        "threshold_rule": threshold_rule,
        "aggregation": agg.model_dump() if agg is not None else None,
        "validation_series": binary_report(vy, vs, threshold, n_boot=n_boot, bins=bins),
        "test_series": binary_report(ty, ts, threshold, n_boot=n_boot, bins=bins),
    }
    if agg is not None:
        report["test_slices"] = binary_report(test[1], test[2], threshold, n_boot=n_boot, bins=bins)
    report["plots"] = [p.name for p in plot_curves(ty, ts, out_dir, "test_series")]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=json_default), encoding="utf-8")
    t = report["test_series"]
    log.info("test series AUC %.4f (95%% CI %.4f-%.4f) sens %.3f spec %.3f at threshold %.4f",
             t["auc"], *t["auc_ci95"], t["confusion"]["sensitivity"], t["confusion"]["specificity"], threshold)
    return report


def json_default(o: object) -> object:
    """``json.dumps(default=...)`` for reports: numpy scalars and arrays, paths."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
