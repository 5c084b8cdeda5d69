"""Evaluation: AUC with bootstrap CI, operating point chosen on validation, calibration, plots, report.

numpy/scipy only (no scikit-learn in the environment); matplotlib with the Agg backend for PNGs.
Series-level scores are built from slice scores exactly as the node does (manifest ``aggregation``).

Small sets are flagged: a report of fewer than :data:`MIN_CASES` cases carries a ``warnings``
entry (and the warning is logged), because a bootstrap CI on a handful of series is wide and
itself unstable.  :func:`cv_summary` gives every cross-validation fold its own bootstrap CI.
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

#: Fewer cases than this in a test set or a CV fold: the report says so (logged and in the JSON).
MIN_CASES = 30


def small_set_warning(what: str, n: int, minimum: int = MIN_CASES) -> str | None:
    """A warning sentence (also logged) when ``what`` has fewer than ``minimum`` cases, else None."""
    if n >= minimum:
        return None
    msg = (f"{what}: only {n} case(s) (< {minimum}); its AUC and 95% CI are unreliable, "
           "treat them as indicative only")
    log.warning(msg)
    return msg


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


def pr_step_path(recall: npt.ArrayLike, precision: npt.ArrayLike) -> tuple[F64, F64]:
    """Vertices of the PR curve as a step function whose area is exactly the average precision.

    AP = sum_i (R_i - R_{i-1}) P_i: precision P_i holds over the recall interval (R_{i-1}, R_i]
    (matplotlib's ``drawstyle='steps-pre'``).  The vertices are (R_{i-1}, P_i), (R_i, P_i), so
    ``np.trapezoid(y, x)`` of the returned path equals the AP printed beside it.
    """
    r = np.asarray(recall, np.float64)
    p = np.asarray(precision, np.float64)
    xs = np.repeat(r, 2)[1:-1]
    ys = np.repeat(p[1:], 2)
    return np.r_[r[0], xs], np.r_[p[0], ys]


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
    seed: int = 0, name: str = "set",
) -> dict[str, Any]:
    """Every metric for one set of scores at a threshold fixed beforehand.

    ``warnings`` lists a small-set warning (:func:`small_set_warning`) when the set has fewer than
    :data:`MIN_CASES` cases; ``name`` names the set in it.
    """
    y, s = _xy(y_true, y_score)
    lo, hi = bootstrap_auc_ci(y, s, n_boot, seed)
    _, _, ap = pr_curve(y, s)
    warn = small_set_warning(name, len(y))
    return {
        "n": len(y),
        "n_positive": int(y.sum()),
        "auc": roc_auc(y, s),
        "auc_ci95": [lo, hi],
        "average_precision": ap,
        "confusion": confusion(y, s, threshold).as_dict(),
        "calibration": calibration(y, s, bins),
        "warnings": [warn] if warn else [],
    }


def cv_summary(
    folds: list[tuple[npt.ArrayLike, npt.ArrayLike]], *, n_boot: int = 1000, seed: int = 0,
    minimum: int = MIN_CASES,
) -> dict[str, Any]:
    """Cross-validation summary with a bootstrap 95% CI per fold.

    ``folds[k]`` is (series labels, series scores) of validation fold ``k``.  Returns per fold
    n / positives / AUC / CI (``folds``), mean and sd (ddof=1) of the fold AUCs, the AUC of all
    folds' scores pooled (with its CI; only meaningful when the folds' scores are on one scale),
    and ``warnings`` naming every fold under ``minimum`` cases (also logged).
    """
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    for k, (yk, sk) in enumerate(folds):
        y, s = _xy(yk, sk)
        lo, hi = bootstrap_auc_ci(y, s, n_boot, seed + k)
        warn = small_set_warning(f"CV fold {k}", len(y), minimum)
        if warn:
            warnings.append(warn)
        rows.append({"fold": k, "n": len(y), "n_positive": int(y.sum()), "auc": roc_auc(y, s),
                     "auc_ci95": [lo, hi]})
    aucs = np.array([r["auc"] for r in rows], np.float64)
    out: dict[str, Any] = {
        "folds": rows,
        "auc_mean": float(np.nanmean(aucs)) if len(aucs) else float("nan"),
        "auc_sd": float(np.nanstd(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
        "warnings": warnings,
    }
    if folds:
        y_all = np.concatenate([np.asarray(f[0]).reshape(-1) for f in folds])
        s_all = np.concatenate([np.asarray(f[1], np.float64).reshape(-1) for f in folds])
        out["pooled"] = {"n": len(y_all), "auc": roc_auc(y_all, s_all),
                         "auc_ci95": list(bootstrap_auc_ci(y_all, s_all, n_boot, seed))}
    return out


def curve_title(kind: str, y_true: npt.ArrayLike, *, model: str = "", split: str = "") -> str:
    """Plot title: model, split, curve kind and n (positives), e.g. ``m1 - test ROC\\nn=60 (30 positive)``."""
    y = np.asarray(y_true).reshape(-1)
    name = {"roc": "ROC", "pr": "PR", "reliability": "calibration"}.get(kind, kind)
    head = " - ".join(x for x in (model, split) if x)
    return f"{head} {name}\nn={len(y)} ({int(y.sum())} positive)".strip()


def plot_curves(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike, out_dir: Path, prefix: str, *, model: str = "",
    split: str | None = None, threshold: float | None = None,
) -> list[Path]:
    """ROC, PR and reliability PNGs; returns their paths.

    Titles name the model, the split and n (positives); with ``threshold`` the operating point is
    marked on each plot (ROC and PR: the point at score >= threshold; reliability: a vertical
    line).  The PR curve is drawn as :func:`pr_step_path`, so its area is the AP in the legend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, s = _xy(y_true, y_score)
    out_dir.mkdir(parents=True, exist_ok=True)
    fpr, tpr, _ = roc_curve(y, s)
    rec, prec, ap = pr_curve(y, s)
    cal = calibration(y, s)
    op = confusion(y, s, threshold) if threshold is not None else None
    paths = []
    for kind in ("roc", "pr", "reliability"):
        fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
        if kind == "roc":
            ax.plot(fpr, tpr, label=f"AUC {roc_auc(y, s):.3f}")
            ax.plot([0, 1], [0, 1], "k--", lw=0.5)
            if op is not None:
                ax.plot([1.0 - op.specificity], [op.sensitivity], "ro",
                        label=f"threshold {op.threshold:.3f}: sens {op.sensitivity:.2f}, spec {op.specificity:.2f}")
            ax.set_xlabel("1 - specificity")
            ax.set_ylabel("sensitivity")
        elif kind == "pr":
            xs, ys = pr_step_path(rec, prec)
            ax.plot(xs, ys, label=f"AP {ap:.3f} (area of this curve)")
            if op is not None and op.tp + op.fp:
                ax.plot([op.sensitivity], [op.tp / (op.tp + op.fp)], "ro", label=f"threshold {op.threshold:.3f}")
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
            ax.set_ylim(0.0, 1.05)
        else:
            pts = cal["reliability"]
            ax.plot([p["mean_predicted"] for p in pts], [p["fraction_positive"] for p in pts], "o-",
                    label=f"Brier {cal['brier']:.3f}, ECE {cal['ece']:.3f}")
            ax.plot([0, 1], [0, 1], "k--", lw=0.5)
            if op is not None:
                ax.axvline(op.threshold, color="r", lw=0.8, label=f"threshold {op.threshold:.3f}")
            ax.set_xlabel("mean predicted probability")
            ax.set_ylabel("fraction positive")
        ax.set_title(curve_title(kind, y, model=model, split=split or prefix), fontsize=9)
        ax.legend(loc="best", fontsize=7)
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
    model: str = "",
) -> dict[str, Any]:
    """The full evaluation: threshold on validation (series level), metrics + plots on validation and test.

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
        "validation_series": binary_report(vy, vs, threshold, n_boot=n_boot, bins=bins, name="validation set"),
        "test_series": binary_report(ty, ts, threshold, n_boot=n_boot, bins=bins, name="test set"),
    }
    if agg is not None:
        report["test_slices"] = binary_report(test[1], test[2], threshold, n_boot=n_boot, bins=bins,
                                              name="test slices")
    report["warnings"] = report["validation_series"]["warnings"] + report["test_series"]["warnings"]
    report["plots"] = [p.name for p in plot_curves(vy, vs, out_dir, "validation_series", model=model,
                                                   split="validation", threshold=threshold)]
    report["plots"] += [p.name for p in plot_curves(ty, ts, out_dir, "test_series", model=model, split="test",
                                                    threshold=threshold)]
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
