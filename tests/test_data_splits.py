"""Patient-level splits: disjoint, stratified, deterministic; leakage is caught loudly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.data.splits import LeakageError, Splits, assert_no_leakage, make_splits

LABELS = {f"P{i:03d}": int(i % 10 < 3) for i in range(60)}  # 30% positive


def test_splits_cover_all_patients_once() -> None:
    s = make_splits(LABELS, k=5, test_fraction=0.2, seed=1)
    everyone = list(s.test) + [p for f in s.folds for p in f]
    assert sorted(everyone) == sorted(LABELS)
    assert len(everyone) == len(set(everyone))
    assert len(s.test) == 12 and s.k == 5
    assert max(len(f) for f in s.folds) - min(len(f) for f in s.folds) <= 1


def test_splits_are_stratified() -> None:
    s = make_splits(LABELS, k=4, test_fraction=0.25, seed=3)
    assert sum(LABELS[p] for p in s.test) == round(18 * 0.25)
    for f in s.folds:
        frac = sum(LABELS[p] for p in f) / len(f)
        assert 0.2 <= frac <= 0.4


def test_splits_deterministic_under_seed() -> None:
    assert make_splits(LABELS, seed=7) == make_splits(LABELS, seed=7)
    assert make_splits(LABELS, seed=7).test != make_splits(LABELS, seed=8).test


def test_fold_train_val_disjoint() -> None:
    s = make_splits(LABELS, k=5, seed=0)
    for i in range(s.k):
        train, val = s.fold(i)
        assert not set(train) & set(val)
        assert not (set(train) | set(val)) & set(s.test)
        assert sorted(train + val) == sorted(s.development())
    with pytest.raises(IndexError):
        s.fold(5)


def test_leakage_detected() -> None:
    assert_no_leakage(train=["a", "b"], val=["c"], test=["d"])
    with pytest.raises(LeakageError, match="b in \\['train', 'val'\\]"):
        assert_no_leakage(train=["a", "b"], val=["b", "c"])
    with pytest.raises(LeakageError, match="1 patient"):
        assert_no_leakage(train=["a"], val=["c"], test=["a"])


def test_planted_leak_in_saved_splits_fails_on_load(tmp_path: Path) -> None:
    s = make_splits(LABELS, k=3, seed=0)
    path = s.save(tmp_path / "splits.json")
    assert Splits.load(path) == s
    data = json.loads(path.read_text())
    data["folds"][1].append(data["test"][0])
    path.write_text(json.dumps(data))
    with pytest.raises(LeakageError, match="patient leakage"):
        Splits.load(path)


def test_too_few_patients() -> None:
    with pytest.raises(ValueError, match="too few"):
        make_splits({"a": 0, "b": 1}, k=5, test_fraction=0.5)
