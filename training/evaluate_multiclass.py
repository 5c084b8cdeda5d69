"""Metrics for graded (ordinal multiclass) and multilabel models: kappa, per-class rates, confusion, AUCs.

* Quadratic weighted kappa (QWK), the field's standard agreement measure for DR grading: 1 - sum
  w_ij O_ij / sum w_ij E_ij with w_ij = (i - j)^2 / (K - 1)^2, O the confusion matrix and E the outer
  product of its marginals; 95% CI by percentile bootstrap over images.
* Per class, one-vs-rest sensitivity and specificity of the decoded grade.
* Referable DR (grade >= 2): AUC of P(grade >= 2) = sum of those class probabilities, with CI.
* Multilabel: per finding, AUC with CI and sensitivity/specificity at a threshold chosen on validation.

numpy only, except :func:`plot_confusion` (matplotlib, Agg backend).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from training.evaluate import roc_auc

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]


def confusion_matrix(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, k: int) -> IntArray:
    """(k, k) counts, rows = truth, columns = prediction."""
    t = np.asarray(y_true, np.int64).reshape(-1)
    p = np.asarray(y_pred, np.int64).reshape(-1)
    m = np.zeros((k, k), np.int64)
    np.add.at(m, (t, p), 1)
    return m


def quadratic_weighted_kappa(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, k: int) -> float:
    """QWK of two gradings on 0..k-1 (1 perfect, 0 chance); NaN when the expected disagreement is 0."""
    o = confusion_matrix(y_true, y_pred, k).astype(np.float64)
    n = o.sum()
    if n == 0:
        return float("nan")
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    w = (i - j) ** 2 / float((k - 1) ** 2)
    e = np.outer(o.sum(1), o.sum(0)) / n
    den = float((w * e).sum())
    return float("nan") if den == 0 else float(1.0 - (w * o).sum() / den)


def bootstrap_ci(values: Sequence[float]) -> tuple[float, float]:
    """2.5 / 97.5 percentiles of finite bootstrap values (NaN, NaN when none)."""
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))


def decode(probs: npt.ArrayLike, how: str = "argmax") -> IntArray:
    """Grades from (N, K) class probabilities: ``argmax`` or ``expected`` (rounded expected grade)."""
    p = np.asarray(probs, np.float64)
    if how == "expected":
        return np.clip(np.rint(p @ np.arange(p.shape[1])), 0, p.shape[1] - 1).astype(np.int64)
    return p.argmax(axis=1).astype(np.int64)


def per_class_rates(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, k: int) -> list[dict[str, float]]:
    """One-vs-rest sensitivity / specificity / support of each class."""
    m = confusion_matrix(y_true, y_pred, k)
    n = m.sum()
    out = []
    for c in range(k):
        tp = int(m[c, c])
        fn = int(m[c].sum() - tp)
        fp = int(m[:, c].sum() - tp)
        tn = int(n - tp - fn - fp)
        out.append({"class": c, "support": tp + fn,
                    "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
                    "specificity": tn / (tn + fp) if tn + fp else float("nan")})
    return out


def graded_report(y_true: npt.ArrayLike, probs: npt.ArrayLike, *, decoding: str = "argmax",
                  referable_from: int = 2, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """QWK (and CI), accuracy, per-class rates, confusion, referable AUC (and CI) of one artifact."""
    y = np.asarray(y_true, np.int64).reshape(-1)
    p = np.asarray(probs, np.float64)
    k = p.shape[1]
    pred = decode(p, decoding)
    ref_y = (y >= referable_from).astype(np.int64)
    ref_s = p[:, referable_from:].sum(axis=1)
    rng = np.random.default_rng(seed)
    kappas, aucs = [], []
    for _ in range(n_boot):  # n_boot = 0: point estimates only (CIs NaN)
        idx = rng.integers(0, len(y), len(y))
        kappas.append(quadratic_weighted_kappa(y[idx], pred[idx], k))
        aucs.append(roc_auc(ref_y[idx], ref_s[idx]) if 0 < ref_y[idx].sum() < len(idx) else float("nan"))
    return {
        "n": int(len(y)),
        "decoding": decoding,
        "qwk": quadratic_weighted_kappa(y, pred, k),
        "qwk_ci95": list(bootstrap_ci(kappas)),
        "qwk_argmax_decoding": quadratic_weighted_kappa(y, decode(p, "argmax"), k),
        "qwk_expected_decoding": quadratic_weighted_kappa(y, decode(p, "expected"), k),
        "accuracy": float((pred == y).mean()),
        "per_class": per_class_rates(y, pred, k),
        "confusion": confusion_matrix(y, pred, k).tolist(),
        "referable_auc": roc_auc(ref_y, ref_s) if 0 < ref_y.sum() < len(y) else float("nan"),
        "referable_auc_ci95": list(bootstrap_ci(aucs)),
        "referable_from_grade": referable_from,
        "bootstrap": n_boot,
    }


def youden_threshold(y: npt.ArrayLike, s: npt.ArrayLike) -> float:
    """Threshold with max Youden J on (y, s), at the midpoint of the score gap it sits in."""
    yy = np.asarray(y, np.int64)
    ss = np.asarray(s, np.float64)
    cands = np.unique(ss)
    best, thr = -1.0, 0.5
    for t in cands:
        pos = ss >= t
        sens = (pos & (yy == 1)).sum() / max(1, (yy == 1).sum())
        spec = (~pos & (yy == 0)).sum() / max(1, (yy == 0).sum())
        if sens + spec - 1 > best + 1e-12:
            best, thr = sens + spec - 1, float(t)
    below = ss[ss < thr]
    return float((thr + below.max()) / 2.0) if below.size else thr


def multilabel_report(y_true: npt.ArrayLike, probs: npt.ArrayLike, thresholds: Sequence[float], names: Sequence[str],
                      *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per finding: AUC (CI), sensitivity / specificity at its threshold, prevalence."""
    y = np.asarray(y_true, np.int64)
    p = np.asarray(probs, np.float64)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for j, name in enumerate(names):
        yj, pj, t = y[:, j], p[:, j], float(thresholds[j])
        boots = []
        for _ in range(n_boot):
            idx = rng.integers(0, len(yj), len(yj))
            boots.append(roc_auc(yj[idx], pj[idx]) if 0 < yj[idx].sum() < len(idx) else float("nan"))
        pos = pj >= t
        out[name] = {
            "n": int(len(yj)), "positive": int(yj.sum()), "threshold": t,
            "auc": roc_auc(yj, pj) if 0 < yj.sum() < len(yj) else float("nan"),
            "auc_ci95": list(bootstrap_ci(boots)),
            "sensitivity": float((pos & (yj == 1)).sum() / max(1, yj.sum())),
            "specificity": float((~pos & (yj == 0)).sum() / max(1, (yj == 0).sum())),
        }
    return out


def plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path, title: str) -> Path:
    """Confusion matrix PNG (counts, row-normalised colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, np.float64)
    norm = m / np.maximum(1.0, m.sum(axis=1, keepdims=True))
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=110)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["bootstrap_ci", "confusion_matrix", "decode", "graded_report", "multilabel_report", "per_class_rates",
           "plot_confusion", "quadratic_weighted_kappa", "youden_threshold"]
