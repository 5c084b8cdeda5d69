"""Read labelled CT cases from DICOM folders, LUNA16 (mhd/raw + CSV) and NIfTI.

Every reader yields :class:`Case` in the node's array convention -- (slice, row, column),
slice 0 most superior and the index running toward the feet, rows toward posterior, columns
toward the patient's left (``medclf_node.ingest.volume``) -- so training sees the same
orientation as serving, whatever the patient position (head/feet first, supine/prone) or
acquisition plane (axial, coronal, sagittal) of the source.  DICOM goes through the node's own
``assemble_volume`` so geometry and HU are identical to what the node computes; LUNA16 uses the
node's ``canonical_reorientation`` on the mhd direction, NIfTI nibabel's reorientation to the
same axes (I, P, L).  Oblique sources go to their nearest patient axes in all three.

Labels: series-level ``label``, per-slice ``slice_labels`` and ``candidates`` (voxel centres
in this convention with a radius and a 0/1 class) when the format has them.  A slice is
positive when it cuts a nodule's cross-section of at least half its radius (the same rule
as the phantoms' ground truth).
"""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.errors import InvalidDicomError

from medclf_node.config import VolumeSection
from medclf_node.ingest.volume import OBLIQUE_NOTE_DEG, Reorientation, assemble_volume, canonical_reorientation
from medclf_node.synthetic.phantoms import SLICE_LABEL_MIN_SECTION
from training.data.truth import TRUTH_FILENAME, SeriesTruth, read_truth

log = logging.getLogger(__name__)


class ReaderError(ValueError):
    """A case cannot be read or its labels do not fit its pixels."""


@dataclass(frozen=True)
class Candidate:
    """A location of interest: voxel centre (slice, row, column, may be fractional), radius, class."""

    center_zyx: tuple[float, float, float]
    radius_mm: float | None
    label: int


@dataclass(frozen=True)
class Case:
    """One CT series with whatever labels its format carries (None where unknown)."""

    hu: npt.NDArray[np.float32]
    spacing: tuple[float, float, float]
    patient_id: str
    case_id: str
    source: str
    label: int | None = None
    slice_labels: npt.NDArray[np.uint8] | None = None
    candidates: tuple[Candidate, ...] = field(default=())
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.hu.shape
        return (int(s[0]), int(s[1]), int(s[2]))


def slice_labels_from_candidates(
    candidates: Iterable[Candidate], n_slices: int, slice_mm: float
) -> npt.NDArray[np.uint8]:
    """Per-slice labels from positive candidates with a radius (same rule as the phantoms)."""
    labels = np.zeros(n_slices, dtype=np.uint8)
    reach = math.sqrt(1.0 - SLICE_LABEL_MIN_SECTION**2)
    k = np.arange(n_slices)
    for c in candidates:
        if c.label and c.radius_mm:
            labels[np.abs(k - c.center_zyx[0]) * slice_mm <= c.radius_mm * reach] = 1
    return labels


# --------------------------------------------------------------------------- DICOM


def _dicom_groups(directory: Path) -> dict[str, list[Path]]:
    """Files of ``directory`` (not recursive) grouped by SeriesInstanceUID; non-DICOM files skipped."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for p in sorted(directory.iterdir()):
        if not p.is_file() or p.suffix.lower() in (".json", ".csv", ".txt", ".md"):
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError) as exc:
            log.debug("skip %s: %s", p, exc)
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid:
            groups[uid].append(p)
    return dict(groups)


def _find_truth(series_dir: Path) -> Path | None:
    for cand in (series_dir / TRUTH_FILENAME, series_dir.parent / TRUTH_FILENAME):
        if cand.is_file():
            return cand
    return None


def _check_truth_positions(truth: SeriesTruth, affine: npt.NDArray[np.float64], source: Path) -> None:
    """Refuse truth whose voxel centres are not where its LPS centres fall in this volume.

    Truth voxel coordinates are in the canonical array orientation; a sidecar written in
    another one (e.g. a prone series' acquisition order) would label the wrong slices.
    """
    inverse = np.linalg.inv(affine)
    for n in truth.nodules:
        voxel = (inverse @ np.array([*n.center_lps_mm, 1.0]))[:3]
        if float(np.abs(voxel - np.asarray(n.center_zyx, dtype=float)).max()) > 0.5:
            raise ReaderError(
                f"{source}: nodule at LPS {list(n.center_lps_mm)} mm is voxel {voxel.round(2).tolist()} of the "
                f"volume but the truth says {list(n.center_zyx)}; truth voxels must be in the canonical "
                "orientation (slice 0 most superior, rows posterior, columns to the left)"
            )


def _labels_from_truth(truth: SeriesTruth, shape: tuple[int, int, int], source: Path) -> dict[str, Any]:
    if tuple(truth.shape) != shape:
        raise ReaderError(f"{source}: truth shape {truth.shape} does not match the volume {shape}")
    return {
        "label": truth.label,
        "slice_labels": np.asarray(truth.slice_labels, dtype=np.uint8),
        "candidates": tuple(
            Candidate(tuple(float(v) for v in n.center_zyx), n.radius_mm, 1)  # type: ignore[arg-type]
            for n in truth.nodules
        ),
    }


def read_dicom_series(
    paths: Sequence[Path],
    *,
    policy: VolumeSection | None = None,
    truth_path: Path | None = None,
    source: str | None = None,
) -> Case:
    """One series from its instance files, through the node's ``assemble_volume``."""
    if not paths:
        raise ReaderError("no DICOM files given")
    vol = assemble_volume(list(paths), policy or VolumeSection())
    head = pydicom.dcmread(paths[0], stop_before_pixels=True, specific_tags=["PatientID"])
    patient_id = str(head.get("PatientID", "")) or vol.study_instance_uid
    labels: dict[str, Any] = {}
    if truth_path is not None:
        truth = read_truth(truth_path)
        if truth.series_instance_uid and truth.series_instance_uid != vol.series_instance_uid:
            raise ReaderError(
                f"{truth_path}: truth is for series {truth.series_instance_uid}, not {vol.series_instance_uid}"
            )
        if truth.patient_id != patient_id:
            raise ReaderError(f"{truth_path}: truth patient {truth.patient_id!r} but DICOM PatientID {patient_id!r}")
        labels = _labels_from_truth(truth, vol.shape, truth_path)
        _check_truth_positions(truth, vol.affine, truth_path)
    return Case(
        hu=vol.array,
        spacing=vol.spacing,
        patient_id=patient_id,
        case_id=vol.series_instance_uid,
        source=source or str(Path(paths[0]).parent),
        study_instance_uid=vol.study_instance_uid,
        series_instance_uid=vol.series_instance_uid,
        **labels,
    )


def _read_label_table(path: Path | None, keys: Sequence[str]) -> dict[str, int]:
    """``key -> label`` from a CSV with a ``label`` column and any of ``keys`` as ID columns."""
    table: dict[str, int] = {}
    if path is None:
        return table
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row.get("label", "") == "":
                continue
            for k in keys:
                if row.get(k):
                    table[row[k]] = int(row["label"])
    return table


def iter_dicom_cases(
    root: Path, *, policy: VolumeSection | None = None, labels_csv: Path | None = None
) -> Iterator[Case]:
    """Every series under ``root`` (any depth).

    Labels come from a ``truth.json`` beside or above the series folder, else from
    ``labels_csv`` (columns ``series_instance_uid`` and/or ``patient_id``, and ``label``; a
    series-level label only), else the case is unlabelled.
    """
    table = _read_label_table(labels_csv, ("series_instance_uid", "patient_id"))
    dirs = sorted({p.parent for p in Path(root).rglob("*") if p.is_file()})
    for d in dirs:
        groups = _dicom_groups(d)
        if len(groups) > 1:
            log.warning("%s holds %d series; truth sidecars only apply to single-series folders", d, len(groups))
        for uid, files in sorted(groups.items()):
            truth = _find_truth(d) if len(groups) == 1 else None
            log.debug("dicom series %s: %d files in %s", uid, len(files), d)
            case = read_dicom_series(files, policy=policy, truth_path=truth, source=str(d))
            if case.label is None:
                label = table.get(uid, table.get(case.patient_id))
                if label is not None:
                    case = replace(case, label=label)
            yield case


# --------------------------------------------------------------------------- LUNA16


def _itk_reorientation(direction: Sequence[float], source: Path) -> Reorientation:
    """How the (z, y, x) array of an ITK image reaches the node's canonical axes.

    The same rule as the node's DICOM path (``canonical_reorientation``): any axis-aligned
    direction, an oblique one to its nearest patient axes (logged).
    """
    d = np.asarray(direction, dtype=float).reshape(3, 3)  # columns: ITK index axes (x, y, z) in LPS
    try:
        ro = canonical_reorientation(d[:, ::-1])  # numpy axes (z, y, x) are ITK axes (2, 1, 0)
    except ValueError as exc:
        raise ReaderError(f"{source}: direction {list(direction)}: {exc}") from exc
    if ro.max_angle_deg > OBLIQUE_NOTE_DEG:
        log.warning("%s: oblique direction (%.1f deg off the patient axes) taken to the nearest axes",
                    source, ro.max_angle_deg)
    return ro


def _read_csv(path: Path | None) -> dict[str, list[dict[str, str]]]:
    rows: dict[str, list[dict[str, str]]] = defaultdict(list)
    if path is None:
        return rows
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            rows[row["seriesuid"]].append(row)
    return rows


def _covered(c: Candidate, nodules: Sequence[Candidate], spacing: tuple[float, float, float]) -> bool:
    """Whether candidate ``c`` lies inside one of the (radius-carrying) ``nodules``."""
    sp = np.asarray(spacing)
    for n in nodules:
        if n.radius_mm and float(np.linalg.norm(np.subtract(c.center_zyx, n.center_zyx) * sp)) <= n.radius_mm:
            return True
    return False


def luna16_labels(
    cands: Sequence[Candidate], n_slices: int, spacing: tuple[float, float, float]
) -> tuple[int, npt.NDArray[np.uint8] | None]:
    """Series label and slice labels of one LUNA16 scan that has CSV rows.

    The scan is positive when an annotation or a ``class`` 1 candidate marks a nodule.  Slice
    labels need each nodule's extent: annotations carry a diameter, ``candidates.csv`` does
    not.  A class-1 candidate inside an annotated nodule is covered by that annotation; when
    any class-1 candidate is not (a candidates-only positive scan), the slice labels are
    unknown (None): zeros would call the nodule's slices negative.  Without any positive the
    slice labels are all 0.
    """
    nodules = [c for c in cands if c.label == 1 and c.radius_mm]
    unsized = [c for c in cands if c.label == 1 and not c.radius_mm]
    label = int(bool(nodules or unsized))
    if any(not _covered(c, nodules, spacing) for c in unsized):
        return label, None
    return label, slice_labels_from_candidates(nodules, n_slices, spacing[0])


def read_luna16_case(
    mhd_path: Path,
    annotations: Sequence[dict[str, str]] = (),
    candidates: Sequence[dict[str, str]] = (),
) -> Case:
    """One LUNA16 scan; ``annotations``/``candidates`` are its rows of the challenge CSVs.

    LUNA16 publishes no patient ID, only the series UID (one scan per patient in the challenge
    subsets), so the series UID is the patient ID.  Coordinates are world mm (the mhd's LPS
    frame); the array is put into the node's canonical axes (any axis-aligned direction).
    Annotated nodules are positive candidates with radius diameter/2, ``candidates.csv`` rows
    add candidates with their ``class`` and no radius.  Labels: :func:`luna16_labels`; without
    any row the labels are unknown (None).
    """
    import SimpleITK as sitk  # heavy, only needed for this format

    img = sitk.ReadImage(str(mhd_path))
    arr = sitk.GetArrayFromImage(img).astype(np.float32)  # (z, y, x) of the ITK index
    if arr.ndim != 3:
        raise ReaderError(f"{mhd_path}: expected a 3-D image, got shape {arr.shape}")
    ro = _itk_reorientation(img.GetDirection(), mhd_path)
    sx, sy, sz = (float(v) for v in img.GetSpacing())
    acq_spacing = (sz, sy, sx)
    spacing = (acq_spacing[ro.perm[0]], acq_spacing[ro.perm[1]], acq_spacing[ro.perm[2]])
    hu = np.ascontiguousarray(ro.apply(arr))

    def to_zyx(row: dict[str, str]) -> tuple[float, float, float]:
        point = (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
        ix, iy, iz = img.TransformPhysicalPointToContinuousIndex(point)
        return ro.index((iz, iy, ix), arr.shape)

    cands = [Candidate(to_zyx(r), float(r["diameter_mm"]) / 2.0, 1) for r in annotations]
    cands += [Candidate(to_zyx(r), None, int(r["class"])) for r in candidates]
    label: int | None = None
    slice_labels: npt.NDArray[np.uint8] | None = None
    if annotations or candidates:
        label, slice_labels = luna16_labels(cands, hu.shape[0], spacing)
    uid = mhd_path.stem
    return Case(
        hu=hu,
        spacing=spacing,
        patient_id=uid,
        case_id=uid,
        source=str(mhd_path),
        label=label,
        slice_labels=slice_labels,
        candidates=tuple(cands),
        series_instance_uid=uid,
    )


def iter_luna16_cases(
    root: Path, annotations_csv: Path | None = None, candidates_csv: Path | None = None
) -> Iterator[Case]:
    """Every ``*.mhd`` under ``root`` with its rows of the LUNA16 CSVs.

    With ``annotations_csv`` given, a scan without any row in either file is a labelled
    negative; a scan with class-1 candidates but no annotation is positive (see
    :func:`luna16_labels`).
    """
    ann = _read_csv(annotations_csv)
    cand = _read_csv(candidates_csv)
    for mhd in sorted(Path(root).rglob("*.mhd")):
        case = read_luna16_case(mhd, ann.get(mhd.stem, []), cand.get(mhd.stem, []))
        if annotations_csv is not None and case.label is None:
            case = replace(case, label=0, slice_labels=np.zeros(case.shape[0], np.uint8))
        yield case


# --------------------------------------------------------------------------- NIfTI

NODE_AXCODES = ("I", "P", "L")  # nibabel codes of the node's (slice, row, column) directions


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _reoriented(path: Path) -> tuple[npt.NDArray[np.float32], tuple[float, float, float]]:
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    img: Any = nib.load(str(path))  # a spatial image (Nifti1/2); nibabel's stubs type it loosely
    if len(img.shape) != 3:
        raise ReaderError(f"{path}: expected a 3-D image, got shape {img.shape}")
    transform = ornt_transform(io_orientation(img.affine), axcodes2ornt(NODE_AXCODES))
    out = img.as_reoriented(transform)
    data = np.asarray(out.get_fdata(dtype=np.float32), dtype=np.float32)
    zooms = out.header.get_zooms()[:3]
    return np.ascontiguousarray(data), (float(zooms[0]), float(zooms[1]), float(zooms[2]))


def find_nifti_mask(path: Path) -> Path | None:
    """``<stem>_mask.nii[.gz]`` or ``<stem>_seg.nii[.gz]`` beside the image, if present."""
    stem = _nifti_stem(path)
    for tag in ("_mask", "_seg"):
        for ext in (".nii.gz", ".nii"):
            cand = path.with_name(stem + tag + ext)
            if cand.is_file():
                return cand
    return None


def _mask_candidates(mask: npt.NDArray[np.float32], spacing: tuple[float, float, float]) -> tuple[Candidate, ...]:
    from scipy import ndimage

    labelled, count = ndimage.label(mask > 0.5)
    if count == 0:
        return ()
    idx = list(range(1, count + 1))
    centres = ndimage.center_of_mass(mask > 0.5, labelled, idx)
    voxels = ndimage.sum_labels(np.ones_like(labelled), labelled, idx)
    voxel_mm3 = spacing[0] * spacing[1] * spacing[2]
    return tuple(
        Candidate((float(c[0]), float(c[1]), float(c[2])), float((3.0 * v * voxel_mm3 / (4.0 * math.pi)) ** (1 / 3)), 1)
        for c, v in zip(centres, np.atleast_1d(voxels), strict=True)
    )


def read_nifti_case(
    path: Path, *, mask_path: Path | None = None, patient_id: str | None = None, label: int | None = None
) -> Case:
    """A NIfTI CT volume (values taken as HU after scl_slope/inter), reoriented to the node axes.

    With a lesion mask (same grid), slice labels are "slice contains mask voxels", candidates are
    the mask's connected components (centroid, equivalent-sphere radius) and the series label is
    "mask not empty" unless ``label`` is given.
    """
    hu, spacing = _reoriented(path)
    slice_labels: npt.NDArray[np.uint8] | None = None
    candidates: tuple[Candidate, ...] = ()
    if mask_path is not None:
        mask, mask_spacing = _reoriented(mask_path)
        if mask.shape != hu.shape or not np.allclose(mask_spacing, spacing, rtol=1e-4):
            raise ReaderError(f"{mask_path}: mask grid {mask.shape}/{mask_spacing} differs from {hu.shape}/{spacing}")
        slice_labels = np.asarray((mask > 0.5).any(axis=(1, 2)), dtype=np.uint8)
        candidates = _mask_candidates(mask, spacing)
        if label is None:
            label = int(bool(candidates))
    stem = _nifti_stem(path)
    return Case(
        hu=hu,
        spacing=spacing,
        patient_id=patient_id or stem,
        case_id=stem,
        source=str(path),
        label=label,
        slice_labels=slice_labels,
        candidates=candidates,
    )


def iter_nifti_cases(root: Path, labels_csv: Path | None = None) -> Iterator[Case]:
    """Every NIfTI image under ``root`` (masks excluded), with optional ``labels.csv``.

    ``labels_csv`` columns: ``file`` (name relative to root, or stem), ``patient_id``, ``label``.
    """
    table: dict[str, dict[str, str]] = {}
    if labels_csv is not None:
        with open(labels_csv, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                table[row["file"]] = row
                table[_nifti_stem(Path(row["file"]))] = row
    images = [
        p
        for p in sorted(Path(root).rglob("*.nii*"))
        if p.name.endswith((".nii", ".nii.gz")) and not _nifti_stem(p).endswith(("_mask", "_seg"))
    ]
    for p in images:
        entry: dict[str, str] = table.get(str(p.relative_to(root))) or table.get(_nifti_stem(p)) or {}
        yield read_nifti_case(
            p,
            mask_path=find_nifti_mask(p),
            patient_id=entry.get("patient_id") or None,
            label=int(entry["label"]) if entry.get("label", "") != "" else None,
        )


FORMATS = ("dicom", "luna16", "nifti")


def iter_cases(
    fmt: str,
    root: Path,
    *,
    annotations_csv: Path | None = None,
    candidates_csv: Path | None = None,
    labels_csv: Path | None = None,
    policy: VolumeSection | None = None,
) -> Iterator[Case]:
    """Dispatch on the input format name (one of :data:`FORMATS`)."""
    if fmt == "dicom":
        return iter_dicom_cases(root, policy=policy, labels_csv=labels_csv)
    if fmt == "luna16":
        return iter_luna16_cases(root, annotations_csv, candidates_csv)
    if fmt == "nifti":
        return iter_nifti_cases(root, labels_csv)
    raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}")
