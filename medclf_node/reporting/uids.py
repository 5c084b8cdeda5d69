"""Deterministic UIDs for result objects, and result versions.

A result is identified by what it is about (source series, model, model version, object
kind, generation), never by when it was made: re-running or re-sending after a crash yields
the very same Series and SOP Instance UIDs, so a PACS sees a duplicate, not a second report.
UIDs live under the "2.25." root (ITU-T X.667: a 128-bit integer), which needs no
registered organisation root.

The *generation* counts how often the series' instance set changed after it was reported
(late instances re-open it; see :mod:`medclf_node.ingest.series`).  A new generation is new
content, so it must get a new SOP Instance UID: a PACS keeps the first object stored under a
UID (Orthanc's default) and would silently keep the stale result.  Each generation also gets
its own result *Series* Instance UID: a viewer lists results by series, and a series that
held the stale and the current key image side by side would read as two key images of one
result; one series per version shows as its own entry (SeriesDescription ends in "v2", ...)
and a PACS administrator can remove a superseded version as a unit.  Generation 0 derives
exactly the UIDs earlier releases derived, so results already sent stay recognisable.

The SR of a later version names the SR it replaces in its Predecessor Documents Sequence
(PS3.3 C.17.2.3: SR instances whose content is included, with or without modification, in
this document); :class:`ResultVersion` carries that reference from the index to the builders.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Literal

from pydicom.dataset import Dataset

from medclf_node.dicom_uid import is_valid_uid

log = logging.getLogger(__name__)

_NAMESPACE = "medclf-node/result-uid/v1"

ObjectKind = Literal["sr", "sc"]


def derive_uid(*parts: str) -> str:
    """A "2.25." UID derived from ``parts``: same parts, same UID; different parts, different UID.

    The parts are length-prefixed before hashing so that ("ab", "c") and ("a", "bc") differ.
    The first 128 bits of the SHA-256 digest make the integer (at most 39 digits, so the
    UID is at most 44 characters); an int has no leading zeros by construction.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    h = hashlib.sha256(_NAMESPACE.encode("utf-8"))
    for part in parts:
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    uid = "2.25." + str(int.from_bytes(h.digest()[:16], "big"))
    assert is_valid_uid(uid)
    return uid


@dataclass(frozen=True)
class ResultUIDs:
    """The UIDs of one result object."""

    series_instance_uid: str
    sop_instance_uid: str


def result_uids(
    source_series_uid: str, model_name: str, model_version: str, kind: ObjectKind, *, generation: int = 0
) -> ResultUIDs:
    """Series and SOP Instance UID of the ``kind`` object made by one model for one source series.

    ``generation`` 0 gives the UIDs of earlier releases; every later generation its own.
    """
    if kind not in ("sr", "sc"):
        raise ValueError(f"unknown result object kind {kind!r}; expected 'sr' or 'sc'")
    if generation < 0:
        raise ValueError(f"generation must be >= 0, got {generation}")
    base: tuple[str, ...] = (source_series_uid, model_name, model_version, kind)
    if generation:
        base = (*base, "generation", str(generation))
    return ResultUIDs(
        series_instance_uid=derive_uid(*base, "series"),
        sop_instance_uid=derive_uid(*base, "instance"),
    )


def device_uid(ae_title: str, device_name: str) -> str:
    """A stable Device Observer UID for this node (same AE title and name, same UID)."""
    return derive_uid("device", ae_title.strip(), device_name)


@dataclass(frozen=True)
class Predecessor:
    """The result object a newer version replaces (what a Predecessor Documents item names)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    version: int


@dataclass(frozen=True)
class ResultVersion:
    """Which version of a series' result an object is: its generation (UIDs), number (for people) and predecessor.

    ``number`` is 1 for the first result object of a series, model and kind and one more for
    each that replaced it; generations may skip numbers (a series re-opened while it was being
    processed reports nothing for the outdated generation), versions do not.
    """

    generation: int = 0
    number: int = 1
    predecessor: Predecessor | None = None

    def predecessor_datasets(self) -> list[Dataset]:
        """The predecessor as the minimal dataset highdicom's ``previous_versions`` reads (or none)."""
        if self.predecessor is None:
            return []
        ds = Dataset()
        ds.StudyInstanceUID = self.predecessor.study_instance_uid
        ds.SeriesInstanceUID = self.predecessor.series_instance_uid
        ds.SOPClassUID = self.predecessor.sop_class_uid
        ds.SOPInstanceUID = self.predecessor.sop_instance_uid
        return [ds]


def _fit_words(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` UTF-8 bytes, cut at a word boundary when it must be cut."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    cut = data[:limit].decode("utf-8", errors="ignore")
    head, sep, _ = cut.rpartition(" ")
    return (head if sep and head else cut).rstrip(" ,;:(\u2014-")


def label_version(ds: Dataset, version: ResultVersion) -> None:
    """Mark a result object of version 2 or later so that people can tell it is the newer one.

    SeriesDescription (LO, 64 bytes) ends in " v<n>"; a Secondary Capture also says in
    ImageComments which version it replaces.  Version 1 objects are left exactly as built.
    """
    if version.number <= 1 and version.predecessor is None:
        return
    suffix = f" v{version.number}"
    base = str(ds.get("SeriesDescription", "") or "")
    if not base.endswith(suffix):
        ds.SeriesDescription = _fit_words(base, 64 - len(suffix)) + suffix
    if ds.get("Modality") != "SR":
        note = f"Result version {version.number}"
        if version.predecessor is not None:
            note += (f"; replaces version {version.predecessor.version} "
                     f"(SOP Instance UID {version.predecessor.sop_instance_uid})")
        old = str(ds.get("ImageComments", "") or "")
        ds.ImageComments = f"{old} {note}".strip() if note not in old else old
    log.debug("labelled %s as result version %d", ds.get("SOPInstanceUID"), version.number)
