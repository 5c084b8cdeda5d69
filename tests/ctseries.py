"""Crafted CT series for geometry edge cases (shuffled, gaps, tilt, duplicates, multi-frame...).

Each slice is a real pydicom CT Image Storage dataset built from a numpy array with exactly
the positions/orientation a test asks for, so volume assembly is tested on the same kind of
input the spool holds: Part 10 files on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def hu_phantom(n: int, rows: int = 16, cols: int = 20, seed: int = 0) -> npt.NDArray[np.float32]:
    """A small HU volume whose every slice is different (so mis-stacking is always visible)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-1000, 1500, size=(n, rows, cols)).astype(np.float32)
    base[:, 0, 0] = np.arange(n, dtype=np.float32) * 10.0  # slice fingerprint
    return base


def axial_positions(n: int, spacing: float = 2.5, z0: float = -100.0) -> list[tuple[float, float, float]]:
    return [(-50.0, -60.0, z0 + k * spacing) for k in range(n)]


def _base(study: str, series: str, frame_of_ref: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Phantom^Edge"
    ds.PatientID = "EDGE1"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = frame_of_ref
    ds.StudyDate = "20261125"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.Modality = "CT"
    ds.Manufacturer = "medclf-tests"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesDescription = "AXIAL 2.5mm"
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    return ds


def make_series(
    hu: npt.NDArray[np.floating] | npt.NDArray[np.integer],
    positions: Sequence[Sequence[float]] | None = None,
    *,
    orientation: Sequence[float] = AXIAL,
    orientations: Sequence[Sequence[float]] | None = None,
    pixel_spacing: tuple[float, float] = (0.7, 0.8),
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    signed: bool = False,
    bits_stored: int = 16,
    photometric: str = "MONOCHROME2",
    acquisition_numbers: Sequence[int] | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    slice_thickness: float = 2.5,
    study_uid: str | None = None,
    series_uid: str | None = None,
    gantry_tilt: float | None = None,
) -> list[Dataset]:
    """One CT Image Storage dataset per slice of ``hu`` (stored = (hu - intercept) / slope).

    With ``slope``/``intercept`` None the Rescale attributes are omitted and ``hu`` is stored
    as-is (the caller chooses stored values).
    """
    n = hu.shape[0]
    positions = positions if positions is not None else axial_positions(n)
    study = study_uid or generate_uid()
    series = series_uid or generate_uid()
    frame_of_ref = generate_uid()
    s = 1.0 if slope is None else slope
    b = 0.0 if intercept is None else intercept
    stored = np.rint((np.asarray(hu, dtype=np.float64) - b) / s)
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    lo, hi = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    if stored.min() < max(lo, info.min) or stored.max() > min(hi, info.max):
        raise ValueError("values do not fit the stored representation")
    stored_arr = stored.astype(dtype)
    out: list[Dataset] = []
    for k in range(n):
        ds = _base(study, series, frame_of_ref)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.ImageType = list(image_type)
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = acquisition_numbers[k] if acquisition_numbers is not None else 1
        ds.ImagePositionPatient = [float(v) for v in positions[k]]
        iop = orientations[k] if orientations is not None else orientation
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.SliceThickness = slice_thickness
        ds.PixelSpacing = list(pixel_spacing)
        if gantry_tilt is not None:
            ds.GantryDetectorTilt = gantry_tilt
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
        ds.PhotometricInterpretation = photometric
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 1 if signed else 0
        if slope is not None:
            ds.RescaleSlope = slope
        if intercept is not None:
            ds.RescaleIntercept = intercept
            ds.RescaleType = "HU"
        ds.PixelData = stored_arr[k].tobytes()
        _add_meta(ds)
        out.append(ds)
    return out


def make_enhanced(
    hu: npt.NDArray[np.floating],
    positions: Sequence[Sequence[float]] | None = None,
    *,
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: tuple[float, float] = (0.7, 0.8),
    slope: float = 1.0,
    intercept: float = -1024.0,
) -> Dataset:
    """One Enhanced CT Image Storage dataset holding ``hu`` as frames (per-frame positions)."""
    n = hu.shape[0]
    positions = positions if positions is not None else axial_positions(n)
    ds = _base(generate_uid(), generate_uid(), generate_uid())
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = list(pixel_spacing)
    measures.SliceThickness = 2.5
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orient = Dataset()
    orient.ImageOrientationPatient = [float(v) for v in orientation]
    shared.PlaneOrientationSequence = DicomSequence([orient])
    pvt = Dataset()
    pvt.RescaleSlope = slope
    pvt.RescaleIntercept = intercept
    pvt.RescaleType = "HU"
    shared.PixelValueTransformationSequence = DicomSequence([pvt])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for k in range(n):
        fg = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [float(v) for v in positions[k]]
        fg.PlanePositionSequence = DicomSequence([pos])
        frames.append(fg)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    stored = np.rint((np.asarray(hu, dtype=np.float64) - intercept) / slope).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    _add_meta(ds)
    return ds


def _add_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta


def write_series(datasets: Sequence[Dataset], directory: Path) -> list[Path]:
    """Write each dataset as a Part 10 file named by its position in ``datasets``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = directory / f"{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
