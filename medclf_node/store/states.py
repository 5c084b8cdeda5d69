"""The series state machine: ONE table of allowed transitions, checked in one place.

Why a table: the store has several writers (intake, completion timers, pipeline workers on
several nodes, the outbox, operators), and a state that changes only along these edges
is what lets a restart or another node resume any series without guessing.

    received -> complete -> processing -> reported -> sent
                                       \\-> skipped   (no rule/model matched; nothing to send)
                                       \\-> failed    (pipeline error, or an outbox item went dead)

Plus the edges that recovery and operators need: ``processing -> complete`` (restart, or a
lease that expired: another worker takes it), any finished state or ``processing`` ->
``received`` (a late instance opens the next generation), a finished state -> ``complete``
(re-run the same generation: it rebuilds the very same objects), ``reported|sent -> failed``
(an outbox item went dead), ``failed -> reported`` (dead items re-queued) and
``failed -> sent`` (a dead item delivered after all).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

SeriesState = Literal["received", "complete", "processing", "reported", "sent", "skipped", "failed"]
SERIES_STATES: tuple[str, ...] = (
    "received", "complete", "processing", "reported", "sent", "skipped", "failed",
)
FINISHED_STATES: frozenset[str] = frozenset({"reported", "sent", "skipped", "failed"})
OutboxState = Literal["queued", "sent", "dead"]

#: from-state -> the states it may move to.  Nothing else changes a series' state.
TRANSITIONS: dict[str, frozenset[str]] = {
    "received": frozenset({"complete"}),
    "complete": frozenset({"processing"}),
    "processing": frozenset({"complete", "received", "reported", "skipped", "failed"}),
    "reported": frozenset({"sent", "failed", "received", "complete"}),
    "sent": frozenset({"failed", "received", "complete"}),
    "skipped": frozenset({"received", "complete"}),
    "failed": frozenset({"reported", "sent", "received", "complete"}),
}


class IllegalTransition(ValueError):
    """A state change the table does not allow (a bug in the caller, never bad input)."""


def allowed(src: str, dst: str) -> bool:
    """True when ``src -> dst`` is an edge of :data:`TRANSITIONS`."""
    return dst in TRANSITIONS.get(src, frozenset())


def check(src: str, dst: str, series_uid: str = "") -> None:
    """Raise :class:`IllegalTransition` unless ``src -> dst`` is allowed."""
    if dst not in SERIES_STATES:
        raise IllegalTransition(f"unknown series state {dst!r}")
    if not allowed(src, dst):
        raise IllegalTransition(f"series {series_uid}: {src} -> {dst} is not an allowed transition")


def sources(dst: str, among: Iterable[str] | None = None) -> tuple[str, ...]:
    """The states that may move to ``dst`` (optionally only those in ``among``), for bulk updates.

    Naming a state in ``among`` that may not move to ``dst`` raises: a bulk UPDATE can only
    express transitions of the table.
    """
    if dst not in SERIES_STATES:
        raise IllegalTransition(f"unknown series state {dst!r}")
    wanted = tuple(among) if among is not None else tuple(s for s in SERIES_STATES if allowed(s, dst))
    for s in wanted:
        if not allowed(s, dst):
            raise IllegalTransition(f"{s} -> {dst} is not an allowed transition")
    return tuple(sorted(wanted))
