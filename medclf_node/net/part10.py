"""Part 10 bytes of a received C-STORE dataset: preamble + File Meta Information + the peer's bytes.

Why not just ``event.encoded_dataset()``: pynetdicom builds the File Meta Information as a
pydicom dataset and runs pydicom's generic writer on it, a few hundred microseconds per
instance, a sizeable share of the node's per-instance work.  The seven elements it writes are
fixed, so they are encoded here directly, byte for byte the same (``tests/test_intake_fastpath.py``
compares the two).  Anything unusual (an empty, non-ASCII or over-long UID) goes to
pynetdicom's own encoder, so its behaviour (including its errors) is unchanged.
"""

from __future__ import annotations

import logging
import struct
from io import BytesIO
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

log = logging.getLogger(__name__)

PREAMBLE = b"\x00" * 128 + b"DICM"
_VERSION = b"\x02\x00\x01\x00OB\x00\x00" + struct.pack("<I", 2) + b"\x00\x01"


def _short(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", *tag) + vr + struct.pack("<H", len(value)) + value


def _uid(value: str) -> bytes | None:
    """An even-length UI value, or ``None`` when pynetdicom's encoder should decide."""
    if not value or len(value) > 64 or not value.isascii():
        return None
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def file_meta(sop_class_uid: object, sop_instance_uid: object, transfer_syntax: object) -> bytes | None:
    """The encoded File Meta group that pynetdicom's ``create_file_meta`` + ``encode_file_meta`` write.

    ``None`` when a value is one this fast path does not handle.
    """
    values = [_uid(v) if isinstance(v, str) else None for v in (sop_class_uid, sop_instance_uid, transfer_syntax)]
    impl_uid = _uid(str(PYNETDICOM_IMPLEMENTATION_UID))
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    if any(v is None for v in values) or impl_uid is None:
        return None
    if len(version) % 2:
        version += b" "
    body = b"".join(
        (
            _VERSION,
            _short((0x0002, 0x0002), b"UI", values[0] or b""),
            _short((0x0002, 0x0003), b"UI", values[1] or b""),
            _short((0x0002, 0x0010), b"UI", values[2] or b""),
            _short((0x0002, 0x0012), b"UI", impl_uid),
            _short((0x0002, 0x0013), b"SH", version),
        )
    )
    return b"\x02\x00\x00\x00UL" + struct.pack("<HI", 4, len(body)) + body


def encoded_dataset(event: Any) -> bytes:
    """``event.encoded_dataset(include_meta=True)`` of a C-STORE event, without pydicom's writer."""
    request = event.request
    dataset = getattr(request, "DataSet", None)
    if isinstance(dataset, BytesIO) and getattr(request, "_dataset_file", None) is None:
        meta = file_meta(request.AffectedSOPClassUID, request.AffectedSOPInstanceUID, event.context.transfer_syntax)
        if meta is not None:
            return b"".join((PREAMBLE, meta, dataset.getvalue()))
    return bytes(event.encoded_dataset(include_meta=True))
