"""Slice headers for volume assembly: read once per file, never the pixels.

The fast path is :func:`medclf_node.ingest.dicom_scan.scan_header` (single-frame,
little-endian files: nearly every CT slice a scanner sends); enhanced multi-frame objects
and anything the scanner declines go through ``pydicom.dcmread(defer_size=...)`` and the
functional groups.  Both paths produce the same :class:`SliceHeader` (checked in the tests).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, cast

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from medclf_node.domain import SliceRef
from medclf_node.ingest.dicom_scan import ScanResult, scan_header
from medclf_node.redact import scrub

log = logging.getLogger(__name__)

PIXEL_DATA_TAG = 0x7FE00010

# Tags of the single-frame fast path.
SOP_CLASS, SOP_INSTANCE, STUDY, SERIES, FRAME_OF_REF = 0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00200052
POSITION, ORIENTATION, PIXEL_SPACING = 0x00200032, 0x00200037, 0x00280030
ROWS, COLUMNS, SAMPLES, PHOTOMETRIC, N_FRAMES = 0x00280010, 0x00280011, 0x00280002, 0x00280004, 0x00280008
BITS_ALLOCATED, BITS_STORED, PIXEL_REPR = 0x00280100, 0x00280101, 0x00280103
SLOPE, INTERCEPT, MODALITY_LUT = 0x00281053, 0x00281052, 0x00283000
ACQUISITION, INSTANCE, THICKNESS, SPACING_BETWEEN = 0x00200012, 0x00200013, 0x00180050, 0x00180088
PER_FRAME, SHARED = 0x52009230, 0x52009229
WANTED = frozenset(
    {
        SOP_CLASS, SOP_INSTANCE, STUDY, SERIES, FRAME_OF_REF, POSITION, ORIENTATION, PIXEL_SPACING,
        ROWS, COLUMNS, SAMPLES, PHOTOMETRIC, N_FRAMES, BITS_ALLOCATED, BITS_STORED, PIXEL_REPR,
        SLOPE, INTERCEPT, ACQUISITION, INSTANCE, THICKNESS, SPACING_BETWEEN,
    }
)

# Machine-readable refusal codes (VolumeError.code), recorded in the index as the failure reason.
ERROR_CODES = (
    "no_slices",  # nothing to assemble
    "unreadable",  # a file is not DICOM / cannot be read
    "mixed_series",  # instances of several series were passed
    "missing_geometry",  # no Image Position/Orientation (Patient) or Pixel Spacing, or a bad orientation
    "mixed_geometry",  # different Rows/Columns, Pixel Spacing or Frame of Reference
    "orientation_mismatch",  # slices with different orientations (e.g. a scout left in)
    "gap",  # missing slices (refused by policy, or wider than max_gap_slices)
    "uneven_spacing",  # irregular slice spacing and the policy is "refuse"
    "tilt",  # gantry-tilted (sheared) stack and the policy is "refuse"
    "no_pixels",  # an instance without Pixel Data
    "unsupported_pixels",  # colour or other non-greyscale images
    "decode_failed",  # truncated or undecodable pixel data
    "codec_mismatch",  # a compressed frame's own header disagrees with Rows/Columns/Samples/BitsAllocated
    "too_few_slices",  # fewer distinct positions than volume.min_slices
    "too_large",  # Rows x Columns (x frames) over [limits]; checked from headers before decoding
)


class VolumeError(Exception):
    """A series that cannot be assembled: ``code`` for machines, ``message`` for humans."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown volume error code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[VolumeError], tuple[str, str]]:
        return (VolumeError, (self.code, self.message))  # survives pickling (process pools)


@dataclass(frozen=True)
class SliceHeader:
    """Everything volume assembly needs about one 2D image (a file, or one frame of a file)."""

    path: Path
    frame_index: int | None  # 0-based frame of a multi-frame object; None for single-frame
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    slope: float
    intercept: float
    rescale_assumed: bool
    has_modality_lut: bool
    photometric: str
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    transfer_syntax: str
    pixel_offset: int | None  # file offset of native (not encapsulated) pixel data
    has_pixels: bool
    number_of_frames: int
    acquisition_number: int | None
    instance_number: int | None
    slice_thickness: float | None
    spacing_between_slices: float | None

    @property
    def ref(self) -> SliceRef:
        frame = None if self.frame_index is None else self.frame_index + 1
        return SliceRef(self.sop_class_uid, self.sop_instance_uid, frame)

    @property
    def order_key(self) -> tuple[int, str, int]:
        """Deterministic tie-break independent of arrival order."""
        return (
            self.instance_number if self.instance_number is not None else 2**31,
            self.sop_instance_uid,
            self.frame_index or 0,
        )


# ----------------------------------------------------------------------------------------
# value parsing
# ----------------------------------------------------------------------------------------


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n and all(math.isfinite(v) for v in vals) else None


def _vec3(value: Any) -> tuple[float, float, float] | None:
    return cast("tuple[float, float, float] | None", _floats(value, 3))


def _vec6(value: Any) -> tuple[float, float, float, float, float, float] | None:
    return cast("tuple[float, float, float, float, float, float] | None", _floats(value, 6))


def _vec2(value: Any) -> tuple[float, float] | None:
    return cast("tuple[float, float] | None", _floats(value, 2))


def _opt_float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _opt_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class _Attrs(Protocol):
    """Read access to top-level attribute values, whatever parsed the file."""

    def text(self, tag: int) -> str | None: ...

    def ushort(self, tag: int, default: int) -> int: ...

    def has(self, tag: int) -> bool: ...


def _decode_text(value: bytes) -> str | None:
    return value.decode("latin-1").strip(" \x00") or None


class _ScanAttrs:
    """Attributes from :func:`scan_header` (little endian by construction)."""

    def __init__(self, scan: ScanResult) -> None:
        self._values = scan.values
        self._present = scan.present

    def text(self, tag: int) -> str | None:
        value = self._values.get(tag)
        return None if value is None else _decode_text(value)

    def ushort(self, tag: int, default: int) -> int:
        value = self._values.get(tag)
        return int.from_bytes(value, "little") if value is not None and len(value) == 2 else default

    def has(self, tag: int) -> bool:
        return tag in self._present


class _DatasetAttrs:
    """Attributes from a pydicom dataset, read from the raw element bytes where possible
    (pydicom's value conversion and validation cost more than the parse)."""

    def __init__(self, ds: Dataset) -> None:
        self._ds = ds

    def text(self, tag: int) -> str | None:
        if tag not in self._ds:
            return None
        elem = self._ds.get_item(tag)
        value = elem.value if elem is not None else None
        if value is None:
            return None
        if isinstance(value, bytes):
            return _decode_text(value)
        if isinstance(value, str | int | float):
            return str(value) or None
        return "\\".join(str(v) for v in value) or None  # an already converted multi-value

    def ushort(self, tag: int, default: int) -> int:
        if tag not in self._ds:
            return default
        elem = self._ds.get_item(tag)
        value = elem.value if elem is not None else None
        if isinstance(elem, RawDataElement) and isinstance(value, bytes) and len(value) == 2:
            return int.from_bytes(value, "little" if elem.is_little_endian else "big")
        try:
            return int(self._ds[tag].value)
        except (TypeError, ValueError):
            return default

    def has(self, tag: int) -> bool:
        return tag in self._ds


def _numbers(attrs: _Attrs, tag: int, n: int) -> tuple[float, ...] | None:
    text = attrs.text(tag)
    return None if text is None else _floats(text.split("\\"), n)


def _number(attrs: _Attrs, tag: int) -> float | None:
    text = attrs.text(tag)
    return None if text is None else _opt_float(text.split("\\")[0])


def _rescale(
    attrs: _Attrs, slope: float | None = None, intercept: float | None = None
) -> tuple[float, float, bool]:
    """(slope, intercept, assumed): functional-group values win over top-level ones."""
    if slope is None:
        slope = _number(attrs, SLOPE)
    if intercept is None:
        intercept = _number(attrs, INTERCEPT)
    if slope is not None and intercept is not None and slope != 0:
        return slope, intercept, False
    signed = attrs.ushort(PIXEL_REPR, 0) == 1
    return 1.0, (0.0 if signed else -1024.0), True


def _top_header(
    path: Path, attrs: _Attrs, tsyntax: str, offset: int | None, has_pixels: bool
) -> SliceHeader:
    """The header of a single-frame image (or the frame-independent part of a multi-frame one)."""
    slope, intercept, assumed = _rescale(attrs)
    bits_allocated = attrs.ushort(BITS_ALLOCATED, 16)
    return SliceHeader(
        path=path,
        frame_index=None,
        sop_class_uid=attrs.text(SOP_CLASS) or "",
        sop_instance_uid=attrs.text(SOP_INSTANCE) or "",
        study_instance_uid=attrs.text(STUDY) or "",
        series_instance_uid=attrs.text(SERIES) or "",
        frame_of_reference_uid=attrs.text(FRAME_OF_REF),
        position=_vec3(_numbers(attrs, POSITION, 3)),
        orientation=_vec6(_numbers(attrs, ORIENTATION, 6)),
        pixel_spacing=_vec2(_numbers(attrs, PIXEL_SPACING, 2)),
        rows=attrs.ushort(ROWS, 0),
        columns=attrs.ushort(COLUMNS, 0),
        slope=slope,
        intercept=intercept,
        rescale_assumed=assumed,
        has_modality_lut=attrs.has(MODALITY_LUT),
        photometric=attrs.text(PHOTOMETRIC) or "MONOCHROME2",
        samples_per_pixel=attrs.ushort(SAMPLES, 1),
        bits_allocated=bits_allocated,
        bits_stored=attrs.ushort(BITS_STORED, bits_allocated),
        pixel_representation=attrs.ushort(PIXEL_REPR, 0),
        transfer_syntax=tsyntax,
        pixel_offset=offset,
        has_pixels=has_pixels,
        number_of_frames=int(_number(attrs, N_FRAMES) or 1),
        acquisition_number=_opt_int(_number(attrs, ACQUISITION)),
        instance_number=_opt_int(_number(attrs, INSTANCE)),
        slice_thickness=_number(attrs, THICKNESS),
        spacing_between_slices=_number(attrs, SPACING_BETWEEN),
    )


def _group_attr(groups: Sequence[Dataset | None], seq: str, attr: str) -> Any:
    """First value of ``seq[0].attr`` in the given functional groups (per-frame first, then shared)."""
    for g in groups:
        if g is None:
            continue
        items = g.get(seq)
        if items:
            value = items[0].get(attr)
            if value is not None:
                return value
    return None


def _headers_from_dataset(path: Path, ds: Dataset) -> list[SliceHeader]:
    """One :class:`SliceHeader` per frame of a header-only dataset read with deferred pixels."""
    raw = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True) if PIXEL_DATA_TAG in ds else None
    meta = getattr(ds, "file_meta", None)
    tsyntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not tsyntax:
        tsyntax = "1.2.840.10008.1.2" if ds.is_implicit_VR else "1.2.840.10008.1.2.1"
    offset: int | None = None
    if raw is not None and not UID(tsyntax).is_encapsulated:
        tell = getattr(raw, "value_tell", None)
        offset = int(tell) if tell is not None else None
    attrs = _DatasetAttrs(ds)
    top = _top_header(path, attrs, tsyntax, offset, raw is not None)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") if PER_FRAME in ds else None
    if per_frame is None and top.number_of_frames == 1:
        return [top]
    shared_seq = ds.get("SharedFunctionalGroupsSequence") if SHARED in ds else None
    shared = shared_seq[0] if shared_seq else None
    out = []
    for i in range(top.number_of_frames):
        frame = per_frame[i] if per_frame is not None and i < len(per_frame) else None
        groups = [frame, shared]
        slope, intercept, assumed = _rescale(
            attrs,
            _opt_float(_group_attr(groups, "PixelValueTransformationSequence", "RescaleSlope")),
            _opt_float(_group_attr(groups, "PixelValueTransformationSequence", "RescaleIntercept")),
        )
        pos = _vec3(_group_attr(groups, "PlanePositionSequence", "ImagePositionPatient"))
        iop = _vec6(_group_attr(groups, "PlaneOrientationSequence", "ImageOrientationPatient"))
        spacing = _vec2(_group_attr(groups, "PixelMeasuresSequence", "PixelSpacing"))
        thickness = _opt_float(_group_attr(groups, "PixelMeasuresSequence", "SliceThickness"))
        out.append(
            replace(
                top,
                frame_index=i,
                position=pos or top.position,
                orientation=iop or top.orientation,
                pixel_spacing=spacing or top.pixel_spacing,
                slope=slope,
                intercept=intercept,
                rescale_assumed=assumed,
                slice_thickness=thickness if thickness is not None else top.slice_thickness,
            )
        )
    return out


def _headers_from_scan(path: Path, scan: ScanResult) -> list[SliceHeader] | None:
    """Single-frame headers from the fast scan; None when pydicom must look (multi-frame)."""
    attrs = _ScanAttrs(scan)
    if scan.present & {PER_FRAME, SHARED} or (_number(attrs, N_FRAMES) or 1) != 1:
        return None
    if SOP_INSTANCE not in scan.values:
        return None  # let pydicom decide what this is
    native = scan.pixel_offset is not None and scan.pixel_length is not None
    offset = scan.pixel_offset if native and not UID(scan.transfer_syntax).is_encapsulated else None
    return [_top_header(path, attrs, scan.transfer_syntax, offset, scan.pixel_offset is not None)]


def read_header_with_pydicom(path: Path) -> list[SliceHeader]:
    """The general path: any encoding pydicom reads, multi-frame functional groups included."""
    try:
        ds = pydicom.dcmread(path, defer_size=256, force=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise VolumeError("unreadable", f"cannot read the DICOM header of {path.name}: {scrub(str(exc))}") from exc
    if SOP_INSTANCE not in ds:
        raise VolumeError("unreadable", f"{path.name} is not a DICOM instance (no SOP Instance UID)")
    return _headers_from_dataset(path, ds)


def read_slice_headers(paths: Iterable[Path]) -> list[SliceHeader]:
    """Read every file's header once (pixel data never loaded); multi-frame files give one per frame."""
    out: list[SliceHeader] = []
    for p in paths:
        path = Path(p)
        try:
            scan = scan_header(path, WANTED)
        except OSError as exc:
            raise VolumeError("unreadable", f"cannot read {path.name}: {exc.strerror}") from exc
        fast = _headers_from_scan(path, scan) if scan is not None else None
        out.extend(fast if fast is not None else read_header_with_pydicom(path))
    return out
