"""A result destination that is a directory: results a newcomer (or an auditor) can open.

``[[folders]]`` entries name a directory; a result sent there is written durably (temp file,
fsync, rename, fsync directory, like the spool) as ``<path>/<StudyInstanceUID>/<SeriesInstanceUID>/
<SOPInstanceUID>.dcm``.  With ``png = true`` each Secondary Capture key image is also written as
``<SOPInstanceUID>.png`` beside it, so the result can be looked at without a DICOM viewer.
Path parts are UIDs checked against the UID grammar, never raw DICOM values.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import pydicom

from medclf_node.config import FolderSection
from medclf_node.dicom_uid import is_valid_uid
from medclf_node.ingest.spool import write_atomic
from medclf_node.reporting import sc_to_png

log = logging.getLogger(__name__)

SECONDARY_CAPTURE_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
})


def folder_target(folder: Path, ds: pydicom.Dataset) -> Path:
    """Where one object goes under ``folder``; ValueError when a UID would not be a safe name."""
    parts = [str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    bad = [k for k, v in zip(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"), parts, strict=True)
           if not is_valid_uid(v)]
    if bad:
        raise ValueError(f"not a valid UID: {', '.join(bad)}")
    return folder / parts[0] / parts[1] / f"{parts[2]}.dcm"


def _write_one(folder: FolderSection, source: Path, *, durable: bool) -> Path:
    data = source.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    target = folder_target(folder.path, ds)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, data, durable=durable)
    if folder.png and str(ds.get("SOPClassUID", "")) in SECONDARY_CAPTURE_CLASSES:
        png = target.with_suffix(".png")
        tmp = png.with_suffix(".png.tmp")
        sc_to_png(ds, tmp)
        tmp.replace(png)
    return target


def deliver(folder: FolderSection, files: Sequence[Path], *, durable: bool = True) -> list[str | None]:
    """Write each file into ``folder``; per file None on success, else the reason (retried by the outbox)."""
    errors: list[str | None] = []
    for source in files:
        try:
            target = _write_one(folder, source, durable=durable)
            log.debug("wrote %s", target)
            errors.append(None)
        except (OSError, ValueError, pydicom.errors.InvalidDicomError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return errors
