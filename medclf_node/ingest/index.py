"""The node's durable state: one SQLite database (WAL) at ``data_dir/index.sqlite``.

Everything that must survive a restart lives here: received instances, series and their
state machine, per-model results, and the outbox of result objects to send.

Series states (column ``series.state``)::

    received -> complete -> processing -> reported -> sent
                                       \\-> skipped   (no rule/model matched; nothing to send)
                                       \\-> failed    (pipeline error, or an outbox item went dead)

Outbox states: ``queued -> sent`` or ``queued -> dead`` (after ``dispatch.max_attempts``);
``requeue_dead`` moves dead items back to queued.

Every series row carries a ``generation`` counter.  It increases when a late instance
re-opens a finished series (``completion.late_instances = "reprocess"``), i.e. only when the
series' instance set changed since it was last processed, never on a retry or restart; a worker
that claimed an older generation can detect this, because :meth:`Index.set_series_state`
with ``generation=`` refuses to overwrite a newer one.  The generation is part of the result
objects' UIDs (:mod:`medclf_node.reporting.uids`), and table ``reports`` remembers which result
object each generation produced, so the next one can name it as its predecessor and a re-run of
the same generation (crash, restart) rebuilds the very same object.

``series.sender_state`` says what the sender last did with the series: ``open`` (an association
delivered instances and has not ended), ``released`` (a clean A-RELEASE), ``aborted`` (A-ABORT,
dropped connection, or the node stopped while the association was open).  Only a clean release
clears ``aborted``; while it is set the quiet timer does not complete the series
(:meth:`Index.due_for_completion`).

One connection guarded by a lock serves all threads of the process (writes are
serialised by SQLite anyway, and this avoids SQLITE_BUSY between our own threads);
other processes (``medclf-node jobs``) open their own connection and are protected by
WAL plus ``busy_timeout``.  ``synchronous=FULL`` (``durable=True``, the default): a
committed row survives power loss, which is what a C-STORE Success status promises;
``NORMAL`` survives a crash of the process only.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

SeriesState = Literal["received", "complete", "processing", "reported", "sent", "skipped", "failed"]
SERIES_STATES: tuple[str, ...] = (
    "received", "complete", "processing", "reported", "sent", "skipped", "failed",
)
FINISHED_STATES: frozenset[str] = frozenset({"reported", "sent", "skipped", "failed"})
OutboxState = Literal["queued", "sent", "dead"]

INDEX_FILENAME = "index.sqlite"

# An instance marks its series' sender "open", except that only a clean release clears "aborted".
_SENDER_OPEN = "(CASE WHEN sender_state='aborted' THEN 'aborted' ELSE 'open' END)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid       TEXT NOT NULL,
    study_uid        TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    path             TEXT NOT NULL,
    size             INTEGER NOT NULL,
    calling_ae       TEXT NOT NULL,
    assoc_id         TEXT NOT NULL,
    received_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE INDEX IF NOT EXISTS instances_assoc ON instances(assoc_id);

CREATE TABLE IF NOT EXISTS series (
    series_uid    TEXT PRIMARY KEY,
    study_uid     TEXT NOT NULL,
    calling_ae    TEXT NOT NULL,
    state         TEXT NOT NULL,
    generation    INTEGER NOT NULL DEFAULT 0,
    first_at      REAL NOT NULL,
    last_at       REAL NOT NULL,
    completed_at  REAL,
    completion    TEXT,
    reason_code   TEXT,
    reason_text   TEXT,
    n_instances   INTEGER NOT NULL DEFAULT 0,
    worker        TEXT,
    rule          TEXT,
    timings_json  TEXT,
    updated_at    REAL NOT NULL,
    opened_at     REAL,
    sender_state  TEXT
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);

CREATE TABLE IF NOT EXISTS reports (
    sop_instance_uid  TEXT PRIMARY KEY,
    series_uid        TEXT NOT NULL,
    model_name        TEXT NOT NULL,
    kind              TEXT NOT NULL,
    generation        INTEGER NOT NULL,
    version           INTEGER NOT NULL,
    study_uid         TEXT NOT NULL,
    result_series_uid TEXT NOT NULL,
    sop_class_uid     TEXT NOT NULL,
    predecessor_uid   TEXT,
    created_at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_series ON reports(series_uid, model_name, kind);

CREATE TABLE IF NOT EXISTS results (
    series_uid       TEXT NOT NULL,
    model_name       TEXT NOT NULL,
    model_version    TEXT NOT NULL,
    generation       INTEGER NOT NULL,
    probability      REAL NOT NULL,
    positive         INTEGER NOT NULL,
    key_slice_index  INTEGER,
    timings_json     TEXT NOT NULL,
    details_json     TEXT NOT NULL,
    created_at       REAL NOT NULL,
    PRIMARY KEY (series_uid, model_name)
);

CREATE TABLE IF NOT EXISTS outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    object_uid       TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    destination      TEXT NOT NULL,
    kind             TEXT NOT NULL,
    path             TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL,
    last_error       TEXT,
    created_at       REAL NOT NULL,
    sent_at          REAL,
    UNIQUE (object_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
"""


@dataclass(frozen=True)
class InstanceRecord:
    """One stored instance, as :meth:`Index.record_instance` takes it."""

    sop_instance_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str  # relative to data_dir, POSIX separators
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
    worker: str | None
    rule: str | None
    timings: dict[str, float]
    updated_at: float
    opened_at: float  # when the current generation started receiving (first_at for generation 0)
    sender_state: str | None  # "open" | "released" | "aborted" | None (unknown: older database)


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
    path: str  # relative to data_dir
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    sent_at: float | None


@dataclass(frozen=True)
class RecordOutcome:
    """What :meth:`Index.record_instance` did, so the caller can log it."""

    replaced: bool  # the SOP Instance UID was already indexed (a re-send)
    previous_path: str | None  # where the replaced instance was stored (may differ: UID reuse)
    series_state_before: str | None  # None: first instance of a new series
    reopened: bool  # a late instance re-opened a finished series (generation increased)


def _series_row(r: sqlite3.Row) -> SeriesRow:
    return SeriesRow(
        series_uid=r["series_uid"], study_uid=r["study_uid"], calling_ae=r["calling_ae"], state=r["state"],
        generation=r["generation"], first_at=r["first_at"], last_at=r["last_at"],
        completed_at=r["completed_at"], completion=r["completion"], reason_code=r["reason_code"],
        reason_text=r["reason_text"], n_instances=r["n_instances"], worker=r["worker"], rule=r["rule"],
        timings=json.loads(r["timings_json"]) if r["timings_json"] else {}, updated_at=r["updated_at"],
        opened_at=r["opened_at"] if r["opened_at"] is not None else r["first_at"], sender_state=r["sender_state"],
    )


def _report_record(r: sqlite3.Row) -> ReportRecord:
    return ReportRecord(
        sop_instance_uid=r["sop_instance_uid"], series_uid=r["series_uid"], model_name=r["model_name"],
        kind=r["kind"], generation=r["generation"], version=r["version"], study_uid=r["study_uid"],
        result_series_uid=r["result_series_uid"], sop_class_uid=r["sop_class_uid"],
        predecessor_uid=r["predecessor_uid"],
    )


def _outbox_item(r: sqlite3.Row) -> OutboxItem:
    return OutboxItem(
        id=r["id"], object_uid=r["object_uid"], series_uid=r["series_uid"], destination=r["destination"],
        kind=r["kind"], path=r["path"], state=r["state"], attempts=r["attempts"],
        next_attempt_at=r["next_attempt_at"], last_error=r["last_error"], created_at=r["created_at"],
        sent_at=r["sent_at"],
    )


class Index:
    """Thread-safe access to ``index.sqlite``.  Create one per process; call :meth:`close` at exit.

    All timestamps are ``time.time()`` seconds.  Methods that change state commit before
    returning, so a caller may acknowledge/act on the change immediately.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        late_instances: Literal["reprocess", "ignore"] = "reprocess",
        durable: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / INDEX_FILENAME
        self.late_instances = late_instances
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._conn.execute("PRAGMA busy_timeout=10000")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._migrate()
            self._conn.executescript(_SCHEMA)

    def _migrate(self) -> None:
        """Add the columns newer code needs to a database written by an older version."""
        cols = {r[1] for r in self._conn.execute("PRAGMA table_info(series)").fetchall()}
        if not cols:
            return  # new database: the schema creates everything
        for name, decl in (("opened_at", "REAL"), ("sender_state", "TEXT")):
            if name not in cols:
                self._conn.execute(f"ALTER TABLE series ADD COLUMN {name} {decl}")
                log.info("index: added column series.%s", name)

    # --- plumbing ----------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- intake ------------------------------------------------------------------------
    def record_instance(self, rec: InstanceRecord) -> RecordOutcome:
        """Index a stored instance (idempotent per SOP Instance UID) and update its series.

        A new series starts in ``received``.  For an existing series, what a late instance
        does depends on ``late_instances`` and the series state:

        * ``received`` / ``complete``: the instance simply joins the series (a ``complete``
          series not yet claimed will be processed with it).
        * ``processing`` or finished (``reported``/``sent``/``skipped``/``failed``):
          with ``"reprocess"`` the series goes back to ``received`` with ``generation + 1``
          (completion detection runs again, then the pipeline re-processes it); with
          ``"ignore"`` the instance is only recorded and the state is left alone.

        A re-sent instance whose SOP Instance UID is already indexed replaces the old row
        and does not re-open anything by itself (same content, same UID).
        """
        with self._tx() as c:
            old = c.execute(
                "SELECT series_uid, path FROM instances WHERE sop_instance_uid=?", (rec.sop_instance_uid,)
            ).fetchone()
            previous = None if old is None else str(old["path"])
            c.execute(
                "INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid, transfer_syntax,"
                " path, size, calling_ae, assoc_id, received_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(sop_instance_uid) DO UPDATE SET series_uid=excluded.series_uid,"
                " study_uid=excluded.study_uid, sop_class_uid=excluded.sop_class_uid,"
                " transfer_syntax=excluded.transfer_syntax, path=excluded.path, size=excluded.size,"
                " calling_ae=excluded.calling_ae, assoc_id=excluded.assoc_id, received_at=excluded.received_at",
                (rec.sop_instance_uid, rec.series_uid, rec.study_uid, rec.sop_class_uid, rec.transfer_syntax,
                 rec.path, rec.size, rec.calling_ae, rec.assoc_id, rec.received_at),
            )
            if old is not None and old["series_uid"] != rec.series_uid:
                c.execute(
                    "UPDATE series SET n_instances=(SELECT COUNT(*) FROM instances WHERE series_uid=?)"
                    " WHERE series_uid=?", (old["series_uid"], old["series_uid"]),
                )
            s = c.execute("SELECT state, generation FROM series WHERE series_uid=?", (rec.series_uid,)).fetchone()
            now = rec.received_at
            if s is None:
                c.execute(
                    "INSERT INTO series (series_uid, study_uid, calling_ae, state, first_at, last_at,"
                    " n_instances, updated_at, opened_at, sender_state) VALUES (?,?,?,'received',?,?,1,?,?,'open')",
                    (rec.series_uid, rec.study_uid, rec.calling_ae, now, now, now, now),
                )
                return RecordOutcome(old is not None, previous, series_state_before=None, reopened=False)
            state = str(s["state"])
            reopen = (
                old is None
                and self.late_instances == "reprocess"
                and (state == "processing" or state in FINISHED_STATES)
            )
            if reopen:
                c.execute(
                    "UPDATE series SET state='received', generation=generation+1, completed_at=NULL,"
                    " completion=NULL, reason_code='late_instance', reason_text=?, worker=NULL,"
                    " last_at=?, updated_at=?, opened_at=?, sender_state='open',"
                    " n_instances=(SELECT COUNT(*) FROM instances WHERE series_uid=?) WHERE series_uid=?",
                    (f"re-opened from {state} by a late instance", now, now, now, rec.series_uid, rec.series_uid),
                )
            else:
                c.execute(
                    "UPDATE series SET last_at=MAX(last_at, ?), updated_at=?, sender_state=" + _SENDER_OPEN + ","
                    " n_instances=(SELECT COUNT(*) FROM instances WHERE series_uid=?) WHERE series_uid=?",
                    (now, now, rec.series_uid, rec.series_uid),
                )
            return RecordOutcome(old is not None, previous, series_state_before=state, reopened=reopen)

    def has_instance(self, sop_instance_uid: str) -> bool:
        return bool(self._query("SELECT 1 FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)))

    def instance_paths(self) -> list[str]:
        """Relative paths of every indexed instance (for consistency checks)."""
        return [r[0] for r in self._query("SELECT path FROM instances")]

    # --- completion --------------------------------------------------------------------
    def series_of_association(self, assoc_id: str) -> list[str]:
        """Series UIDs that received at least one instance through ``assoc_id``."""
        return [
            r[0] for r in self._query("SELECT DISTINCT series_uid FROM instances WHERE assoc_id=?", (assoc_id,))
        ]

    def mark_complete(self, series_uid: str, how: str, *, now: float | None = None) -> bool:
        """``received -> complete``; ``how`` is "release", "quiet", "max_wait" or "forced".

        Returns False (and changes nothing) unless the series is in ``received``.
        """
        t = time.time() if now is None else now
        with self._tx() as c:
            cur = c.execute(
                "UPDATE series SET state='complete', completed_at=?, completion=?, updated_at=?"
                " WHERE series_uid=? AND state='received'",
                (t, how, t, series_uid),
            )
            return cur.rowcount == 1

    def due_for_completion(
        self, quiet_seconds: float, max_wait_seconds: float, now: float, *, quiet_after_abort: bool = False
    ) -> list[tuple[str, str]]:
        """``(series_uid, how)`` for received series whose quiet time or maximum wait has passed.

        The maximum wait counts from the first instance of the current generation (a series
        re-opened by late instances starts over).  A series whose sender aborted is not
        completed by the quiet time unless ``quiet_after_abort``: only a clean release
        (which clears the mark) or the maximum wait ends it.
        """
        rows = self._query(
            "SELECT series_uid, COALESCE(opened_at, first_at) AS opened, last_at, sender_state FROM series"
            " WHERE state='received' AND (last_at <= ? OR COALESCE(opened_at, first_at) <= ?)",
            (now - quiet_seconds, now - max_wait_seconds),
        )
        out: list[tuple[str, str]] = []
        for r in rows:
            if r["opened"] <= now - max_wait_seconds:
                out.append((str(r["series_uid"]), "max_wait"))
            elif quiet_after_abort or r["sender_state"] != "aborted":
                out.append((str(r["series_uid"]), "quiet"))
        return out

    def held_after_abort(self, quiet_seconds: float, now: float) -> list[SeriesRow]:
        """Received series that are quiet but wait because their sender aborted (for logging)."""
        rows = self._query(
            "SELECT * FROM series WHERE state='received' AND sender_state='aborted' AND last_at <= ?",
            (now - quiet_seconds,),
        )
        return [_series_row(r) for r in rows]

    def set_sender_state(self, series_uids: Sequence[str], sender_state: Literal["released", "aborted"]) -> int:
        """Record how an association that delivered these series ended; returns rows changed.

        Only series still ``received`` are touched: a finished series is re-opened (and marked
        ``open``) by its next new instance anyway.
        """
        if not series_uids:
            return 0
        marks = ",".join("?" for _ in series_uids)
        with self._tx() as c:
            return int(c.execute(
                f"UPDATE series SET sender_state=? WHERE state='received' AND series_uid IN ({marks})",
                (sender_state, *series_uids),
            ).rowcount)

    def hold_interrupted_on_startup(self) -> list[str]:
        """After a crash/restart: a received series whose association was still open counts as aborted.

        The node stopping (kill -9, power loss) dropped that connection; the sender did not
        say it was done.  Call once at start-up before the listener opens.
        """
        with self._tx() as c:
            uids = [str(r[0]) for r in c.execute(
                "SELECT series_uid FROM series WHERE state='received' AND sender_state='open'")]
            c.execute("UPDATE series SET sender_state='aborted' WHERE state='received' AND sender_state='open'")
        return uids

    # --- pipeline ----------------------------------------------------------------------
    def claim_next_complete(self, worker: str) -> SeriesRow | None:
        """Atomically take the oldest ``complete`` series and move it to ``processing``.

        Returns the claimed row (state already ``processing``; remember its ``generation``)
        or None when nothing is waiting.  Two workers never get the same series.
        """
        now = time.time()
        with self._tx() as c:
            r = c.execute(
                "SELECT series_uid FROM series WHERE state='complete' ORDER BY completed_at, series_uid LIMIT 1"
            ).fetchone()
            if r is None:
                return None
            c.execute(
                "UPDATE series SET state='processing', worker=?, updated_at=? WHERE series_uid=?",
                (worker, now, r["series_uid"]),
            )
            row = c.execute("SELECT * FROM series WHERE series_uid=?", (r["series_uid"],)).fetchone()
            return _series_row(row)

    def set_series_state(
        self,
        series_uid: str,
        state: SeriesState,
        reason_code: str | None = None,
        reason_text: str | None = None,
        *,
        generation: int | None = None,
        rule: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> bool:
        """Move a series to ``state`` and record why.

        With ``generation`` given, the update only happens if the series still has that
        generation (a late instance may have re-opened it meanwhile): returns False then.
        ``rule`` and ``timings`` (seconds per stage, e.g. {"volume": 0.4, "inference": 0.8})
        are stored for ``jobs`` when given.  Returns True when a row changed.
        """
        if state not in SERIES_STATES:
            raise ValueError(f"unknown series state {state!r}")
        now = time.time()
        sets = ["state=?", "reason_code=?", "reason_text=?", "updated_at=?"]
        params: list[Any] = [state, reason_code, reason_text, now]
        if rule is not None:
            sets.append("rule=?")
            params.append(rule)
        if timings is not None:
            sets.append("timings_json=?")
            params.append(json.dumps(timings))
        if state == "complete":
            sets.append("completed_at=COALESCE(completed_at, ?)")
            params.append(now)
        sql = f"UPDATE series SET {', '.join(sets)} WHERE series_uid=?"
        params.append(series_uid)
        if generation is not None:
            sql += " AND generation=?"
            params.append(generation)
        with self._tx() as c:
            return c.execute(sql, params).rowcount == 1

    def force_complete(self, series_uid: str) -> bool:
        """Operator action: a ``received`` series becomes ``complete`` now (how="forced")."""
        return self.mark_complete(series_uid, "forced")

    def series_paths(self, series_uid: str) -> list[Path]:
        """Absolute paths of the series' instance files, sorted by SOP Instance UID.

        Sorting here is only for determinism; the volume builder orders slices geometrically.
        """
        rows = self._query(
            "SELECT path FROM instances WHERE series_uid=? ORDER BY sop_instance_uid", (series_uid,)
        )
        return [self.data_dir / r[0] for r in rows]

    def get_series(self, series_uid: str) -> SeriesRow | None:
        rows = self._query("SELECT * FROM series WHERE series_uid=?", (series_uid,))
        return _series_row(rows[0]) if rows else None

    def list_series(self, states: Sequence[str] | None = None, limit: int = 1000) -> list[SeriesRow]:
        """Series, newest activity first (for ``medclf-node jobs``)."""
        if states:
            marks = ",".join("?" for _ in states)
            rows = self._query(
                f"SELECT * FROM series WHERE state IN ({marks}) ORDER BY updated_at DESC LIMIT ?",
                (*states, limit),
            )
        else:
            rows = self._query("SELECT * FROM series ORDER BY updated_at DESC LIMIT ?", (limit,))
        return [_series_row(r) for r in rows]

    def series_counts(self) -> dict[str, int]:
        """Number of series in each state (metrics)."""
        return {str(r[0]): int(r[1]) for r in self._query("SELECT state, COUNT(*) FROM series GROUP BY state")}

    def outbox_depth(self) -> int:
        """Result objects still waiting to be sent (metrics)."""
        return int(self._query("SELECT COUNT(*) FROM outbox WHERE state='queued'")[0][0])

    def ping(self) -> bool:
        """The index answers a query (readiness)."""
        return bool(self._query("SELECT 1"))

    def retention_candidates(self) -> list[tuple[str, str, str, float]]:
        """``(series_uid, state, path, finished_at)`` for every instance of a finished series."""
        marks = ",".join("?" for _ in FINISHED_STATES)
        rows = self._query(
            f"SELECT s.series_uid, s.state, i.path, s.updated_at FROM instances i JOIN series s"
            f" ON s.series_uid = i.series_uid WHERE s.state IN ({marks})",
            tuple(sorted(FINISHED_STATES)),
        )
        return [(str(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in rows]

    def forget_instances(self, paths: Sequence[str]) -> int:
        """Drop the index rows of deleted spool files (paths relative to data_dir).

        The series rows stay (``jobs`` keeps the history; ``n_instances`` keeps what was received).
        """
        with self._tx() as c:
            return sum(c.execute("DELETE FROM instances WHERE path=?", (p,)).rowcount for p in paths)

    def reset_processing_on_startup(self) -> int:
        """After a crash/restart: every ``processing`` series goes back to ``complete``.

        Call once at start-up before workers run.  Returns how many series were reset.
        """
        now = time.time()
        with self._tx() as c:
            n = c.execute(
                "UPDATE series SET state='complete', worker=NULL, updated_at=?,"
                " reason_text='resumed after restart' WHERE state='processing'",
                (now,),
            ).rowcount
        if n:
            log.info("resuming %d series that were being processed when the node stopped", n)
        return int(n)

    def record_result(
        self,
        series_uid: str,
        model_name: str,
        model_version: str,
        probability: float,
        positive: bool,
        *,
        generation: int = 0,
        key_slice_index: int | None = None,
        timings: dict[str, float] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Store (or replace) one model's result for a series.  ``details`` must be JSON-serialisable."""
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO results (series_uid, model_name, model_version, generation, probability,"
                " positive, key_slice_index, timings_json, details_json, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (series_uid, model_name, model_version, generation, float(probability), int(bool(positive)),
                 key_slice_index, json.dumps(timings or {}), json.dumps(details or {}), time.time()),
            )

    def results(self, series_uid: str) -> list[ResultRow]:
        rows = self._query("SELECT * FROM results WHERE series_uid=? ORDER BY model_name", (series_uid,))
        return [
            ResultRow(
                series_uid=r["series_uid"], model_name=r["model_name"], model_version=r["model_version"],
                generation=r["generation"], probability=r["probability"], positive=bool(r["positive"]),
                key_slice_index=r["key_slice_index"], timings=json.loads(r["timings_json"]),
                details=json.loads(r["details_json"]), created_at=r["created_at"],
            )
            for r in rows
        ]

    # --- result versions ---------------------------------------------------------------
    def report_version(
        self, series_uid: str, model_name: str, kind: Literal["SR", "SC"], sop_instance_uid: str
    ) -> tuple[int, ReportRecord | None]:
        """``(version, predecessor)`` for the result object ``sop_instance_uid`` about to be built.

        If that object was recorded before (a re-run of the same generation after a crash or
        restart), its stored version and predecessor come back, so it is rebuilt identically.
        Otherwise the predecessor is the newest object recorded for this series, model and kind
        (any earlier generation or model version) and the version is one more than its.
        """
        with self._lock:
            mine = self._conn.execute("SELECT * FROM reports WHERE sop_instance_uid=?", (sop_instance_uid,)).fetchone()
            if mine is not None:
                pre_uid = mine["predecessor_uid"]
                pre = None if pre_uid is None else self._conn.execute(
                    "SELECT * FROM reports WHERE sop_instance_uid=?", (pre_uid,)).fetchone()
                return int(mine["version"]), None if pre is None else _report_record(pre)
            last = self._conn.execute(
                "SELECT * FROM reports WHERE series_uid=? AND model_name=? AND kind=?"
                " ORDER BY version DESC, created_at DESC LIMIT 1", (series_uid, model_name, kind),
            ).fetchone()
        if last is None:
            return 1, None
        prev = _report_record(last)
        return prev.version + 1, prev

    def record_report(self, rec: ReportRecord, *, generation: int | None = None) -> bool:
        """Remember a result object (idempotent per SOP Instance UID) before it is queued.

        With ``generation`` given, refuses (returns False) when the series has moved on to a
        newer generation meanwhile: an object computed from an outdated instance set is not sent.
        """
        with self._tx() as c:
            if generation is not None:
                cur = c.execute("SELECT generation FROM series WHERE series_uid=?", (rec.series_uid,)).fetchone()
                if cur is not None and int(cur[0]) != generation:
                    return False
            c.execute(
                "INSERT OR IGNORE INTO reports (sop_instance_uid, series_uid, model_name, kind, generation, version,"
                " study_uid, result_series_uid, sop_class_uid, predecessor_uid, created_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (rec.sop_instance_uid, rec.series_uid, rec.model_name, rec.kind, rec.generation, rec.version,
                 rec.study_uid, rec.result_series_uid, rec.sop_class_uid, rec.predecessor_uid, time.time()),
            )
            return True

    def reports(self, series_uid: str) -> list[ReportRecord]:
        """Every result object recorded for a series, oldest version first."""
        rows = self._query("SELECT * FROM reports WHERE series_uid=? ORDER BY model_name, kind, version",
                           (series_uid,))
        return [_report_record(r) for r in rows]

    # --- outbox ------------------------------------------------------------------------
    def enqueue_outbox(
        self,
        object_uid: str,
        series_uid: str,
        destination: str,
        kind: Literal["SR", "SC"],
        path: str,
        *,
        replace_sent: bool = False,
    ) -> bool:
        """Persist one object for delivery to ``destination`` (peer name or "sender").

        ``path`` is relative to data_dir and the file must already be durably written.
        Idempotent per (object_uid, destination): enqueuing again after a crash does not
        create a second item.  An item already ``sent`` stays sent unless ``replace_sent``
        (use it when the content changed, e.g. re-processing after a late instance).
        Returns True if the item is (now) queued, False if it was left as sent.
        """
        now = time.time()
        with self._tx() as c:
            r = c.execute(
                "SELECT state FROM outbox WHERE object_uid=? AND destination=?", (object_uid, destination)
            ).fetchone()
            if r is None:
                c.execute(
                    "INSERT INTO outbox (object_uid, series_uid, destination, kind, path, state, attempts,"
                    " next_attempt_at, created_at) VALUES (?,?,?,?,?,'queued',0,?,?)",
                    (object_uid, series_uid, destination, kind, path, now, now),
                )
                return True
            if r["state"] == "sent" and not replace_sent:
                return False
            c.execute(
                "UPDATE outbox SET path=?, kind=?, series_uid=?, state='queued', attempts=0, next_attempt_at=?,"
                " last_error=NULL, sent_at=NULL WHERE object_uid=? AND destination=?",
                (path, kind, series_uid, now, object_uid, destination),
            )
            return True

    def due_outbox(self, now: float, limit: int = 100) -> list[OutboxItem]:
        """Queued items whose ``next_attempt_at`` has come, oldest first."""
        rows = self._query(
            "SELECT * FROM outbox WHERE state='queued' AND next_attempt_at<=? ORDER BY next_attempt_at, id LIMIT ?",
            (now, limit),
        )
        return [_outbox_item(r) for r in rows]

    def next_outbox_due_at(self) -> float | None:
        """Earliest ``next_attempt_at`` of any queued item (None: nothing queued)."""
        rows = self._query("SELECT MIN(next_attempt_at) FROM outbox WHERE state='queued'")
        v = rows[0][0] if rows else None
        return None if v is None else float(v)

    def outbox_items(self, series_uid: str | None = None, state: str | None = None) -> list[OutboxItem]:
        sql, params = "SELECT * FROM outbox WHERE 1=1", []
        if series_uid is not None:
            sql += " AND series_uid=?"
            params.append(series_uid)
        if state is not None:
            sql += " AND state=?"
            params.append(state)
        return [_outbox_item(r) for r in self._query(sql + " ORDER BY id", params)]

    def mark_sent(self, item_id: int) -> None:
        """Item delivered.  When no item of its series is left queued or dead, the series
        moves ``reported -> sent`` (and ``failed`` caused by a dead item back to ``sent``)."""
        now = time.time()
        with self._tx() as c:
            c.execute(
                "UPDATE outbox SET state='sent', sent_at=?, attempts=attempts+1, last_error=NULL WHERE id=?",
                (now, item_id),
            )
            r = c.execute("SELECT series_uid FROM outbox WHERE id=?", (item_id,)).fetchone()
            if r is None:
                return
            left = c.execute(
                "SELECT COUNT(*) FROM outbox WHERE series_uid=? AND state!='sent'", (r[0],)
            ).fetchone()[0]
            if left == 0:
                c.execute(
                    "UPDATE series SET state='sent', reason_code=NULL, reason_text=NULL, updated_at=?"
                    " WHERE series_uid=? AND (state='reported' OR (state='failed' AND reason_code='dispatch_dead'))",
                    (now, r[0]),
                )

    def mark_failed_attempt(self, item_id: int, error: str, next_attempt_at: float, max_attempts: int) -> str:
        """Record a failed send; dead-letter the item once ``max_attempts`` is reached.

        Returns the item's new state ("queued" or "dead").  A dead item marks its series
        ``failed`` with reason_code ``dispatch_dead``.
        """
        now = time.time()
        with self._tx() as c:
            r = c.execute("SELECT attempts, series_uid FROM outbox WHERE id=?", (item_id,)).fetchone()
            if r is None:
                raise KeyError(item_id)
            attempts = int(r["attempts"]) + 1
            state = "dead" if attempts >= max_attempts else "queued"
            c.execute(
                "UPDATE outbox SET attempts=?, state=?, next_attempt_at=?, last_error=? WHERE id=?",
                (attempts, state, next_attempt_at, error[:1000], item_id),
            )
            if state == "dead":
                c.execute(
                    "UPDATE series SET state='failed', reason_code='dispatch_dead', reason_text=?, updated_at=?"
                    " WHERE series_uid=? AND state IN ('reported', 'sent')",
                    (f"delivery failed: {error[:200]}", now, r["series_uid"]),
                )
            return state

    def mark_dead(self, item_id: int, error: str) -> None:
        """Dead-letter an item at once (e.g. its destination cannot be resolved)."""
        with self._tx() as c:
            c.execute(
                "UPDATE outbox SET state='dead', last_error=? WHERE id=?", (error[:1000], item_id)
            )
            r = c.execute("SELECT series_uid FROM outbox WHERE id=?", (item_id,)).fetchone()
            if r is not None:
                c.execute(
                    "UPDATE series SET state='failed', reason_code='dispatch_dead', reason_text=?, updated_at=?"
                    " WHERE series_uid=? AND state IN ('reported', 'sent')",
                    (f"delivery failed: {error[:200]}", time.time(), r[0]),
                )

    def requeue_dead(self, series_uids: Sequence[str] | None = None) -> int:
        """Dead items (all, or those of the given series) go back to ``queued`` with
        attempts reset; their series return from ``failed``/dispatch_dead to ``reported``.
        Returns the number of items re-queued."""
        now = time.time()
        with self._tx() as c:
            if series_uids is None:
                uids = [r[0] for r in c.execute("SELECT DISTINCT series_uid FROM outbox WHERE state='dead'")]
            else:
                uids = list(series_uids)
            n = 0
            for uid in uids:
                n += c.execute(
                    "UPDATE outbox SET state='queued', attempts=0, next_attempt_at=?, last_error=NULL"
                    " WHERE state='dead' AND series_uid=?",
                    (now, uid),
                ).rowcount
                c.execute(
                    "UPDATE series SET state='reported', reason_code=NULL, reason_text='re-queued', updated_at=?"
                    " WHERE series_uid=? AND state='failed' AND reason_code='dispatch_dead'",
                    (now, uid),
                )
            return int(n)
