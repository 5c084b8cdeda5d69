"""Learning-rate schedule shape, class weights and the training config."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.schedules import WarmupCosine
from training.train import class_weights, make_schedule
from training.train_config import FitSection, TrainConfigError, parse_train_config

SPEC = {"mode": "2.5d", "windows": [{"center": -600, "width": 1500}], "input_shape": [32, 32], "context_slices": 1}


def _lr(s: WarmupCosine, step: int) -> float:
    return float(s(step))


def test_warmup_is_linear_then_cosine_to_floor() -> None:
    s = WarmupCosine(peak=1e-3, total_steps=110, warmup_steps=10, alpha=0.1)
    warm = [_lr(s, i) for i in range(10)]
    assert np.allclose(np.diff(warm), 1e-4, rtol=1e-4)  # equal increments: linear
    assert _lr(s, 9) == pytest.approx(1e-3)
    assert _lr(s, 10) == pytest.approx(1e-3)
    assert _lr(s, 60) == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-5)  # half-way: cosine at pi/2
    assert _lr(s, 110) == pytest.approx(1e-4)
    assert _lr(s, 500) == pytest.approx(1e-4)  # stays at the floor
    tail = [_lr(s, i) for i in range(10, 111)]
    assert all(a >= b - 1e-12 for a, b in zip(tail, tail[1:], strict=False))  # monotone decay


def test_restarts_jump_back_to_scaled_peak() -> None:
    s = WarmupCosine(peak=1.0, total_steps=1000, warmup_steps=0, alpha=0.0, restart_steps=10, t_mul=2.0, m_mul=0.5)
    assert _lr(s, 0) == pytest.approx(1.0)
    assert _lr(s, 9) < 0.05
    assert _lr(s, 10) == pytest.approx(0.5)  # second cycle, 20 steps long, half the peak
    assert _lr(s, 20) == pytest.approx(0.25, rel=1e-4)  # its middle
    assert _lr(s, 30) == pytest.approx(0.25)  # third cycle
    assert _lr(s, 30 + 20) == pytest.approx(0.25 * 0.5 * (1 + math.cos(math.pi * 20 / 40)), rel=1e-4)


def test_schedule_round_trips_through_config() -> None:
    s = WarmupCosine(peak=0.1, total_steps=50, warmup_steps=5, alpha=0.2, restart_steps=7)
    s2 = WarmupCosine.from_config(s.get_config())
    assert [_lr(s, i) for i in range(0, 50, 3)] == [_lr(s2, i) for i in range(0, 50, 3)]


def test_make_schedule_counts_steps_from_epochs() -> None:
    fit = FitSection(epochs=4, learning_rate=0.01, warmup_epochs=1.0, min_lr_ratio=0.0)
    s = make_schedule(fit, steps_per_epoch=25)
    assert s.total_steps == 100 and s.warmup_steps == 25
    assert _lr(s, 24) == pytest.approx(0.01) and _lr(s, 100) == pytest.approx(0.0, abs=1e-9)


def test_bad_schedule_is_refused() -> None:
    with pytest.raises(ValueError):
        WarmupCosine(peak=1.0, total_steps=10, warmup_steps=20)


def test_class_weights_balance_the_split() -> None:
    y = np.array([0] * 90 + [1] * 10)
    w = class_weights(y)
    assert w[0] == pytest.approx(100 / 180) and w[1] == pytest.approx(100 / 20)
    assert w[0] * 90 == pytest.approx(w[1] * 10)  # each class contributes equally
    assert class_weights(np.zeros(5, int)) == {0: 1.0, 1: 1.0}


def test_train_config_ignores_convert_table_and_rejects_typos(tmp_path: object) -> None:
    cfg = parse_train_config({"preprocess": SPEC, "convert": {"shards": 2}, "model": {"family": "densenet3d"}})
    assert cfg.model.family == "densenet3d"
    with pytest.raises(TrainConfigError, match="fitt"):
        parse_train_config({"preprocess": SPEC, "fitt": {}})
    with pytest.raises(TrainConfigError, match="default"):
        parse_train_config({"preprocess": SPEC, "export": {"modes": ["fp32"], "default": "int8"}})
