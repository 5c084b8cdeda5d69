"""LUNA16 labels: scans known only from candidates.csv, and when slice labels are known."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from training.data.readers import iter_luna16_cases, read_luna16_case

SHAPE = (20, 24, 24)  # (z, y, x)
SPACING = (2.0, 1.0, 1.0)  # (slice, row, column) mm
ORIGIN = (-12.0, -12.0, -40.0)  # LPS of ITK index (0, 0, 0): the most inferior slice


def _lps(zyx: tuple[float, float, float]) -> tuple[float, float, float]:
    """LPS mm of canonical voxel (slice 0 most superior) of the scans written here."""
    z, y, x = zyx
    return (ORIGIN[0] + x * SPACING[2], ORIGIN[1] + y * SPACING[1], ORIGIN[2] + (SHAPE[0] - 1 - z) * SPACING[0])


def _scan(directory: Path, uid: str) -> Path:
    sitk = pytest.importorskip("SimpleITK")
    directory.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.full(SHAPE, -800, dtype=np.int16))
    img.SetSpacing((SPACING[2], SPACING[1], SPACING[0]))
    img.SetOrigin(ORIGIN)
    path = directory / f"{uid}.mhd"
    sitk.WriteImage(img, str(path))
    return path


def _candidate(uid: str, zyx: tuple[float, float, float], cls: int) -> dict[str, str]:
    x, y, z = _lps(zyx)
    return {"seriesuid": uid, "coordX": str(x), "coordY": str(y), "coordZ": str(z), "class": str(cls)}


def _annotation(uid: str, zyx: tuple[float, float, float], diameter: float) -> dict[str, str]:
    x, y, z = _lps(zyx)
    return {"seriesuid": uid, "coordX": str(x), "coordY": str(y), "coordZ": str(z), "diameter_mm": str(diameter)}


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_candidates_only_class1_scan_is_positive_with_unknown_slice_labels(tmp_path: Path) -> None:
    path = _scan(tmp_path, "1.1")
    case = read_luna16_case(path, candidates=[_candidate("1.1", (5, 10, 12), 1), _candidate("1.1", (15, 3, 3), 0)])
    assert case.label == 1  # was 0: only annotations made a scan positive
    assert case.slice_labels is None  # no diameter in candidates.csv: which slices hold the nodule is unknown
    pos = [c for c in case.candidates if c.label == 1]
    assert len(pos) == 1 and pos[0].radius_mm is None
    np.testing.assert_allclose(pos[0].center_zyx, (5, 10, 12), atol=1e-6)


def test_candidates_only_class0_scan_is_negative(tmp_path: Path) -> None:
    path = _scan(tmp_path, "1.2")
    case = read_luna16_case(path, candidates=[_candidate("1.2", (5, 10, 12), 0)])
    assert case.label == 0
    assert case.slice_labels is not None and not case.slice_labels.any()


def test_class1_candidate_inside_an_annotation_keeps_radius_based_slice_labels(tmp_path: Path) -> None:
    path = _scan(tmp_path, "1.3")
    case = read_luna16_case(
        path,
        annotations=[_annotation("1.3", (8, 12, 12), 6.0)],
        candidates=[_candidate("1.3", (8.5, 12.5, 11.0), 1)],  # the same nodule, 1.6 mm off centre
    )
    assert case.label == 1
    assert case.slice_labels is not None
    assert np.flatnonzero(case.slice_labels).tolist() == [7, 8, 9]  # |dz| <= 3 mm * sqrt(0.75) at 2 mm slices


def test_class1_candidate_outside_every_annotation_makes_slice_labels_unknown(tmp_path: Path) -> None:
    path = _scan(tmp_path, "1.4")
    case = read_luna16_case(
        path,
        annotations=[_annotation("1.4", (8, 12, 12), 6.0)],
        candidates=[_candidate("1.4", (16, 4, 4), 1)],  # a second nodule with no diameter
    )
    assert case.label == 1
    assert case.slice_labels is None  # zeros at slice 16 would be wrong


def test_iter_with_both_csvs_labels_candidates_only_positives(tmp_path: Path) -> None:
    root = tmp_path / "subset0"
    for uid in ("2.1", "2.2", "2.3"):
        _scan(root, uid)
    ann = _write_csv(tmp_path / "annotations.csv", [_annotation("2.1", (8, 12, 12), 6.0)])
    cand = _write_csv(
        tmp_path / "candidates.csv",
        [_candidate("2.1", (8, 12, 12), 1), _candidate("2.2", (4, 6, 6), 1), _candidate("2.2", (10, 6, 6), 0)],
    )
    cases = {c.case_id: c for c in iter_luna16_cases(tmp_path, ann, cand)}
    assert cases["2.1"].label == 1 and cases["2.1"].slice_labels is not None
    assert cases["2.2"].label == 1 and cases["2.2"].slice_labels is None  # was label 0
    assert cases["2.3"].label == 0  # no row anywhere, with annotations.csv given: a labelled negative
    assert cases["2.3"].slice_labels is not None and not cases["2.3"].slice_labels.any()
