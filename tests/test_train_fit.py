"""The fit loop and the k-fold driver on tiny in-memory data (a bright square means positive)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from training.tfenv import gpu_available, tf
from training.train import (
    CONFIG_FILE,
    HISTORY_FILE,
    WEIGHTS_FILE,
    Split,
    cross_validate,
    load_trained_model,
    predict_split,
    resolve_precision,
    strategy_from_env,
)
from training.train_config import TrainConfig, parse_train_config


def _split(n: int, seed: int, per_series: int = 4) -> Split:
    rng = np.random.default_rng(seed)
    series_y = np.arange(n // per_series) % 2
    y = np.repeat(series_y, per_series)
    x = (rng.normal(size=(n, 16, 16, 3)) * 0.2 + 0.3).astype(np.float32)
    x[y == 1, 5:11, 5:11, :] += 0.8
    ids = np.repeat([f"s{seed}-{i}" for i in range(len(series_y))], per_series)
    return Split.from_arrays(x, y, ids)


def _cfg(tmp_path: Path, precision: str = "mixed_bfloat16") -> TrainConfig:
    return parse_train_config({
        "name": "tiny", "output_dir": str(tmp_path),
        "preprocess": {"mode": "2.5d", "windows": [{"center": -600, "width": 1500}], "input_shape": [16, 16],
                       "context_slices": 1},
        "model": {"family": "cnn2d", "base_filters": 4, "dropout": 0.0},
        "fit": {"epochs": 2, "batch_size": 16, "learning_rate": 5e-3, "warmup_epochs": 0.5, "precision": precision},
        "evaluate": {"aggregation": {"method": "topk_mean", "k": 2}},
    })


def test_environment_defaults() -> None:
    assert resolve_precision("auto") == ("mixed_float16" if gpu_available() else "mixed_bfloat16")
    assert resolve_precision("float32") == "float32"
    assert isinstance(strategy_from_env("default"), type(tf.distribute.get_strategy()))


@pytest.mark.slow
def test_cross_validation_writes_runs_and_summary(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    folds = [(_split(96, 10 + k), _split(32, 20 + k)) for k in range(2)]
    summary = cross_validate(cfg, lambda k: (folds[k][0], folds[k][1], None), 2)

    assert [r["fold"] for r in summary["folds"]] == [0, 1]
    aucs = [r["val_auc"] for r in summary["folds"]]
    assert summary["val_auc_mean"] == pytest.approx(np.mean(aucs))
    assert summary["val_auc_sd"] == pytest.approx(np.std(aucs, ddof=1))
    assert min(aucs) > 0.9, "a bright square is easy: the loop must actually learn"
    assert json.loads((tmp_path / "tiny" / "cv.json").read_text())["folds"][1]["n_val"] == 32
    for row in summary["folds"]:  # per-fold bootstrap CI at series level; folds of 8 series are flagged
        lo, hi = row["val_auc_ci95"]
        assert lo <= row["val_auc"] <= hi and row["n_val_series"] == 8
    assert len(summary["warnings"]) == 2 and "only 8 case(s) (< 30)" in summary["warnings"][0]
    assert summary["val_auc_pooled"]["n"] == 16

    run = tmp_path / "tiny" / "fold-0"
    for name in (WEIGHTS_FILE, HISTORY_FILE, CONFIG_FILE):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / HISTORY_FILE).open()))
    assert len(rows) == 2 and {"val_auc", "weighted_auc", "auc"} <= set(rows[0])
    assert list((run / "tensorboard").rglob("events.out.tfevents.*")), "TensorBoard logs written"
    # the checkpoint is the best validation epoch, and the rebuilt fp32 model reproduces its AUC
    best = max(float(r["val_auc"]) for r in rows)
    model = load_trained_model(run)
    assert model.layers[1].compute_dtype == "float32"  # export graph is float32 whatever the training policy
    from training.evaluate import roc_auc

    assert roc_auc(folds[0][1].labels, predict_split(model, folds[0][1])) == pytest.approx(best, abs=0.02)
