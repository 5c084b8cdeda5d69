"""Deterministic UIDs for result objects.

A result is identified by what it is about (source series, model, model version, object
kind), never by when it was made: re-running or re-sending after a crash yields the very
same Series and SOP Instance UIDs, so a PACS sees a duplicate, not a second report.
UIDs live under the "2.25." root (ITU-T X.667: a 128-bit integer), which needs no
registered organisation root.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Literal

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
    source_series_uid: str, model_name: str, model_version: str, kind: ObjectKind
) -> ResultUIDs:
    """Series and SOP Instance UID of the ``kind`` object made by one model for one source series."""
    if kind not in ("sr", "sc"):
        raise ValueError(f"unknown result object kind {kind!r}; expected 'sr' or 'sc'")
    base = (source_series_uid, model_name, model_version, kind)
    return ResultUIDs(
        series_instance_uid=derive_uid(*base, "series"),
        sop_instance_uid=derive_uid(*base, "instance"),
    )


def device_uid(ae_title: str, device_name: str) -> str:
    """A stable Device Observer UID for this node (same AE title and name, same UID)."""
    return derive_uid("device", ae_title.strip(), device_name)
