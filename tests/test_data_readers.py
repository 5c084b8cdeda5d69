"""Readers: DICOM folders (via the node's assemble_volume), LUNA16 mhd/raw + CSV, NIfTI + mask."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from medclf_node.synthetic.dicom_writer import hu_to_stored
from medclf_node.synthetic.phantoms import Phantom, make_phantom
from training.data.readers import iter_cases, iter_dicom_cases, iter_luna16_cases, iter_nifti_cases
from training.data.synth import iter_synthesize, write_index

SHAPE = (16, 48, 48)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(7, shape=SHAPE, nodules=2)


def _stored(hu: np.ndarray) -> np.ndarray:
    return hu_to_stored(hu).astype(np.float32) - 1024.0


def test_dicom_folders_with_truth(tmp_path: Path) -> None:
    cases = list(iter_synthesize(tmp_path, 3, seed=40, shape=SHAPE, positive_fraction=2 / 3))
    write_index(tmp_path, cases)
    assert sorted(c.label for c in cases) == [0, 1, 1]
    read = {c.patient_id: c for c in iter_dicom_cases(tmp_path)}
    assert set(read) == {c.patient_id for c in cases}
    for sc in cases:
        ph = make_phantom(sc.seed, shape=SHAPE, spacing=sc.spacing, nodules=sc.n_nodules)
        case = read[sc.patient_id]
        np.testing.assert_array_equal(case.hu, _stored(ph.hu))
        assert case.spacing == pytest.approx(sc.spacing)
        assert case.label == ph.label and case.series_instance_uid == sc.series_instance_uid
        assert case.slice_labels is not None and case.slice_labels.tolist() == ph.slice_labels.tolist()
        assert [c.center_zyx for c in case.candidates] == [tuple(map(float, n.center_zyx)) for n in ph.nodules]


def test_synth_is_reproducible(tmp_path: Path) -> None:
    a = list(iter_synthesize(tmp_path / "a", 1, seed=3, shape=(8, 32, 32)))
    b = list(iter_synthesize(tmp_path / "b", 1, seed=3, shape=(8, 32, 32)))
    assert a == b
    fa = sorted((tmp_path / "a").rglob("*.dcm"))
    fb = sorted((tmp_path / "b").rglob("*.dcm"))
    assert [f.read_bytes() for f in fa] == [f.read_bytes() for f in fb]


def test_luna16_mhd_and_csv(phantom: Phantom, tmp_path: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    nz, ny, nx = SHAPE
    sz, sy, sx = phantom.spacing
    img = sitk.GetImageFromArray(np.rint(phantom.hu[::-1]).astype(np.int16))  # ITK: index z runs superior
    origin = (-100.0, -80.0, -300.0)
    img.SetSpacing((sx, sy, sz))
    img.SetOrigin(origin)
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.1"
    (tmp_path / "subset0").mkdir()
    sitk.WriteImage(img, str(tmp_path / "subset0" / f"{uid}.mhd"))
    sitk.WriteImage(img[:, :, :4], str(tmp_path / "subset0" / "1.2.3.mhd"))  # an unannotated scan
    ann = tmp_path / "annotations.csv"
    with open(ann, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        for n in phantom.nodules:
            z, y, x = n.center_zyx
            w.writerow([uid, origin[0] + x * sx, origin[1] + y * sy, origin[2] + (nz - 1 - z) * sz, 2 * n.radius_mm])
    cand = tmp_path / "candidates.csv"
    with open(cand, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "class"])
        w.writerow([uid, origin[0], origin[1], origin[2], 0])
    cases = {c.case_id: c for c in iter_luna16_cases(tmp_path, ann, cand)}
    case = cases[uid]
    np.testing.assert_array_equal(case.hu, np.rint(phantom.hu))
    assert case.spacing == pytest.approx(phantom.spacing)
    assert case.label == 1 and case.patient_id == uid
    pos = [c for c in case.candidates if c.label == 1]
    for c, n in zip(pos, phantom.nodules, strict=True):
        np.testing.assert_allclose(c.center_zyx, n.center_zyx, atol=1e-3)
    (neg,) = [c for c in case.candidates if c.label == 0]
    np.testing.assert_allclose(neg.center_zyx, (nz - 1, 0, 0), atol=1e-3)  # world origin = bottom slice
    assert case.slice_labels is not None and case.slice_labels.tolist() == phantom.slice_labels.tolist()
    assert cases["1.2.3"].label == 0 and cases["1.2.3"].candidates == ()


def test_nifti_ras_reoriented_with_mask(phantom: Phantom, tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    sz, sy, sx = phantom.spacing
    # Typical NIfTI: array axes (i, j, k) along +R, +A, +S with a RAS affine.
    ras = np.transpose(phantom.hu[::-1, ::-1, ::-1], (2, 1, 0)).astype(np.float32)
    affine = np.diag([sx, sy, sz, 1.0])
    nib.save(nib.Nifti1Image(ras, affine), tmp_path / "case01.nii.gz")
    mask = np.zeros(phantom.hu.shape, dtype=np.uint8)
    for n in phantom.nodules:
        z, y, x = n.center_zyx
        mask[z, y - 1 : y + 2, x - 1 : x + 2] = 1
    nib.save(nib.Nifti1Image(np.transpose(mask[::-1, ::-1, ::-1], (2, 1, 0)), affine), tmp_path / "case01_mask.nii.gz")
    nib.save(nib.Nifti1Image(ras[:, :, :5], affine), tmp_path / "case02.nii")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,patient_id,label\ncase02.nii,PAT-2,0\n")
    cases = {c.case_id: c for c in iter_nifti_cases(tmp_path, labels)}
    assert set(cases) == {"case01", "case02"}
    c1 = cases["case01"]
    np.testing.assert_allclose(c1.hu, phantom.hu, atol=1e-3)
    assert c1.spacing == pytest.approx(phantom.spacing)
    assert c1.label == 1 and c1.patient_id == "case01"
    got = sorted(tuple(round(v) for v in c.center_zyx) for c in c1.candidates)
    assert got == sorted(n.center_zyx for n in phantom.nodules)
    assert c1.slice_labels is not None
    assert set(np.flatnonzero(c1.slice_labels)) == {n.center_zyx[0] for n in phantom.nodules}
    c2 = cases["case02"]
    assert c2.patient_id == "PAT-2" and c2.label == 0 and c2.slice_labels is None


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown format"):
        iter_cases("analyze", tmp_path)


def test_dicom_labels_csv_without_sidecar(tmp_path: Path) -> None:
    from medclf_node.synthetic.dicom_writer import write_ct_series

    ph = make_phantom(8, shape=(8, 32, 32), nodules=0)
    write_ct_series(ph.hu, ph.spacing, tmp_path / "a", patient_id="PAT-A", series_uid="1.2.3.4")
    write_ct_series(ph.hu, ph.spacing, tmp_path / "b", patient_id="PAT-B")
    write_ct_series(ph.hu, ph.spacing, tmp_path / "c", patient_id="PAT-C")
    labels = tmp_path / "labels.csv"
    labels.write_text("series_instance_uid,patient_id,label\n1.2.3.4,,1\n,PAT-B,0\n")
    got = {c.patient_id: c.label for c in iter_cases("dicom", tmp_path, labels_csv=labels)}
    assert got == {"PAT-A": 1, "PAT-B": 0, "PAT-C": None}
