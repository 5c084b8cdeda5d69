"""One physical phantom, every source format and patient orientation: one canonical array.

The phantom is defined in the canonical frame (slice toward the feet, rows toward posterior,
columns toward the patient's left) at fixed patient LPS positions.  It is then *acquired* as
each source would store it -- DICOM head/feet first, supine/prone, coronal and sagittal; NIfTI
with RAS and LPS axes; LUNA16 mhd -- by an index bookkeeping written here independently of the
code under test.  Every reader, and the node's ``assemble_volume``, must give back the same
array, the same spacing and the nodules at the same voxels.  highdicom's
``Volume.to_patient_orientation("FPL")`` is the outside reference for the DICOM geometry.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from ctseries import make_series, write_series
from fixtures_models import phantom_volume, tiny_models_dir  # noqa: F401  (fixture)
from stores import open_test_store

from medclf_node.config import VolumeSection, parse_config
from medclf_node.domain import Code, ModelResult, NodeIdentity
from medclf_node.inference.registry import ModelRegistry
from medclf_node.ingest.spool import Spool
from medclf_node.ingest.volume import assemble_volume, canonical_reorientation
from medclf_node.pipeline import Pipeline
from medclf_node.reporting.sc import build_sc, slice_orientation
from medclf_node.store import Store
from medclf_node.synthetic.phantoms import Phantom, make_phantom
from training.data.readers import read_dicom_series, read_luna16_case, read_nifti_case
from training.data.truth import truth_for_phantom, write_truth

SHAPE = (16, 48, 44)  # every extent different, so a swapped axis cannot pass
SPACING = (15.0, 7.5, 8.2)  # (slice, row, column) mm, all different (a chest-sized field of view)
ORIGIN = (-176.3, -176.25, 40.0)  # LPS mm of canonical voxel (0, 0, 0)
#: LPS direction of the canonical axes (slice, row, column): feet, posterior, left.
CANONICAL = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])

#: name -> (Image Orientation (Patient) row cosine, column cosine, Patient Position)
DICOM_ACQUISITIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...], str]] = {
    "HFS": ((1, 0, 0), (0, 1, 0), "HFS"),
    "HFP": ((-1, 0, 0), (0, -1, 0), "HFP"),
    "FFS": ((-1, 0, 0), (0, 1, 0), "FFS"),
    "FFP": ((1, 0, 0), (0, -1, 0), "FFP"),
    "coronal": ((1, 0, 0), (0, 0, -1), "HFS"),
    "sagittal": ((0, 1, 0), (0, 0, -1), "HFS"),
}
AXIAL = ("HFS", "HFP", "FFS", "FFP")


@dataclass(frozen=True)
class Acquired:
    """The phantom as stored along some acquisition axes."""

    array: npt.NDArray[np.float32]
    directions: tuple[npt.NDArray[np.float64], ...]  # LPS unit vector of each array axis
    spacing: tuple[float, float, float]
    origin: npt.NDArray[np.float64]  # LPS of array voxel (0, 0, 0)


def canonical_affine(
    spacing: Sequence[float] = SPACING, origin: Sequence[float] = ORIGIN
) -> npt.NDArray[np.float64]:
    aff = np.eye(4)
    aff[:3, :3] = CANONICAL.T * np.array(spacing)
    aff[:3, 3] = origin
    return aff


def acquire(
    hu: npt.NDArray[np.float32],
    directions: Sequence[Sequence[float]],
    spacing: Sequence[float] = SPACING,
    origin: Sequence[float] = ORIGIN,
) -> Acquired:
    """Store ``hu`` (canonical) along array axes pointing to ``directions`` (axis-aligned)."""
    shape = hu.shape
    dirs = [np.asarray(d, dtype=np.float64) for d in directions]
    axes = [int(np.argmax(np.abs(CANONICAL @ d))) for d in dirs]  # canonical axis of each array axis
    signs = [float(np.sign(CANONICAL[j] @ d)) for j, d in zip(axes, dirs, strict=True)]
    assert sorted(axes) == [0, 1, 2]
    arr = hu.transpose(axes)
    arr = arr[tuple(slice(None, None, -1) if s < 0 else slice(None) for s in signs)]
    corner = [0 if s > 0 else shape[j] - 1 for j, s in zip(axes, signs, strict=True)]
    index = np.zeros(3)
    for a, j in enumerate(axes):
        index[j] = corner[a]
    corner_lps = (canonical_affine(spacing, origin) @ np.array([*index, 1.0]))[:3]
    acq_spacing = (spacing[axes[0]], spacing[axes[1]], spacing[axes[2]])
    return Acquired(np.ascontiguousarray(arr), tuple(dirs), acq_spacing, corner_lps)


def write_dicom(
    hu: npt.NDArray[np.float32],
    name: str,
    directory: Path,
    patient_id: str = "ORIENT1",
    spacing: Sequence[float] = SPACING,
    origin: Sequence[float] = ORIGIN,
) -> tuple[list[Path], list[pydicom.Dataset]]:
    row, col, position = DICOM_ACQUISITIONS[name]
    normal = np.cross(row, col)
    acq = acquire(hu, [-normal, col, row], spacing, origin)  # DICOM stacks slices along -normal
    positions = [acq.origin + k * acq.spacing[0] * acq.directions[0] for k in range(acq.array.shape[0])]
    datasets = make_series(
        acq.array, [tuple(p) for p in positions], orientation=(*row, *col), pixel_spacing=acq.spacing[1:],
        slice_thickness=acq.spacing[0],
    )
    for ds in datasets:
        ds.PatientPosition = position
        ds.PatientID = patient_id
    paths = write_series(datasets[::-1] if name == "HFP" else datasets, directory)  # file order irrelevant
    return paths, datasets


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(11, shape=SHAPE, spacing=SPACING, nodules=2)


@pytest.fixture(scope="module")
def hu(phantom: Phantom) -> npt.NDArray[np.float32]:
    """The physical HU, integers in the 12-bit CT range so every format stores them exactly."""
    return np.clip(np.rint(phantom.hu), -1024, 3071).astype(np.float32)


def nodule_lps(phantom: Phantom) -> list[npt.NDArray[np.float64]]:
    return [(canonical_affine() @ np.array([*n.center_zyx, 1.0]))[:3] for n in phantom.nodules]


def test_phantom_has_nodules_and_no_symmetry(phantom: Phantom, hu: npt.NDArray[np.float32]) -> None:
    assert len(phantom.nodules) == 2
    for axis in range(3):
        assert not np.array_equal(hu, np.flip(hu, axis))  # a wrong flip would show


@pytest.mark.parametrize("name", sorted(DICOM_ACQUISITIONS))
def test_dicom_every_orientation_through_the_node(
    name: str, phantom: Phantom, hu: npt.NDArray[np.float32], tmp_path: Path
) -> None:
    paths, datasets = write_dicom(hu, name, tmp_path / name)
    vol = assemble_volume(paths, VolumeSection())
    np.testing.assert_array_equal(vol.array, hu)
    assert vol.array.flags.c_contiguous
    assert vol.spacing == pytest.approx(SPACING)
    np.testing.assert_allclose(vol.affine, canonical_affine(), atol=1e-6)
    for lps, n in zip(nodule_lps(phantom), phantom.nodules, strict=True):
        voxel = (np.linalg.inv(vol.affine) @ np.array([*lps, 1.0]))[:3]
        np.testing.assert_allclose(voxel, n.center_zyx, atol=1e-6)
    # highdicom, put into the same patient orientation, agrees.
    ref = hd.get_volume_from_series(datasets).to_patient_orientation("FPL")
    np.testing.assert_array_equal(vol.array, ref.array.astype(np.float32))
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)
    # Slice references name real instances of the series; for axial stacks the one at that slice.
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    assert len(vol.slice_refs) == SHAPE[0] and all(r.sop_instance_uid in by_uid for r in vol.slice_refs)
    if name in AXIAL:
        z = [float(by_uid[r.sop_instance_uid].ImagePositionPatient[2]) for r in vol.slice_refs]
        np.testing.assert_allclose(z, vol.affine[2, 3] - np.arange(SHAPE[0]) * SPACING[0], atol=1e-6)
        assert (name == "HFS") == (vol.notes == ())
    else:
        assert len({r.sop_instance_uid for r in vol.slice_refs}) == 1
        middle = sorted(datasets, key=lambda ds: -float(np.cross(*np.reshape(ds.ImageOrientationPatient, (2, 3)))
                                                         @ np.asarray(ds.ImagePositionPatient, dtype=float)))
        assert vol.slice_refs[0].sop_instance_uid == middle[(len(middle) - 1) // 2].SOPInstanceUID
        assert any(f"{name} acquisition" in note for note in vol.notes)


def test_resampled_gap_is_the_same_in_every_axial_position(hu: npt.NDArray[np.float32], tmp_path: Path) -> None:
    """A missing slice is interpolated in the acquisition frame, then reoriented: same result."""
    z_missing = ORIGIN[2] - 5 * SPACING[0]
    vols = {}
    for name in ("HFS", "HFP", "FFS"):
        _, datasets = write_dicom(hu, name, tmp_path / name)
        kept = [ds for ds in datasets if abs(float(ds.ImagePositionPatient[2]) - z_missing) > 1e-3]
        assert len(kept) == SHAPE[0] - 1
        vols[name] = assemble_volume(write_series(kept, tmp_path / f"{name}-gap"), VolumeSection())
        by_uid = {str(ds.SOPInstanceUID): ds for ds in kept}
        z = [float(by_uid[r.sop_instance_uid].ImagePositionPatient[2]) for r in vols[name].slice_refs]
        grid = ORIGIN[2] - np.arange(SHAPE[0]) * SPACING[0]
        assert np.all(np.abs(np.asarray(z) - grid) <= SPACING[0])  # each slice names its nearest source
    for name, vol in vols.items():
        assert vol.shape == SHAPE, name
        np.testing.assert_allclose(vol.array, vols["HFS"].array, atol=1e-3, err_msg=name)
        np.testing.assert_allclose(vol.affine, canonical_affine(), atol=1e-6)
    np.testing.assert_array_equal(np.delete(vols["HFP"].array, 5, axis=0), np.delete(hu, 5, axis=0))


@pytest.mark.parametrize("name", ["HFP", "FFS", "sagittal"])
def test_dicom_through_the_training_reader(
    name: str, phantom: Phantom, hu: npt.NDArray[np.float32], tmp_path: Path
) -> None:
    paths, _ = write_dicom(hu, name, tmp_path / name, patient_id=phantom.patient_id)
    truth = write_truth(truth_for_phantom(phantom, origin=ORIGIN), tmp_path / "truth.json")
    case = read_dicom_series(paths, truth_path=truth)
    np.testing.assert_array_equal(case.hu, hu)
    assert case.spacing == pytest.approx(SPACING)
    assert [c.center_zyx for c in case.candidates] == [tuple(map(float, n.center_zyx)) for n in phantom.nodules]
    assert case.slice_labels is not None and case.slice_labels.tolist() == phantom.slice_labels.tolist()


def _mask(phantom: Phantom) -> npt.NDArray[np.uint8]:
    """A 3x3x3 cube at each nodule centre: its centroid is the centre exactly."""
    mask = np.zeros(SHAPE, dtype=np.uint8)
    for n in phantom.nodules:
        z, y, x = n.center_zyx
        mask[z - 1 : z + 2, y - 1 : y + 2, x - 1 : x + 2] = 1
    return mask


@pytest.mark.parametrize("axes", ["RAS", "LPS", "PIR"])
def test_nifti_any_axes(axes: str, phantom: Phantom, hu: npt.NDArray[np.float32], tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    lps_of = {"R": (-1, 0, 0), "L": (1, 0, 0), "A": (0, -1, 0), "P": (0, 1, 0), "I": (0, 0, -1), "S": (0, 0, 1)}
    dirs = [lps_of[c] for c in axes]  # NIfTI array axes (i, j, k) point to these patient directions
    img, mask = acquire(hu, dirs), acquire(_mask(phantom).astype(np.float32), dirs)
    to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = to_ras @ np.stack(img.directions, axis=1) * np.array(img.spacing)
    affine[:3, 3] = to_ras @ img.origin
    nib.save(nib.Nifti1Image(img.array, affine), tmp_path / "case.nii.gz")
    nib.save(nib.Nifti1Image(mask.array.astype(np.uint8), affine), tmp_path / "case_mask.nii.gz")
    case = read_nifti_case(tmp_path / "case.nii.gz", mask_path=tmp_path / "case_mask.nii.gz")
    np.testing.assert_array_equal(case.hu, hu)
    assert case.spacing == pytest.approx(SPACING)
    got = sorted(c.center_zyx for c in case.candidates)
    np.testing.assert_allclose(got, sorted(tuple(map(float, n.center_zyx)) for n in phantom.nodules), atol=1e-6)


def _write_mhd(acq: Acquired, path: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    img = sitk.GetImageFromArray(acq.array.astype(np.int16))  # numpy (a0, a1, a2) = ITK index (z, y, x)
    img.SetSpacing((acq.spacing[2], acq.spacing[1], acq.spacing[0]))
    img.SetOrigin(tuple(float(v) for v in acq.origin))
    img.SetDirection(tuple(float(v) for v in np.stack(acq.directions[::-1], axis=1).ravel()))
    sitk.WriteImage(img, str(path))


@pytest.mark.parametrize(
    "directions",
    [
        ((0, 0, 1), (0, 1, 0), (1, 0, 0)),  # the LUNA16 layout: identity direction, z up
        ((0, 0, -1), (0, -1, 0), (-1, 0, 0)),  # reversed axes
        ((0, -1, 0), (0, 0, -1), (1, 0, 0)),  # a coronal stack
    ],
    ids=["luna16", "reversed", "coronal"],
)
def test_luna16_mhd_any_direction(
    directions: tuple[tuple[int, ...], ...], phantom: Phantom, hu: npt.NDArray[np.float32], tmp_path: Path
) -> None:
    acq = acquire(hu, directions)
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.9"
    _write_mhd(acq, tmp_path / f"{uid}.mhd")
    rows = [
        {"seriesuid": uid, "coordX": str(p[0]), "coordY": str(p[1]), "coordZ": str(p[2]),
         "diameter_mm": str(2 * n.radius_mm)}
        for p, n in zip(nodule_lps(phantom), phantom.nodules, strict=True)
    ]
    case = read_luna16_case(tmp_path / f"{uid}.mhd", annotations=rows)
    np.testing.assert_array_equal(case.hu, hu)
    assert case.spacing == pytest.approx(SPACING)
    for c, n in zip(case.candidates, phantom.nodules, strict=True):
        np.testing.assert_allclose(c.center_zyx, n.center_zyx, atol=1e-4)
    assert case.slice_labels is not None and case.slice_labels.tolist() == phantom.slice_labels.tolist()


def test_every_source_gives_one_array(phantom: Phantom, hu: npt.NDArray[np.float32], tmp_path: Path) -> None:
    """The headline: HFS, HFP, FFS DICOM, RAS/LPS NIfTI and LUNA16 mhd, one identical array."""
    nib = pytest.importorskip("nibabel")
    arrays: dict[str, npt.NDArray[np.float32]] = {}
    for name in ("HFS", "HFP", "FFS"):
        paths, _ = write_dicom(hu, name, tmp_path / name)
        arrays[f"dicom-{name}"] = assemble_volume(paths, VolumeSection()).array
    for axes, dirs in {"RAS": ((-1, 0, 0), (0, -1, 0), (0, 0, 1)), "LPS": ((1, 0, 0), (0, 1, 0), (0, 0, 1))}.items():
        img = acquire(hu, dirs)
        affine = np.eye(4)
        affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ np.stack(img.directions, axis=1) * np.array(img.spacing)
        affine[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ img.origin
        nib.save(nib.Nifti1Image(img.array, affine), tmp_path / f"{axes}.nii")
        arrays[f"nifti-{axes}"] = read_nifti_case(tmp_path / f"{axes}.nii").hu
    _write_mhd(acquire(hu, ((0, 0, 1), (0, 1, 0), (1, 0, 0))), tmp_path / "1.2.3.mhd")
    arrays["luna16"] = read_luna16_case(tmp_path / "1.2.3.mhd").hu
    for name, arr in arrays.items():
        np.testing.assert_array_equal(arr, hu, err_msg=name)


def test_canonical_reorientation_of_known_frames() -> None:
    """Head-first supine axial is the identity (the shipped models' input stays byte-identical)."""
    hfs = np.column_stack([(0, 0, -2.5), (0, 0.7, 0), (0.8, 0, 0)])
    assert canonical_reorientation(hfs).is_identity
    hfp = np.column_stack([(0, 0, -2.5), (0, -0.7, 0), (-0.8, 0, 0)])
    ro = canonical_reorientation(hfp)
    assert ro.perm == (0, 1, 2) and ro.flip == (False, True, True) and ro.acquisition_codes() == "IAR"
    sag = np.column_stack([(1.0, 0, 0), (0, 0, -1.0), (0, 1.0, 0)])
    ro = canonical_reorientation(sag)
    assert ro.perm == (1, 2, 0) and not any(ro.flip) and ro.max_angle_deg == pytest.approx(0.0)
    with pytest.raises(ValueError, match="span"):
        canonical_reorientation(np.column_stack([(1.0, 0, 0), (1.0, 0, 0), (0, 1.0, 0)]))


def test_luna16_candidates_csv_in_any_direction_matches_annotations(phantom: Phantom, tmp_path: Path) -> None:
    """candidates.csv coordinates go through the same reorientation as the pixels."""
    hu = np.zeros(SHAPE, dtype=np.float32)
    acq = acquire(hu, ((0, -1, 0), (0, 0, -1), (1, 0, 0)))
    _write_mhd(acq, tmp_path / "9.9.mhd")
    lps = nodule_lps(phantom)[0]
    with open(tmp_path / "c.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "class"])
        w.writerow(["9.9", *lps, 1])
    with open(tmp_path / "c.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    case = read_luna16_case(tmp_path / "9.9.mhd", candidates=rows)
    np.testing.assert_allclose(case.candidates[0].center_zyx, phantom.nodules[0].center_zyx, atol=1e-4)


NODE_SHAPE = (24, 96, 96)  # the tiny test models' geometry (tests/test_pipeline.py)
NODE_SPACING = (2.5, 3.5, 3.5)
NODULE_MM = (30.0, 168.0, 100.0, 12.0)  # inside the phantom's left lung


def _report(pipeline: Pipeline, index: Store, spool: Spool, paths: list[Path]) -> tuple[float, Any, Any]:
    uid = ""
    for p in paths:
        uid = spool.store(p.read_bytes(), calling_ae="PACS", assoc_id="a").record.series_uid
    assert index.mark_complete(uid, "forced")
    row = index.claim_next_complete("w")
    assert row is not None and pipeline.process(row) == "reported"
    (result,) = index.results(uid)
    items = {i.kind: i for i in index.outbox_items(uid)}
    return result.probability, items["SR"], items["SC"]


def _sr_key_refs(sr: pydicom.Dataset) -> set[str]:
    found: set[str] = set()

    def walk(items: Sequence[pydicom.Dataset]) -> None:
        for item in items:
            if "ReferencedSOPSequence" in item and item.get("ValueType") == "IMAGE":
                found.update(str(r.ReferencedSOPInstanceUID) for r in item.ReferencedSOPSequence)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def _sr_point_lps(sr: pydicom.Dataset, by_uid: dict[str, pydicom.Dataset]) -> npt.NDArray[np.float64]:
    """Patient position (LPS mm) of the SR's SCOORD POINT, through the geometry of the image it is INFERRED FROM."""
    found: list[tuple[list[float], str]] = []

    def walk(items: Sequence[pydicom.Dataset]) -> None:
        for item in items:
            if item.get("ValueType") == "SCOORD":
                (ref,) = [c for c in item.ContentSequence if c.get("ValueType") == "IMAGE"]
                found.append(([float(v) for v in item.GraphicData],
                              str(ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    ((column, row), uid), = found
    src = by_uid[uid]
    iop = np.asarray([float(v) for v in src.ImageOrientationPatient])
    dr, dc = (float(v) for v in src.PixelSpacing)
    return np.asarray([float(v) for v in src.ImagePositionPatient]) + (column - 0.5) * dc * iop[:3] + \
        (row - 0.5) * dr * iop[3:]


def test_node_reports_every_patient_position_alike(tmp_path: Path, tiny_models_dir: Path) -> None:  # noqa: F811
    """Same anatomy, same probability; SR and SC name real source instances of each series."""
    cfg = parse_config({
        "node": {"data_dir": str(tmp_path / "data")},
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        "results": {"destinations": ["pacs"]},
        "models": {"directory": str(tiny_models_dir)},
        "rules": [{"name": "ct", "models": ["test-2p5d-int8"], "min_slices": 3}],
    })
    index = open_test_store(cfg.node.data_dir)
    spool = Spool(cfg.node.data_dir, index)
    pipeline = Pipeline(cfg, index, ModelRegistry.from_config(cfg))
    hu = np.clip(np.rint(phantom_volume(NODE_SHAPE, NODE_SPACING, NODULE_MM, seed=3)), -1024, 3071).astype(np.float32)
    origin = (-166.25, -166.25, 0.0)
    probability: dict[str, float] = {}
    points: dict[str, npt.NDArray[np.float64]] = {}
    for name in ("HFS", "HFP", "FFS", "sagittal"):
        paths, datasets = write_dicom(hu, name, tmp_path / name, spacing=NODE_SPACING, origin=origin)
        probability[name], sr_item, sc_item = _report(pipeline, index, spool, paths)
        instances = {str(ds.SOPInstanceUID) for ds in datasets}
        sr = pydicom.dcmread(cfg.node.data_dir / sr_item.path)
        sc = pydicom.dcmread(cfg.node.data_dir / sc_item.path)
        key = _sr_key_refs(sr)
        assert len(key) == 1 and key <= instances, name
        assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) in instances
        if name != "sagittal":  # sagittal: the SR points into the image holding the finding, the SC's
            assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) in key  # axial slice cuts them all
        assert list(sc.PatientOrientation) == ["L", "P"], name  # the key image shows a canonical slice
        evidence = {str(r.ReferencedSOPInstanceUID) for e in sr.CurrentRequestedProcedureEvidenceSequence
                    for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
        assert evidence == instances, name  # every evaluated image, also for the sagittal stack
        by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
        points[name] = _sr_point_lps(sr, by_uid)
    assert probability["HFP"] == pytest.approx(probability["HFS"], abs=1e-6)
    for name in ("HFP", "FFS", "sagittal"):  # the SR's image region marks the same anatomy in every position
        assert np.linalg.norm(points[name] - points["HFS"]) < 0.5 * max(NODE_SPACING) + 1e-3, (name, points)
    assert probability["FFS"] == pytest.approx(probability["HFS"], abs=1e-6)
    assert probability["sagittal"] == pytest.approx(probability["HFS"], abs=1e-6)


@pytest.mark.parametrize("name", ["HFS", "HFP", "FFS", "sagittal", "coronal"])
def test_key_image_orientation_follows_the_canonical_pixels(
    name: str, hu: npt.NDArray[np.float32], tmp_path: Path
) -> None:
    """The SC shows ``volume.array[k]``: its PatientOrientation comes from the volume, not the source's IOP."""
    paths, datasets = write_dicom(hu, name, tmp_path / name)
    vol = assemble_volume(paths, VolumeSection())
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    result = ModelResult(
        model_name="m", model_version="1", finding=Code("0", "99MEDCLF", "x"), probability=0.9, threshold=0.5,
        positive=True, key_slice_index=5,
    )
    assert slice_orientation(vol.affine) == ("L", "P")
    source = by_uid[vol.slice_refs[5].sop_instance_uid]
    sc = build_sc(source, vol.array[5], result, NodeIdentity("N", "n"), orientation=slice_orientation(vol.affine))
    assert list(sc.PatientOrientation) == ["L", "P"]
    assert {r.sop_instance_uid for r in vol.sources} == set(by_uid)  # every image went into the array
