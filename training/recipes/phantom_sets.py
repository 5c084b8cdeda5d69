"""Synthetic phantom sets for the shipped-model recipe: seeded, patient-disjoint splits and 2.5D samples.

numpy only (no TensorFlow), so the recipe can build its data in worker processes before
TensorFlow is imported.  Each split is a disjoint seed range; the phantom seed is the patient
(``patient_id_for_seed``), so disjoint seed ranges mean no patient is in two splits.  Odd seeds
carry 1-3 nodules, even seeds none, so every split is balanced at series level.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from medclf_node.preprocess import PreprocessSpec, output_length, slices_2d
from medclf_node.synthetic.phantoms import SLICE_LABEL_MIN_SECTION, Phantom, make_phantom
from training.data.synth import case_spacing

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
T = TypeVar("T")
R = TypeVar("R")

#: Slices this close (mm beyond the nodule radius) to a nodule but not labelled positive show
#: a sliver of it; they are left out of the negatives so the labels stay unambiguous.
AMBIGUOUS_MARGIN_MM = 1.5
#: Matched negatives are drawn from clear slices within this many model slices of a positive one.
MATCH_REACH = 5


@dataclass(frozen=True)
class SplitPlan:
    """One split: ``count`` phantoms with seeds ``first_seed ..``, rendered at ``shapes`` in turn."""

    name: str
    first_seed: int
    count: int
    shapes: tuple[tuple[int, int, int], ...]
    spacing_jitter: float = 0.15
    radius_range_mm: tuple[float, float] = (5.0, 14.0)

    def seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.count))

    def shape_for(self, seed: int) -> tuple[int, int, int]:
        return self.shapes[(seed - self.first_seed) % len(self.shapes)]


def nodules_for_seed(seed: int) -> int:
    """Odd seeds: 1-3 nodules (drawn from the seed); even seeds: none."""
    if seed % 2 == 0:
        return 0
    return int(np.random.default_rng(np.random.SeedSequence([seed, 0xD0D])).integers(1, 4))


def phantom_for(plan: SplitPlan, seed: int) -> Phantom:
    """The phantom of ``seed`` in ``plan`` (spacing jittered per seed, as ``medclf-train synth`` does)."""
    shape = plan.shape_for(seed)
    spacing = case_spacing(seed, shape, plan.spacing_jitter)
    return make_phantom(seed, shape=shape, spacing=spacing, nodules=nodules_for_seed(seed),
                        radius_range_mm=plan.radius_range_mm)


def model_slice_labels(phantom: Phantom, spec: PreprocessSpec) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """Per model-slice labels and an "ambiguous" mask on the grid the model sees.

    With ``spec.resample_z`` model slice ``i`` sits at ``i * target_z`` mm from source slice 0
    (origin-aligned resampling); otherwise model slices are source slices.  A slice is positive
    by the phantom's rule (cross-section >= SLICE_LABEL_MIN_SECTION x radius) and ambiguous when
    it is not positive yet within radius + AMBIGUOUS_MARGIN_MM of a nodule centre.
    """
    src_dz = phantom.spacing[0]
    if spec.resample_z and spec.target_spacing is not None:
        dz = spec.target_spacing[0]
        n = output_length(phantom.shape[0], src_dz, dz)
    else:
        dz, n = src_dz, phantom.shape[0]
    z_mm = np.arange(n) * dz
    reach = math.sqrt(1.0 - SLICE_LABEL_MIN_SECTION**2)
    pos = np.zeros(n, dtype=bool)
    near = np.zeros(n, dtype=bool)
    for nod in phantom.nodules:
        d = np.abs(z_mm - nod.center_zyx[0] * src_dz)
        pos |= d <= nod.radius_mm * reach
        near |= d <= nod.radius_mm + AMBIGUOUS_MARGIN_MM
    return pos.astype(np.uint8), near & ~pos


@dataclass(frozen=True)
class SampleSet:
    """2.5D training samples of one split, with the patient of every sample."""

    x: F32
    y: npt.NDArray[np.int64]
    patient_ids: npt.NDArray[np.str_]
    n_series: int
    n_positive_series: int

    def summary(self) -> dict[str, int]:
        return {
            "series": self.n_series,
            "positive_series": self.n_positive_series,
            "samples": int(len(self.y)),
            "positive_samples": int(self.y.sum()),
        }


def _samples_one(
    args: tuple[SplitPlan, int, PreprocessSpec, int, bool],
) -> tuple[F32, npt.NDArray[np.int64], str, int]:
    plan, seed, spec, negatives, flip = args
    ph = phantom_for(plan, seed)
    labels, ambiguous = model_slice_labels(ph, spec)
    x, y = series_samples(ph.hu, ph.spacing, spec, labels, ambiguous, seed=seed, negatives=negatives, flip=flip)
    return x, y, ph.patient_id, ph.label


def lung_fraction(x: F32, spec: PreprocessSpec) -> F32:
    """Per input, the fraction of the centre slice's pixels at lung-parenchyma density (-950..-700 HU)."""
    if len(spec.windows) != 1:
        raise ValueError("lung_fraction needs a one-window spec")
    w = spec.windows[0]
    lo, hi = ((np.array([-950.0, -700.0]) - (w.center - w.width / 2.0)) / w.width).tolist()
    centre = x[..., spec.context_slices if spec.mode == "2.5d" else 0]
    return ((centre >= lo) & (centre <= hi)).mean(axis=(1, 2)).astype(np.float32)


def series_samples(
    hu: npt.NDArray[np.floating[Any]] | npt.NDArray[np.integer[Any]],
    spacing: tuple[float, float, float],
    spec: PreprocessSpec,
    labels: npt.NDArray[np.uint8],
    ambiguous: npt.NDArray[np.bool_],
    *,
    seed: int,
    negatives: int,
    flip: bool,
) -> tuple[F32, npt.NDArray[np.int64]]:
    """Every positive model slice of one series, as many matched negatives (see below) and
    ``negatives`` random clear negatives.

    Nodules only grow inside the lungs, so three quarters of the negatives are drawn from slices
    through the lungs (at least half the series' largest lung area): otherwise "this slice shows
    a lot of lung" would separate the classes and the model would not need to find the nodule.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A3]))
    x_all = slices_2d(np.asarray(hu, np.float32), spacing, spec)
    lung = lung_fraction(x_all, spec)
    pos_idx = np.flatnonzero(labels)
    clear = (labels == 0) & ~ambiguous
    # Matched negatives: clear slices a few slices away from a nodule show the same anatomy
    # without it, so only the nodule itself separates them from the positives.
    near = np.zeros_like(clear)
    for k in pos_idx:
        near[max(0, k - MATCH_REACH) : k + MATCH_REACH + 1] = True
    matched = np.flatnonzero(clear & near)
    n_matched = min(len(matched), len(pos_idx))
    picked = rng.choice(matched, size=n_matched, replace=False)
    rest = clear.copy()
    rest[picked] = False
    lung_pool = np.flatnonzero(rest & (lung >= 0.5 * lung.max()))
    other_pool = np.flatnonzero(rest & (lung < 0.5 * lung.max()))
    n_lung = min(len(lung_pool), int(round(0.75 * negatives)))
    n_other = min(len(other_pool), negatives - n_lung)
    neg_idx = np.concatenate([
        picked,
        rng.choice(lung_pool, size=n_lung, replace=False),
        rng.choice(other_pool, size=n_other, replace=False),
    ]).astype(np.intp)
    idx = np.concatenate([pos_idx, np.sort(neg_idx)]).astype(np.intp)
    x = x_all[idx]
    y = labels[idx].astype(np.int64)
    if flip and len(pos_idx):  # left-right mirrored positives: more nodule positions for free
        x = np.concatenate([x, x[: len(pos_idx), :, ::-1, :]])
        y = np.concatenate([y, y[: len(pos_idx)]])
    return np.ascontiguousarray(x), y


def build_samples(
    plan: SplitPlan, spec: PreprocessSpec, *, negatives_per_series: int, flip_positives: bool, workers: int = 1
) -> SampleSet:
    """Render every phantom of ``plan`` and keep its positive slices plus random clear negatives."""
    jobs = [(plan, s, spec, negatives_per_series, flip_positives) for s in plan.seeds()]
    xs: list[F32] = []
    ys: list[npt.NDArray[np.int64]] = []
    pids: list[str] = []
    n_pos = 0
    for x, y, pid, label in parallel_map(_samples_one, jobs, workers):
        xs.append(x)
        ys.append(y)
        pids.extend([pid] * len(y))
        n_pos += label
    log.info("split %s: %d phantoms -> %d samples", plan.name, plan.count, sum(len(y) for y in ys))
    return SampleSet(np.concatenate(xs), np.concatenate(ys), np.asarray(pids), plan.count, n_pos)


def parallel_map(fn: Callable[[T], R], jobs: Sequence[T], workers: int) -> Iterator[R]:
    """``map`` in order, in forked worker processes when ``workers`` > 1 (numpy only: fork is safe
    as long as the caller has not started TensorFlow's threads yet)."""
    if workers <= 1 or len(jobs) < 2:
        yield from map(fn, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
        yield from pool.map(fn, jobs, chunksize=max(1, len(jobs) // (4 * workers)))


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class RecipeSize:
    """Data and training sizes of a recipe; FULL ships, TINY exercises the same path in seconds."""

    train: int
    val: int
    test: int
    train_shapes: tuple[tuple[int, int, int], ...]
    test_shapes: tuple[tuple[int, int, int], ...]
    negatives_per_series: int
    epochs: int
    batch_size: int
    bootstrap: int
    latency_shape: tuple[int, int, int]
    latency_repeats: int
    representative: int = 0  # int8 calibration samples (2.5D recipe only)
