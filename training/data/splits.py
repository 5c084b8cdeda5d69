"""Patient-level splits: an independent test set plus stratified k-fold, and a loud leakage check.

A patient's series are correlated, so every split is made over patients, never over samples
or series.  ``assert_no_leakage`` is meant to run at the start of every training run (and by
``make_splits`` itself); it raises :class:`LeakageError` naming the leaked patients.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

SPLITS_FILENAME = "splits.json"


class LeakageError(RuntimeError):
    """The same patient appears on both sides of a split."""


class SplitsError(ValueError):
    """A split cannot be made (or used) as asked; the message says why."""


def assert_no_leakage(**groups: Iterable[str]) -> None:
    """Raise :class:`LeakageError` if any patient ID occurs in two of the named groups.

    ``assert_no_leakage(train=..., val=..., test=...)``; groups may be any iterables of IDs.
    """
    seen: dict[str, str] = {}
    leaks: dict[str, set[str]] = defaultdict(set)
    for name, ids in groups.items():
        for pid in set(ids):
            other = seen.get(pid)
            if other is not None and other != name:
                leaks[pid].update((other, name))
            else:
                seen[pid] = name
    if leaks:
        detail = "; ".join(f"{pid} in {sorted(g)}" for pid, g in sorted(leaks.items())[:20])
        more = f" (and {len(leaks) - 20} more)" if len(leaks) > 20 else ""
        raise LeakageError(f"patient leakage across splits: {len(leaks)} patient(s): {detail}{more}")


class Splits(BaseModel):
    """Test patients and k folds of the remaining (development) patients."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int
    test: tuple[str, ...]
    folds: tuple[tuple[str, ...], ...] = Field(min_length=2)
    labels: dict[str, int] = Field(default_factory=dict, description="Patient label used for stratification.")
    method: str = Field("stratified", description="How the folds were made: 'stratified' or 'luna16-subset'.")
    fold_names: tuple[str, ...] = Field((), description="Name of each fold (e.g. its LUNA16 subset folder).")
    test_names: tuple[str, ...] = Field((), description="Groups held out as the test split (e.g. subset9).")

    @model_validator(mode="after")
    def _check(self) -> Splits:
        assert_no_leakage(test=self.test, **{f"fold{i}": f for i, f in enumerate(self.folds)})
        if self.fold_names and len(self.fold_names) != len(self.folds):
            raise ValueError(f"{len(self.fold_names)} fold_names for {len(self.folds)} folds")
        return self

    @property
    def k(self) -> int:
        return len(self.folds)

    def development(self) -> tuple[str, ...]:
        return tuple(p for f in self.folds for p in f)

    def fold(self, i: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(train, validation) patients of fold ``i``; checked for leakage against each other and test."""
        if not 0 <= i < self.k:
            raise IndexError(f"fold {i} out of range 0..{self.k - 1}")
        val = self.folds[i]
        train = tuple(p for j, f in enumerate(self.folds) if j != i for p in f)
        assert_no_leakage(train=train, val=val, test=self.test)
        return train, val

    def save(self, path: Path) -> Path:
        path.write_text(self.model_dump_json(indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> Splits:
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))


def make_splits(patient_labels: Mapping[str, int], *, k: int = 5, test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Stratified patient-level split.

    Within each label, patients are shuffled with ``seed``; ``round(n * test_fraction)`` of them go
    to the test set and the rest are dealt round-robin into ``k`` folds (continuing the deal
    across labels, so fold sizes differ by at most one).  A patient's label is the maximum over
    its series (any positive series makes a positive patient) -- callers pass that in.
    """
    if k < 2:
        raise ValueError("k must be >= 2")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError("test_fraction must be in [0, 1)")
    by_label: dict[int, list[str]] = defaultdict(list)
    for pid, lab in sorted(patient_labels.items()):
        by_label[int(lab)].append(pid)
    rng = np.random.default_rng(seed)
    test: list[str] = []
    folds: list[list[str]] = [[] for _ in range(k)]
    deal = 0
    for lab in sorted(by_label):
        pids = [by_label[lab][i] for i in rng.permutation(len(by_label[lab]))]
        n_test = int(round(len(pids) * test_fraction))
        test.extend(pids[:n_test])
        for pid in pids[n_test:]:
            folds[deal % k].append(pid)
            deal += 1
    if sum(len(f) for f in folds) < k:
        raise ValueError(f"{len(patient_labels)} patients are too few for {k} folds plus a test set")
    for lab, pids in by_label.items():
        if len(pids) < k:
            log.warning("label %d has only %d patients: some folds have none of them", lab, len(pids))
    return Splits(
        seed=seed,
        test=tuple(sorted(test)),
        folds=tuple(tuple(sorted(f)) for f in folds),
        labels={p: int(v) for p, v in sorted(patient_labels.items())},
    )


def patient_labels_from_summary(summary_path: Path) -> dict[str, int]:
    """Patient -> label from a dataset summary written by ``convert`` (max over the patient's series)."""
    data = json.loads(Path(summary_path).read_text(encoding="utf-8"))
    out: dict[str, int] = {}
    for pid, info in data["patients"].items():
        out[pid] = int(info["label"])
    return out


LUNA16_SUBSET = re.compile(r"^subset(\d+)$")


def luna16_subset_of(source: str) -> int | None:
    """The N of the ``subsetN`` folder a LUNA16 scan was read from (the nearest one in its path)."""
    for part in reversed(Path(source).parts[:-1]):
        m = LUNA16_SUBSET.match(part)
        if m:
            return int(m.group(1))
    return None


def luna16_subset_splits(summary_path: Path, *, test_subsets: Iterable[int] = ()) -> Splits:
    """The LUNA16 challenge's cross-validation split: one fold per ``subsetN`` folder of the download.

    The challenge defines ten folds, fold k = the scans of ``subsetk`` (a scan is a patient there:
    the series UID is the patient ID).  Subsets named in ``test_subsets`` are held out as the test
    split instead; the remaining subsets become the folds in ascending order, so with the
    highest-numbered subsets held out fold k is still subset k.  The subset of a patient comes from
    the source paths ``convert`` records in ``dataset.json``; a patient with no ``subsetN`` folder in
    its path, or with scans in two subsets, is an error.
    """
    data = json.loads(Path(summary_path).read_text(encoding="utf-8"))
    by_subset: dict[int, list[str]] = defaultdict(list)
    problems: list[str] = []
    for pid, info in sorted(data["patients"].items()):
        sources = info.get("sources")
        if not sources:
            raise SplitsError(
                f"{summary_path}: patient {pid} has no recorded source path; re-run `medclf-train convert` "
                "(dataset.json files written before the LUNA16 subset split do not record them)"
            )
        subsets = {luna16_subset_of(s) for s in sources}
        if None in subsets or len(subsets) != 1:
            problems.append(f"{pid}: {sorted(sources)}")
            continue
        (sub,) = subsets
        assert sub is not None
        by_subset[sub].append(pid)
    if problems:
        raise SplitsError(
            f"{len(problems)} patient(s) not in exactly one subsetN folder (is this a LUNA16 download?): "
            + "; ".join(problems[:5])
        )
    held = sorted(set(int(t) for t in test_subsets))
    missing = [t for t in held if t not in by_subset]
    if missing:
        raise SplitsError(f"test subset(s) {missing} not found; the data has subsets {sorted(by_subset)}")
    fold_subsets = [s for s in sorted(by_subset) if s not in held]
    if len(fold_subsets) < 2:
        raise SplitsError(f"subsets {fold_subsets} left for folds: cross-validation needs at least two")
    if fold_subsets != list(range(len(fold_subsets))):
        log.warning("LUNA16 folds are subsets %s in that order: fold k is not subset k", fold_subsets)
    labels = {p: int(v["label"]) for p, v in sorted(data["patients"].items())}
    return Splits(
        seed=0,
        test=tuple(sorted(p for t in held for p in by_subset[t])),
        folds=tuple(tuple(sorted(by_subset[s])) for s in fold_subsets),
        labels=labels,
        method="luna16-subset",
        fold_names=tuple(f"subset{s}" for s in fold_subsets),
        test_names=tuple(f"subset{t}" for t in held),
    )
