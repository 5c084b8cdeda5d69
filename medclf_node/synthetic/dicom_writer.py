"""Write a HU volume as a real CT Image Storage series (one file per slice).

Synthetic series must look like a scanner's output so that the node, DCMTK, Orthanc and
dciodvfy treat them like real data: complete Patient/Study/Series/Frame of Reference/
Equipment/Image Plane/CT Image/SOP Common modules, file meta, and optional lossless
compression through pydicom's encoders (RLE, JPEG-LS, JPEG 2000).

Pixels are stored the classic CT way: unsigned 12-bit values in 16-bit words with
RescaleIntercept -1024 and RescaleSlope 1, so HU in [-1024, 3071] round-trip exactly
(after rounding to integers).  Slice ``k`` of the array is written with
ImagePositionPatient z = origin z - k * slice spacing and axial orientation
(1,0,0 / 0,1,0): slice index runs head to feet, row index posterior, column index to the
patient's left -- the node's ``assemble_volume`` convention, so the array round-trips as is.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

log = logging.getLogger(__name__)

RESCALE_INTERCEPT = -1024.0
STORED_MAX = 4095  # 12 bits stored
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
COMPRESSED = (RLELossless, JPEGLSLossless, JPEG2000Lossless)
TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "j2k": JPEG2000Lossless,
}
#: pydicom's root for generated UIDs; deterministic UIDs hash their seed under it.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


def default_origin(shape: Sequence[int], spacing: Sequence[float]) -> tuple[float, float, float]:
    """LPS position (x, y, z) of voxel (0, 0, 0): image centred on the isocentre, top slice at z 0."""
    return (-(shape[2] - 1) / 2.0 * spacing[2], -(shape[1] - 1) / 2.0 * spacing[1], 0.0)


def voxel_to_lps(zyx: Sequence[float], spacing: Sequence[float], origin: Sequence[float]) -> tuple[float, float, float]:
    """Patient LPS mm of voxel (slice, row, column) for the axial geometry this module writes."""
    return (
        float(origin[0] + zyx[2] * spacing[2]),
        float(origin[1] + zyx[1] * spacing[1]),
        float(origin[2] - zyx[0] * spacing[0]),
    )


def derived_uid(*parts: str) -> UID:
    """A UID that is a pure function of ``parts`` (reproducible synthetic data sets)."""
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts])


def hu_to_stored(hu: npt.NDArray[np.floating] | npt.NDArray[np.integer]) -> npt.NDArray[np.uint16]:
    """HU -> stored values (rounded, clipped to the 12-bit range)."""
    stored = np.rint(np.asarray(hu, dtype=np.float32))
    stored -= np.float32(RESCALE_INTERCEPT)
    np.clip(stored, 0, STORED_MAX, out=stored)
    return stored.astype(np.uint16)


def _fmt_ds(value: float) -> str:
    """A DS value that fits 16 characters."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8e}"[:16]


def _base_dataset(
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    study_date: str,
    study_time: str,
    accession_number: str,
    study_id: str,
    series_number: int,
    series_description: str,
    body_part: str,
    image_type: Sequence[str],
    spacing: Sequence[float],
    rows: int,
    cols: int,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = study_time
    ds.SeriesTime = study_time
    ds.ContentTime = study_time
    ds.AccessionNumber = accession_number
    ds.Modality = "CT"
    ds.Manufacturer = "medclf synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic chest CT"
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = "medclf-train synth"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = body_part
    ds.SliceThickness = _fmt_ds(spacing[0])
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [_fmt_ds(spacing[1]), _fmt_ds(spacing[2])]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.RescaleIntercept = _fmt_ds(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


class _SegmentWriter:
    """Encode many instances that differ only in a few elements, fast.

    pydicom spends ~10 ms per 50-element dataset walking elements; here the constant
    elements are encoded once into byte segments and each instance only encodes its own
    few elements (UIDs, position, pixels) between them.  The bytes are identical to what
    ``Dataset.save_as(enforce_file_format=True)`` writes (checked by a test).
    """

    def __init__(self, base: Dataset, *, implicit: bool) -> None:
        self._implicit = implicit
        self._base = base

    def _encode(self, ds: Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = self._implicit
        write_dataset(fp, ds)
        return fp.getvalue()

    def _segments(self, variable_tags: list[int]) -> list[bytes]:
        """Constant bytes before each variable tag, plus the tail after the last one."""
        bounds = sorted(variable_tags)
        groups: list[Dataset] = [Dataset() for _ in range(len(bounds) + 1)]
        for elem in self._base:
            groups[sum(1 for b in bounds if int(elem.tag) > b)][elem.tag] = elem
        return [self._encode(g) for g in groups]

    def encode(self, meta: FileMetaDataset, per_slice: Dataset) -> bytes:
        tags = sorted(int(e.tag) for e in per_slice)
        key = tuple(tags)
        cache: dict[tuple[int, ...], list[bytes]] = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = self._segments(tags)
        segments = cache[key]
        head = DicomBytesIO()
        head.is_little_endian = True
        head.is_implicit_VR = False
        head.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(head, meta, enforce_standard=True)
        parts = [head.getvalue()]
        for seg, tag in zip(segments, tags, strict=False):
            parts.append(seg)
            single = Dataset()
            single[tag] = per_slice[tag]
            parts.append(self._encode(single))
        parts.append(segments[-1])
        return b"".join(parts)


def write_ct_series(
    hu: npt.NDArray[np.floating] | npt.NDArray[np.integer],
    spacing: Sequence[float],
    out_dir: Path | str,
    *,
    patient_id: str,
    patient_name: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    origin: Sequence[float] | None = None,
    series_description: str = "Synthetic chest CT",
    series_number: int = 1,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    body_part: str = "CHEST",
    study_date: str | None = None,
    accession_number: str = "",
    study_id: str = "1",
    uid_seed: str | None = None,
    filename_prefix: str = "CT",
) -> list[Path]:
    """Write ``hu`` (slice, row, column) as a CT series, one ``<prefix>NNNN.dcm`` per slice.

    ``spacing`` is (slice spacing, row spacing, column spacing) mm.  Missing UIDs are random,
    or derived from ``uid_seed`` when given (so re-running a synthesis reproduces the same
    UIDs).  Returns the written paths in slice order.
    """
    vol = np.asarray(hu)
    if vol.ndim != 3:
        raise ValueError(f"hu must be 3-D (slice, row, column), got shape {vol.shape}")
    ts = UID(transfer_syntax)
    if ts not in UNCOMPRESSED + COMPRESSED:
        raise ValueError(f"unsupported transfer syntax {ts} ({ts.name}); use one of {UNCOMPRESSED + COMPRESSED}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nz, rows, cols = (int(s) for s in vol.shape)
    sp = [float(s) for s in spacing]
    org = list(origin) if origin is not None else list(default_origin(vol.shape, sp))

    def uid(given: str | None, role: str) -> str:
        if given:
            return given
        return derived_uid(uid_seed, role) if uid_seed is not None else generate_uid()

    study = uid(study_uid, "study")
    series = uid(series_uid, f"series-{series_number}")
    frame = uid(frame_of_reference_uid, "frame")
    date = study_date or _dt.date(2026, 1, 1).strftime("%Y%m%d")
    base = _base_dataset(
        patient_id=patient_id,
        patient_name=patient_name if patient_name is not None else patient_id.replace("-", "^", 1),
        study_uid=study,
        series_uid=series,
        frame_uid=frame,
        study_date=date,
        study_time="120000",
        accession_number=accession_number,
        study_id=study_id,
        series_number=series_number,
        series_description=series_description,
        body_part=body_part,
        image_type=image_type,
        spacing=sp,
        rows=rows,
        cols=cols,
    )
    fast = _SegmentWriter(base, implicit=ts == ImplicitVRLittleEndian) if ts in UNCOMPRESSED else None
    paths: list[Path] = []
    for k in range(nz):
        sop_uid = UID(uid(None, f"{series}-{k}") if uid_seed is not None else generate_uid())
        z = org[2] - k * sp[0]
        per_slice = Dataset()
        per_slice.SOPInstanceUID = sop_uid
        per_slice.InstanceNumber = k + 1
        per_slice.ImagePositionPatient = [_fmt_ds(org[0]), _fmt_ds(org[1]), _fmt_ds(z)]
        per_slice.SliceLocation = _fmt_ds(z)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = UID(ts if ts in UNCOMPRESSED else ExplicitVRLittleEndian)
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "MEDCLF_TRAIN"
        pixels = hu_to_stored(vol[k])
        per_slice.add_new(0x7FE00010, "OW", pixels.tobytes())  # VR fixed: BitsAllocated is 16
        path = out / f"{filename_prefix}{k + 1:04d}.dcm"
        if fast is not None:
            path.write_bytes(fast.encode(meta, per_slice))
        else:
            ds = Dataset()
            ds.update(base)
            ds.update(per_slice)
            ds.file_meta = meta
            ds.compress(ts, pixels, generate_instance_uid=False)
            ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    log.debug("wrote %d %s slices to %s", nz, ts.name, out)
    return paths
