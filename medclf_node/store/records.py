"""Frozen rows the store hands out and takes: the same for every back-end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class InstanceRecord:
    """One stored instance, as :meth:`Store.record_instance` takes it."""

    sop_instance_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str  # relative to the store's files directory, POSIX separators
    size: int
    calling_ae: str
    assoc_id: str
    received_at: float


@dataclass(frozen=True)
class SeriesRow:
    """A row of ``series`` (what ``jobs`` shows and the pipeline claims)."""

    series_uid: str
    study_uid: str
    calling_ae: str
    state: str
    generation: int
    first_at: float
    last_at: float
    completed_at: float | None
    completion: str | None
    reason_code: str | None
    reason_text: str | None
    n_instances: int
    worker: str | None  # lease holder while processing ("<node id>/<worker>")
    rule: str | None
    timings: dict[str, float]
    updated_at: float
    opened_at: float  # when the current generation started receiving (first_at for generation 0)
    sender_state: str | None  # "open" | "released" | "aborted" | None (unknown: older database)
    lease_expires_at: float | None = None  # while processing: another worker may take it after this


@dataclass(frozen=True)
class ReportRecord:
    """One result object a generation produced (table ``reports``): what a successor names."""

    sop_instance_uid: str
    series_uid: str
    model_name: str
    kind: str  # "SR" | "SC"
    generation: int
    version: int  # 1, 2, ...: the n-th distinct result object of this series, model and kind
    study_uid: str
    result_series_uid: str
    sop_class_uid: str
    predecessor_uid: str | None


@dataclass(frozen=True)
class ResultRow:
    """One model's result for a series."""

    series_uid: str
    model_name: str
    model_version: str
    generation: int
    probability: float
    positive: bool
    key_slice_index: int | None
    timings: dict[str, float]
    details: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class OutboxItem:
    """One result object waiting for (or done with) delivery to one destination."""

    id: int
    object_uid: str
    series_uid: str
    destination: str  # a peer name, or "sender"
    kind: str  # "SR" | "SC"
    path: str  # relative to the store's files directory
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    sent_at: float | None


@dataclass(frozen=True)
class RecordOutcome:
    """What :meth:`Store.record_instance` did, so the caller can log it."""

    replaced: bool  # the SOP Instance UID was already indexed (a re-send)
    previous_path: str | None  # where the replaced instance was stored (may differ: UID reuse)
    series_state_before: str | None  # None: first instance of a new series
    reopened: bool  # a late instance re-opened a finished series (generation increased)
