"""Patient data never reaches a log line, the audit trail or a recorded reason: values are described, not shown.

Why: a value that fails validation is exactly the one that may be patient data in the wrong
field (a patient ID in a UID, a name in a description).  The first line of defence is that
the node's own messages describe such values by kind and length (:func:`describe`); the
second is :func:`scrub`, which replaces every quoted substring (how pydicom, pynetdicom and
Python's own exceptions show values: ``'...'``, ``"..."``, ``b'...'``) with its description,
applied to recorded reasons and, through :class:`RedactingFilter`, to every log record and
traceback of the node process, whichever library wrote it.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

# a quoted value as repr() and most exception messages write it; a quote after a letter (node's) opens
# nothing, and a traceback's  File "/path/module.py"  is kept
_QUOTED = re.compile(r"""(?<![A-Za-z0-9_])(?<!File )(b?)(['"])((?:\\.|(?!\2)[^\\\n]){0,4096})\2""")


OWN_LOGGERS = "medclf_node"


def describe(value: object) -> str:
    """``value`` by kind and length only, e.g. ``<text: 10 chars, letters+digits>``."""
    if value is None:
        return "<none>"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<bytes: {len(bytes(value))}>"
    text = str(value)
    if not text:
        return "<empty>"
    kinds = []
    if any(c.isalpha() for c in text):
        kinds.append("letters")
    if any(c.isdigit() for c in text):
        kinds.append("digits")
    if any(c in ". " for c in text):
        kinds.append("dots/spaces")
    if any(not (c.isalnum() or c in ". ") for c in text):
        kinds.append("other")
    return f"<text: {len(text)} chars, {'+'.join(kinds)}>"


def _quoted(match: re.Match[str]) -> str:
    prefix, _, inner = match.groups()
    return f"<bytes: {len(inner)} repr chars>" if prefix else describe(inner)


def scrub(text: str) -> str:
    """``text`` with every quoted substring replaced by its :func:`describe`."""
    return _QUOTED.sub(_quoted, text) if ("'" in text or '"' in text) else text


class RedactingFilter(logging.Filter):
    """A handler filter: messages of other libraries and every traceback are :func:`scrub`-bed.

    The node's own messages (loggers ``medclf_node.*``) are written not to carry values (they
    quote AE titles and rule names, which admins need to read); everything else may quote a
    value from a DICOM object.  Attached to the node's log handlers (``cli``); with
    ``logging.captureWarnings`` it also covers Python warnings (pydicom reports invalid values
    as ``UserWarning``).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(OWN_LOGGERS):
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a broken format string: keep the template only
                message = str(record.msg)
            record.msg, record.args = scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def install(handlers: list[logging.Handler] | None = None) -> None:
    """Put a :class:`RedactingFilter` on ``handlers`` (default: the root logger's) and route warnings to logging."""
    logging.captureWarnings(True)
    for handler in handlers if handlers is not None else logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
