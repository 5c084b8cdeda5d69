"""What a compressed frame's own header claims (size, components, precision), read without decoding.

Why: a JPEG, JPEG-LS or JPEG 2000 decoder allocates what the codestream's header says, not
what the DICOM Rows/Columns say.  A 512 x 512 CT slice whose JPEG header claims 20000 x 20000
made pylibjpeg allocate ~2 GB.  These parsers read only the frame header (JPEG SOFn, JPEG-LS
SOF55, JPEG 2000 SIZ; PS3.5 A.4 and ISO/IEC 10918-1 / 14495-1 / 15444-1), so the volume stage
can refuse a frame that disagrees with its DICOM header before any decoder runs.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.encaps import generate_fragmented_frames

log = logging.getLogger(__name__)

JPEG_FAMILY = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
})
JPEG_LS = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
JPEG_2000 = frozenset({
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
})
#: transfer syntaxes whose frames :func:`frame_geometry` understands
CHECKED = JPEG_FAMILY | JPEG_LS | JPEG_2000

# SOFn markers of ISO/IEC 10918-1 (not DHT C4, JPG C8, DAC CC); SOF55 (F7) is JPEG-LS
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_SOF55 = 0xF7
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: markers without a length
_J2K_SOC, _J2K_SIZ = b"\xff\x4f", b"\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
#: how far into a frame its header may be looked for (APPn/COM segments come before SOF)
MAX_HEADER_SCAN = 1 << 20


class CodecHeaderError(ValueError):
    """The frame has no header this module can read (truncated, not this codec)."""


@dataclass(frozen=True)
class FrameGeometry:
    """Size as the codestream declares it."""

    rows: int
    columns: int
    components: int
    precision: int  # bits per sample (the largest over components for JPEG 2000)


def frame_geometry(frame: bytes, transfer_syntax: str) -> FrameGeometry:
    """The geometry the frame's codec header declares; :class:`CodecHeaderError` when there is none."""
    if transfer_syntax in JPEG_2000:
        return _j2k(frame)
    if transfer_syntax in JPEG_FAMILY or transfer_syntax in JPEG_LS:
        return _jpeg(frame)
    raise CodecHeaderError(f"no header parser for transfer syntax {transfer_syntax}")


def _jpeg(frame: bytes) -> FrameGeometry:
    """Walk the marker segments from SOI to the first SOFn (JPEG) or SOF55 (JPEG-LS)."""
    if frame[:2] != b"\xff\xd8":
        raise CodecHeaderError("no SOI marker at the start of the frame")
    pos, end = 2, min(len(frame), MAX_HEADER_SCAN)
    # a JPEG-LS SOF55 in a JPEG transfer syntax (or the reverse) still declares the size a decoder would use
    while pos + 4 <= end:
        if frame[pos] != 0xFF:
            raise CodecHeaderError(f"marker expected at offset {pos}")
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or SOS before any frame header
            break
        (length,) = struct.unpack_from(">H", frame, pos + 2)
        if length < 2:
            raise CodecHeaderError(f"segment length {length} at offset {pos}")
        if marker in _SOF or marker == _SOF55:
            if length < 8 or pos + 2 + length > len(frame):
                raise CodecHeaderError("truncated frame header")
            precision, rows, columns, components = struct.unpack_from(">BHHB", frame, pos + 4)
            return FrameGeometry(rows, columns, components, precision)
        pos += 2 + length
    raise CodecHeaderError("no frame header (SOF) before the scan data")


def _j2k(frame: bytes) -> FrameGeometry:
    """The SIZ marker segment, which must follow SOC (a JP2 file wrapper is unwrapped first)."""
    if frame.startswith(_JP2_SIGNATURE):
        at = frame.find(b"jp2c", 0, MAX_HEADER_SCAN)
        if at < 0:
            raise CodecHeaderError("JP2 wrapper without a codestream box")
        frame = frame[at + 4:]
    if frame[:2] != _J2K_SOC or frame[2:4] != _J2K_SIZ:
        raise CodecHeaderError("no SOC + SIZ markers at the start of the codestream")
    if len(frame) < 4 + 38:
        raise CodecHeaderError("truncated SIZ segment")
    # Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, Csiz
    lsiz, _, xsiz, ysiz, xo, yo, _, _, _, _, csiz = struct.unpack_from(">HHLLLLLLLLH", frame, 4)
    if csiz < 1 or lsiz != 38 + 3 * csiz or len(frame) < 4 + lsiz:
        raise CodecHeaderError("inconsistent SIZ segment")
    precision = max((frame[4 + 38 + 3 * i] & 0x7F) + 1 for i in range(csiz))
    if xsiz <= xo or ysiz <= yo:
        raise CodecHeaderError("empty image area in SIZ")
    return FrameGeometry(ysiz - yo, xsiz - xo, csiz, precision)


def disagreement(geometry: FrameGeometry, rows: int, columns: int, samples: int, bits_allocated: int) -> str | None:
    """Why ``geometry`` does not fit the DICOM header, or ``None`` when it does."""
    problems = []
    if (geometry.rows, geometry.columns) != (rows, columns):
        problems.append(f"{geometry.rows} x {geometry.columns} pixels, DICOM says {rows} x {columns}")
    if geometry.components != samples:
        problems.append(f"{geometry.components} component(s), DICOM says {samples} sample(s) per pixel")
    if geometry.precision > bits_allocated:
        problems.append(f"{geometry.precision}-bit samples, DICOM allocates {bits_allocated} bits")
    return "; ".join(problems) or None


def encapsulated_frames(path: Path, wanted: Iterable[int], number_of_frames: int) -> Iterator[tuple[int, bytes]]:
    """``(index, bytes)`` of the wanted frames of an encapsulated Pixel Data, without decoding any.

    The compressed bytes are at most ``limits.max_instance_bytes`` (checked at intake).
    """
    ds = pydicom.dcmread(path, force=True)
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    want = set(wanted)
    for index, fragments in enumerate(
        generate_fragmented_frames(ds.PixelData, number_of_frames=number_of_frames, extended_offsets=extended)
    ):
        if index in want:
            yield index, b"".join(fragments)
            want.discard(index)
            if not want:
                return
