"""Durable instance store: the bytes a sender gave us, on disk and indexed, or an error status.

``Spool.store`` is what a C-STORE handler calls.  It returns only after the file is
written, fsynced, renamed into place, its directory fsynced, and the index row committed,
so the caller may then answer Success.  A reader never sees a partial file: data goes to
a hidden temporary file in the target directory (``.<name>.tmp-<random>``), which is
renamed over the final name in one step; leftovers of a crash are deleted at start-up.

Layout: ``data_dir/spool/<study_uid>/<series_uid>/<sop_instance_uid>.dcm``.  UIDs are
validated against the DICOM UID grammar before they become path components, so a
hostile value can never escape the spool directory.

Failures are :class:`StoreError` carrying the DICOM status the SCP should return:
``0xA700`` (out of resources: any OS error while writing, e.g. disk full, read-only,
permission), ``0xC210`` (cannot understand: not parsable / required UIDs missing or
invalid), ``0xC211`` (anything unexpected).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.tag import Tag

from medclf_node.config import LimitsSection
from medclf_node.dicom_uid import is_valid_uid
from medclf_node.redact import describe, scrub
from medclf_node.store import InstanceRecord, RecordOutcome, Store

log = logging.getLogger(__name__)

STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_UNEXPECTED = 0xC211

SPOOL_DIRNAME = "spool"
TMP_MARK = ".tmp-"

_HEADER_TAGS = [
    Tag(0x0008, 0x0016),  # SOPClassUID
    Tag(0x0008, 0x0018),  # SOPInstanceUID
    Tag(0x0020, 0x000D),  # StudyInstanceUID
    Tag(0x0020, 0x000E),  # SeriesInstanceUID
    Tag(0x0028, 0x0008),  # NumberOfFrames  } for the [limits] size checks, read from the
    Tag(0x0028, 0x0010),  # Rows            } header only: pixel data is never decoded here
    Tag(0x0028, 0x0011),  # Columns         }
]


class StoreError(Exception):
    """Storing failed; ``status`` is the DICOM C-STORE status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StoredInstance:
    """The result of a successful :meth:`Spool.store`."""

    record: InstanceRecord
    outcome: RecordOutcome


@dataclass(frozen=True)
class Header:
    """The few header values the intake needs."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    rows: int = 0
    columns: int = 0
    frames: int = 1


def _header_int(ds: object, keyword: str, default: int) -> int:
    """An integer attribute of the header; a missing or malformed value gives ``default``."""
    try:
        value = getattr(ds, keyword, None)
        return default if value in (None, "") else int(float(str(value)))
    except (TypeError, ValueError, OverflowError):
        return default


# --- fast header scan ---------------------------------------------------------------------
# The C-STORE handler runs once per instance; pydicom's reader costs ~0.5 ms to find seven
# values in a CT header, as much as the write.  This scanner walks the element headers of a
# well-formed little-endian Part 10 file itself.  It only ever answers for input it fully
# understands, with exactly the values pydicom would give; on anything else (big endian,
# deflate, undefined lengths, unknown VRs, odd tag order, truncation, a value that is not a
# plain number or single UID) it returns None and pydicom decides, errors included.
# tests/test_intake_fastpath.py compares the two on valid and on fuzzed files.

# explicit VR little endian, and the encapsulated syntaxes (always explicit VR little endian)
_EXPLICIT_LE_SYNTAXES = frozenset(
    "1.2.840.10008.1.2.1 1.2.840.10008.1.2.4.50 1.2.840.10008.1.2.4.51 1.2.840.10008.1.2.4.57 "
    "1.2.840.10008.1.2.4.70 1.2.840.10008.1.2.4.80 1.2.840.10008.1.2.4.81 1.2.840.10008.1.2.4.90 "
    "1.2.840.10008.1.2.4.91 1.2.840.10008.1.2.5".split()
)
_IMPLICIT_LE = "1.2.840.10008.1.2"
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_SCAN_UIDS = {
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x0020000D: "study_uid",
    0x0020000E: "series_uid",
}
_SCAN_INTS = {0x00280010: ("rows", b"US"), 0x00280011: ("columns", b"US"), 0x00280008: ("frames", b"IS")}
_META_UIDS = {0x00020010: "transfer_syntax"}
_DATASET_TAGS = {**_SCAN_UIDS, **_SCAN_INTS}
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_INT_RE = re.compile(rb"^[+-]?[0-9]{1,12}$")


def _walk(data: bytes, pos: int, end: int | None, implicit: bool) -> dict[int, tuple[bytes, bytes]] | None:
    """(tag -> (VR, value)) of the wanted tags from ``pos`` until group 2 ends (``end=None``: the
    pixel data or the end of ``data``); ``None`` for anything a pydicom read might see differently."""
    wanted = _META_UIDS if end is not None else _DATASET_TAGS
    found: dict[int, tuple[bytes, bytes]] = {}
    size = len(data)
    last = -1
    first = True
    while pos < size:
        if pos + 8 > size:
            return None
        group, elem = _TAG.unpack_from(data, pos)
        tag = group << 16 | elem
        if end is not None and group != 2:
            return found if pos == end else None
        if end is None and tag in _PIXEL_TAGS:
            # pydicom reads the whole element header before it stops at the pixel data
            long_header = not implicit and data[pos + 4 : pos + 6] in _LONG_VRS
            return found if pos + (12 if long_header else 8) <= size else None
        if tag <= last or group == 0xFFFE:
            return None
        last = tag
        vr = data[pos + 4 : pos + 6]
        looks_explicit = 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B
        if implicit:
            if first and looks_explicit:
                return None  # pydicom would switch to explicit VR here
            vr = b""
            length = _U32.unpack_from(data, pos + 4)[0]
            pos += 8
        else:
            if vr not in _VRS:
                return None
            if vr in _LONG_VRS:
                if pos + 12 > size:
                    return None
                length = _U32.unpack_from(data, pos + 8)[0]
                pos += 12
            else:
                length = _U16.unpack_from(data, pos + 6)[0]
                pos += 8
        first = False
        if length == 0xFFFFFFFF or pos + length > size:
            return None
        if tag in wanted:
            found[tag] = (vr, data[pos : pos + length])
        pos += length
    return found if end is None else None


def _scan_int(vr: bytes, expected_vr: bytes, raw: bytes) -> int | None:
    """The value pydicom's reader + ``_header_int`` would give, or -1 when unsure."""
    if vr not in (b"", expected_vr):
        return -1
    if expected_vr == b"US":
        if len(raw) == 0:
            return None
        return _U16.unpack(raw)[0] if len(raw) == 2 else -1
    text = raw.strip(b" ")
    if not text:
        return None
    return int(text) if _INT_RE.match(text) else -1


def _ui_text(raw: bytes) -> str:
    """A UI value as pydicom reads it: trailing NULs/spaces dropped (convert_UI), then whitespace (UID())."""
    return raw.decode("latin-1").rstrip("\x00 ").strip()


def scan_header(data: bytes) -> tuple[dict[str, str], dict[str, int]] | None:
    """(UIDs, ints) as :func:`parse_header` reads them, or ``None`` where only pydicom may decide."""
    if len(data) < 144 or data[128:140] != b"DICM\x02\x00\x00\x00UL\x04\x00":
        return None  # not Part 10 starting with the (0002,0000) group length
    meta_end = 144 + _U32.unpack_from(data, 140)[0]
    meta = _walk(data, 144, meta_end, implicit=False)
    if meta is None or 0x00020010 not in meta:
        return None
    ts_vr, ts_raw = meta[0x00020010]
    if ts_vr != b"UI" or not ts_raw.isascii():
        return None
    syntax = _ui_text(ts_raw)
    if syntax != _IMPLICIT_LE and syntax not in _EXPLICIT_LE_SYNTAXES:
        return None
    found = _walk(data, meta_end, None, implicit=syntax == _IMPLICIT_LE)
    if found is None:
        return None
    uids = {"transfer_syntax": syntax}
    for tag, key in _SCAN_UIDS.items():
        vr, raw = found.get(tag, (b"UI", b""))
        text = _ui_text(raw)
        if vr not in (b"", b"UI") or not raw.isascii() or "\\" in text or not text:
            return None  # absent/empty (pydicom may fall back to the file meta), multi-valued, odd
        uids[key] = text
    ints = {"rows": 0, "columns": 0, "frames": 1}  # _header_int's defaults
    for tag, (key, expected_vr) in _SCAN_INTS.items():
        if tag in found:
            value = _scan_int(found[tag][0], expected_vr, found[tag][1])
            if value == -1:
                return None
            if value is not None:
                ints[key] = value
    return uids, ints


def parse_header(data: bytes) -> Header:
    """Read the identifying UIDs from a Part 10 byte string (no pixel data is decoded).

    Raises ``StoreError(0xC210)`` when the bytes are not DICOM or a UID is missing/invalid.
    Well-formed little-endian files take :func:`scan_header` (tens of microseconds instead
    of pydicom's ~0.5 ms); anything it does not vouch for is read by pydicom, as before.
    """
    scanned = scan_header(data)
    values, ints = scanned if scanned is not None else _parse_with_pydicom(data)
    for key, value in values.items():
        if not is_valid_uid(value.strip("\x00 ")):
            raise StoreError(STATUS_CANNOT_UNDERSTAND, f"{key} missing or not a valid UID: {describe(value)}")
    return Header(
        **{k: v.strip("\x00 ") for k, v in values.items()},
        rows=ints["rows"],
        columns=ints["columns"],
        frames=max(1, ints["frames"]),
    )


def _parse_with_pydicom(data: bytes) -> tuple[dict[str, str], dict[str, int]]:
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        meta = ds.file_meta
        values = {
            "sop_class_uid": str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "")),
            "sop_instance_uid": str(ds.get("SOPInstanceUID", "") or meta.get("MediaStorageSOPInstanceUID", "")),
            "study_uid": str(ds.get("StudyInstanceUID", "")),
            "series_uid": str(ds.get("SeriesInstanceUID", "")),
            "transfer_syntax": str(meta.get("TransferSyntaxUID", "")),
        }
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any parser failure means "cannot understand"
        # (fuzzing found struct.error and pydicom's BytesLengthException besides the obvious ones)
        raise StoreError(STATUS_CANNOT_UNDERSTAND, f"cannot parse the dataset: {scrub(str(exc))}") from exc
    ints = {
        "rows": _header_int(ds, "Rows", 0),
        "columns": _header_int(ds, "Columns", 0),
        "frames": _header_int(ds, "NumberOfFrames", 1),
    }
    return values, ints


def check_limits(data: bytes, header: Header | None, limits: LimitsSection) -> None:
    """Refuse an instance over ``[limits]`` (size, frame and instance pixel counts) with 0xA700.

    0xA700 "Refused: Out of Resources" (PS3.4 B.2.3) is the status for "this node will not
    take that much": the sender's data may be valid, but exceeds what this node accepts.
    Called once with ``header=None`` (size only, before parsing) and once with the header.
    """
    if len(data) > limits.max_instance_bytes:
        raise StoreError(STATUS_OUT_OF_RESOURCES, f"instance of {len(data)} bytes exceeds "
                         f"limits.max_instance_bytes = {limits.max_instance_bytes}")
    if header is None:
        return
    frame = header.rows * header.columns
    if frame > limits.max_frame_pixels:
        raise StoreError(STATUS_OUT_OF_RESOURCES, f"{header.rows} x {header.columns} pixels per frame exceed "
                         f"limits.max_frame_pixels = {limits.max_frame_pixels}")
    if frame * header.frames > limits.max_series_voxels:
        raise StoreError(STATUS_OUT_OF_RESOURCES, f"{header.rows} x {header.columns} x {header.frames} frames "
                         f"exceed limits.max_series_voxels = {limits.max_series_voxels}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(target: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``target`` so that it is either absent/old or complete (and durable).

    tmp file in the same directory -> write -> fsync -> rename -> fsync directory.
    Without ``durable`` the fsyncs are skipped: still atomic for readers and safe against
    a crash of the process (the page cache survives it), not against power loss.
    """
    tmp = target.parent / f".{target.name}{TMP_MARK}{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        _fsync_dir(target.parent)


class Spool:
    """The durable store; one instance per process, safe to call from many threads."""

    def __init__(
        self, data_dir: Path, store: Store, *, durable: bool = True, limits: LimitsSection | None = None
    ) -> None:
        self.data_dir = Path(data_dir)
        self.durable = durable
        self.limits = limits or LimitsSection()
        self.root = self.data_dir / SPOOL_DIRNAME
        self.db = store
        self._known_dirs: set[Path] = set()

    def path_for(self, header: Header) -> Path:
        """The final path of an instance (UIDs already validated by :func:`parse_header`)."""
        for uid in (header.study_uid, header.series_uid, header.sop_instance_uid):
            if not is_valid_uid(uid):  # defence in depth: never build a path from an invalid UID
                raise StoreError(STATUS_CANNOT_UNDERSTAND, f"not a valid UID: {describe(uid)}")
        return self.root / header.study_uid / header.series_uid / f"{header.sop_instance_uid}.dcm"

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs and directory.is_dir():
            return
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        if created and self.durable:
            # the new entries must survive too: "spool" in data_dir, <study> in spool, <series> in <study>
            for parent in (self.data_dir, self.root, directory.parent):
                _fsync_dir(parent)
        self._known_dirs.add(directory)

    def store(self, data: bytes, *, calling_ae: str, assoc_id: str) -> StoredInstance:
        """Durably store one Part 10 encoded instance (preamble + file meta + dataset).

        Idempotent: a re-sent SOP Instance UID atomically replaces the file and its
        single index row.  Raises :class:`StoreError` with the status to answer.
        """
        check_limits(data, None, self.limits)
        header = parse_header(data)
        check_limits(data, header, self.limits)
        self._check_series_count(header)
        target = self.path_for(header)
        try:
            self._ensure_dir(target.parent)
            write_atomic(target, data, durable=self.durable)
        except OSError as exc:
            kind = errno.errorcode.get(exc.errno or 0, "?")
            log.error("cannot write %s (%s): %s", target.name, kind, exc.strerror)
            raise StoreError(STATUS_OUT_OF_RESOURCES, f"cannot write to the spool: {exc.strerror}") from exc
        except Exception as exc:  # noqa: BLE001 - mapped to a DICOM status, the node keeps serving
            log.exception("unexpected error storing %s", target.name)
            raise StoreError(STATUS_UNEXPECTED, f"unexpected error: {scrub(str(exc))}") from exc
        record = InstanceRecord(
            sop_instance_uid=header.sop_instance_uid,
            series_uid=header.series_uid,
            study_uid=header.study_uid,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax=header.transfer_syntax,
            path=target.relative_to(self.data_dir).as_posix(),
            size=len(data),
            calling_ae=calling_ae,
            assoc_id=assoc_id,
            received_at=time.time(),
        )
        try:
            outcome = self.db.record_instance(record)
        except Exception as exc:  # sqlite3.OperationalError "disk full"/"readonly" etc.
            text = str(exc).lower()
            status = (
                STATUS_OUT_OF_RESOURCES
                if any(w in text for w in ("full", "readonly", "read-only", "disk i/o", "unable to open"))
                else STATUS_UNEXPECTED
            )
            log.error("cannot index %s: %s", header.sop_instance_uid, exc)
            raise StoreError(status, f"cannot record the instance in the index: {exc}") from exc
        if outcome.previous_path is not None and outcome.previous_path != record.path:
            # same SOP Instance UID re-sent under another study/series: one file per UID
            log.warning("instance %s moved from %s to %s", header.sop_instance_uid, outcome.previous_path,
                        record.path)
            try:
                (self.data_dir / outcome.previous_path).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot remove the previous file of %s: %s", header.sop_instance_uid, exc.strerror)
        if outcome.reopened:
            log.info("late instance re-opened series %s", header.series_uid)
        return StoredInstance(record=record, outcome=outcome)

    def _check_series_count(self, header: Header) -> None:
        """``limits.max_instances_per_series``: new instances beyond it get 0xA700 (re-sends pass).

        Check-then-write without a lock: concurrent associations feeding one series may
        overshoot by at most the number of associations; the limit bounds, it does not count.
        """
        series = self.db.get_series(header.series_uid)
        if series is None or series.n_instances < self.limits.max_instances_per_series:
            return
        if self.db.has_instance(header.sop_instance_uid):
            return
        raise StoreError(STATUS_OUT_OF_RESOURCES, f"series already holds {series.n_instances} instances "
                         f"(limits.max_instances_per_series = {self.limits.max_instances_per_series})")

    def remove_leftover_tmp_files(self, *, min_age_seconds: float = 0.0) -> int:
        """Delete temporary files a crash left behind (none of them was acknowledged).

        ``min_age_seconds``: keep younger ones (a spool shared with other nodes, whose
        writes in progress look the same).
        """
        n = 0
        cutoff = time.time() - min_age_seconds
        if not self.root.is_dir():
            return 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(".") and TMP_MARK in name:
                    try:
                        full = os.path.join(dirpath, name)
                        if min_age_seconds and os.stat(full).st_mtime > cutoff:
                            continue
                        os.unlink(full)
                        n += 1
                    except OSError as exc:
                        log.warning("cannot remove leftover %s: %s", name, exc.strerror)
        if n:
            log.info("removed %d unfinished temporary file(s) left by an interrupted run", n)
        return n
