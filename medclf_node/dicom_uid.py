"""The DICOM UID grammar (PS3.5 9.1), in one place.

UIDs from the network become path components (spool), audit fields and references in result
objects, so every module checks them against the same rule: digits and dots, no empty
component, no leading zero, at most 64 characters, nothing else (``fullmatch``: ``$`` would
let a trailing newline through).
"""

from __future__ import annotations

import re

_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_valid_uid(value: str) -> bool:
    """True for a syntactically valid DICOM UID."""
    return 0 < len(value) <= 64 and _UID_RE.fullmatch(value) is not None


__all__ = ["is_valid_uid"]
