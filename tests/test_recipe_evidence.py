"""The recipes' evidence stage (training.recipes.evidence): locked seeds, positioned DICOM, baselines, thresholds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medclf_node.config import VolumeSection
from medclf_node.ingest.volume import assemble_volume
from medclf_node.synthetic.phantoms import make_phantom
from training.recipes.evidence import (
    LOCKED_FIRST_SEED,
    USED_SEED_RANGES,
    EvidenceSet,
    artifact_threshold,
    baseline_scores,
    check_locked_ranges,
    evidence_sets,
    lung_mask,
    set_phantom,
    write_positioned_series,
)


def test_evidence_sets_are_disjoint_from_every_range_used_before_and_from_each_other() -> None:
    sets = evidence_sets(60, 40)
    splits = {"train": {"first_seed": 100_000, "count": 360}, "val": {"first_seed": 200_000, "count": 40},
              "test": {"first_seed": 300_000, "count": 60}}
    check_locked_ranges(sets, splits)
    seeds = [s for es in sets for s in es.seeds()]
    assert len(seeds) == len(set(seeds)) and min(seeds) == LOCKED_FIRST_SEED
    for a, b in USED_SEED_RANGES.values():
        assert not any(a <= s <= b for s in seeds)
    assert {es.name for es in sets} == {"locked", "small_nodules", "thin_slices", "prone", "feet_first",
                                        "high_noise", "geometry"}
    with pytest.raises(ValueError, match="overlap the earlier test"):
        check_locked_ranges([EvidenceSet("bad", "bad", 300_010, 5)], {})
    with pytest.raises(ValueError, match="overlap the split custom"):
        check_locked_ranges(sets, {"custom": {"first_seed": LOCKED_FIRST_SEED + 5, "count": 1}})


def test_shift_sets_render_what_they_say() -> None:
    by = {es.name: es for es in evidence_sets(4, 4)}
    small = set_phantom(by["small_nodules"], by["small_nodules"].first_seed + 1)
    assert small.label == 1 and all(3.0 <= n.radius_mm <= 5.0 for n in small.nodules)
    thin = set_phantom(by["thin_slices"], by["thin_slices"].first_seed)
    assert thin.spacing == (1.0, 1.875, 1.875) and thin.hu.shape == (300, 192, 192)
    assert set_phantom(by["locked"], LOCKED_FIRST_SEED).label == 0  # even seeds: no nodule


@pytest.mark.parametrize("position", ["HFP", "FFS"])
def test_positioned_series_describe_the_same_physical_phantom(tmp_path: Path, position: str) -> None:
    """HFP / FFS pixels and geometry are the canonical volume's: every voxel the node reads sits, by the
    node's affine, at the patient position where the canonical (HFS) volume has the same HU."""
    ph = make_phantom(7, shape=(12, 40, 48), nodules=1)
    hu = np.rint(ph.hu).astype(np.int16)
    ref = assemble_volume(write_positioned_series(hu, ph.spacing, tmp_path / "hfs", "HFS", patient_id="P-1",
                                                  uid_seed="a"), VolumeSection())
    assert np.array_equal(ref.array, hu.astype(np.float32))
    paths = write_positioned_series(hu, ph.spacing, tmp_path / position, position, patient_id="P-1", uid_seed="b")
    import pydicom

    ds = pydicom.dcmread(paths[0])
    assert ds.PatientPosition == position
    vol = assemble_volume(paths, VolumeSection())
    inv = np.linalg.inv(ref.affine)
    rng = np.random.default_rng(0)
    for k, r, c in zip(rng.integers(0, 12, 50), rng.integers(0, 40, 50), rng.integers(0, 48, 50), strict=True):
        lps = vol.affine @ np.array([k, r, c, 1.0])
        kk, rr, cc = np.rint((inv @ lps)[:3]).astype(int)
        assert vol.array[k, r, c] == hu[kk, rr, cc]


def test_baselines_see_large_nodules_and_the_lung_mask_is_the_lungs() -> None:
    with_nod = make_phantom(21, shape=(40, 128, 128), nodules=2, radius_range_mm=(12.0, 14.0))
    without = make_phantom(21, shape=(40, 128, 128), nodules=0)
    mask = lung_mask(without.hu)
    frac = mask.mean()
    assert 0.05 < frac < 0.5  # lungs, not the air around the body
    assert (without.hu[mask] < -500).mean() > 0.9
    a, b = baseline_scores(with_nod.hu, with_nod.spacing), baseline_scores(without.hu, without.spacing)
    assert a["dense_lung_fraction"] > b["dense_lung_fraction"]


def test_artifact_threshold_is_the_midpoint_of_the_validation_gap() -> None:
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.4, 0.6, 0.7, 0.9]
    assert artifact_threshold(y, s) == pytest.approx(0.5)
