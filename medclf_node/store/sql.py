"""The store's logic, written once in the SQL both back-ends speak.

Why one core: the semantics (idempotent intake, the generation rule, the state machine,
claims and leases, the outbox) must be identical on SQLite and PostgreSQL; only connecting,
transactions, row locking and migrations differ, and those are the back-end's hooks
(:class:`SqlStore` subclasses).  SQL here uses ``?`` placeholders; a back-end that needs
another style translates them.  Every series state change passes :mod:`states`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from medclf_node.store import states
from medclf_node.store.interface import Kind
from medclf_node.store.records import (
    InstanceRecord,
    OutboxItem,
    RecordOutcome,
    ReportRecord,
    ResultRow,
    SeriesRow,
)
from medclf_node.store.states import FINISHED_STATES, SeriesState, check

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_LEASE_SECONDS = 60.0

# An instance marks its series' sender "open", except that only a clean release clears "aborted".
_SENDER_OPEN = "(CASE WHEN sender_state='aborted' THEN 'aborted' ELSE 'open' END)"


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...
    def fetchall(self) -> Any: ...


class Tx(Protocol):
    """One open transaction: ``execute`` with ``?`` placeholders; rows allow ``row["column"]``."""

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor: ...


def _marks(n: int) -> str:
    return ",".join("?" for _ in range(n))


def _series_row(r: Any) -> SeriesRow:
    return SeriesRow(
        series_uid=r["series_uid"], study_uid=r["study_uid"], calling_ae=r["calling_ae"], state=r["state"],
        generation=int(r["generation"]), first_at=r["first_at"], last_at=r["last_at"],
        completed_at=r["completed_at"], completion=r["completion"], reason_code=r["reason_code"],
        reason_text=r["reason_text"], n_instances=int(r["n_instances"]), worker=r["worker"], rule=r["rule"],
        timings=json.loads(r["timings_json"]) if r["timings_json"] else {}, updated_at=r["updated_at"],
        opened_at=r["opened_at"] if r["opened_at"] is not None else r["first_at"], sender_state=r["sender_state"],
        lease_expires_at=r["lease_expires_at"],
    )


def _report_record(r: Any) -> ReportRecord:
    return ReportRecord(
        sop_instance_uid=r["sop_instance_uid"], series_uid=r["series_uid"], model_name=r["model_name"],
        kind=r["kind"], generation=int(r["generation"]), version=int(r["version"]), study_uid=r["study_uid"],
        result_series_uid=r["result_series_uid"], sop_class_uid=r["sop_class_uid"],
        predecessor_uid=r["predecessor_uid"],
    )


def _outbox_item(r: Any) -> OutboxItem:
    return OutboxItem(
        id=int(r["id"]), object_uid=r["object_uid"], series_uid=r["series_uid"], destination=r["destination"],
        kind=r["kind"], path=r["path"], state=r["state"], attempts=int(r["attempts"]),
        next_attempt_at=r["next_attempt_at"], last_error=r["last_error"], created_at=r["created_at"],
        sent_at=r["sent_at"],
    )


class SqlStore:
    """The :class:`~medclf_node.store.interface.Store` on a SQL database; subclasses connect."""

    backend = "sql"
    #: appended to a SELECT that is followed by an UPDATE of the same rows in one transaction
    _LOCK = ""
    #: appended to a SELECT that claims work: rows another transaction holds are skipped
    _CLAIM = ""
    #: the scalar two-argument maximum
    _GREATEST = "MAX"

    def __init__(
        self,
        files_dir: Path,
        *,
        node_id: str,
        late_instances: Literal["reprocess", "ignore"] = "reprocess",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        self.files_dir = Path(files_dir)
        self.node_id = node_id
        self.late_instances = late_instances
        self.lease_seconds = float(lease_seconds)

    # --- back-end hooks -------------------------------------------------------------------
    def _write(self, work: Callable[[Tx], T]) -> T:
        """Run ``work`` in one write transaction, committed before returning (retried if the
        database chose this transaction as a deadlock victim)."""
        raise NotImplementedError

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def schema_version(self) -> int:
        raise NotImplementedError

    # --- helpers --------------------------------------------------------------------------
    def holder(self, worker: str) -> str:
        """The lease holder a worker of this node writes: ``<node id>/<worker>``."""
        return f"{self.node_id}/{worker}"

    def _transition(self, c: Tx, series_uid: str, dst: str, sets: Sequence[str], params: Sequence[Any], *,
                    expect: Sequence[str] | None = None, generation: int | None = None,
                    holder: str | None = None) -> bool:
        """The one place a single series changes state: lock the row, check the table, update.

        Returns False (nothing changed) when the series does not exist, is not in ``expect``
        (a race the caller expects, e.g. two completion triggers), or has moved to another
        generation / lease holder.  A transition the table forbids raises
        :class:`~medclf_node.store.states.IllegalTransition`.
        """
        r = c.execute(f"SELECT state, generation, worker FROM series WHERE series_uid=?{self._LOCK}",
                      (series_uid,)).fetchone()
        if r is None:
            return False
        src = str(r["state"])
        if generation is not None and int(r["generation"]) != generation:
            return False
        if holder is not None and r["worker"] != holder:
            return False
        if expect is not None and src not in expect:
            return False
        if src != dst:
            check(src, dst, series_uid)
        assign = ", ".join(["state=?", *sets])
        c.execute(f"UPDATE series SET {assign} WHERE series_uid=?", (dst, *params, series_uid))
        return True

    # --- instances ------------------------------------------------------------------------
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
        def work(c: Tx) -> RecordOutcome:
            old = c.execute(f"SELECT series_uid, path FROM instances WHERE sop_instance_uid=?{self._LOCK}",
                            (rec.sop_instance_uid,)).fetchone()
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
                c.execute("UPDATE series SET n_instances=(SELECT COUNT(*) FROM instances WHERE series_uid=?)"
                          " WHERE series_uid=?", (old["series_uid"], old["series_uid"]))
            now = rec.received_at
            created = c.execute(
                "INSERT INTO series (series_uid, study_uid, calling_ae, state, first_at, last_at, n_instances,"
                " updated_at, opened_at, sender_state, sender_node) VALUES (?,?,?,'received',?,?,1,?,?,'open',?)"
                " ON CONFLICT(series_uid) DO NOTHING",
                (rec.series_uid, rec.study_uid, rec.calling_ae, now, now, now, now, self.node_id),
            ).rowcount
            if created == 1:
                return RecordOutcome(old is not None, previous, series_state_before=None, reopened=False)
            s = c.execute(f"SELECT state FROM series WHERE series_uid=?{self._LOCK}", (rec.series_uid,)).fetchone()
            state = str(s["state"])
            reopen = (old is None and self.late_instances == "reprocess"
                      and (state == "processing" or state in FINISHED_STATES))
            count = "(SELECT COUNT(*) FROM instances WHERE series_uid=?)"
            if reopen:
                self._transition(
                    c, rec.series_uid, "received",
                    ["generation=generation+1", "completed_at=NULL", "completion=NULL",
                     "reason_code='late_instance'", "reason_text=?", "worker=NULL", "lease_expires_at=NULL",
                     "last_at=?", "updated_at=?", "opened_at=?", "sender_state='open'", "sender_node=?",
                     f"n_instances={count}"],
                    (f"re-opened from {state} by a late instance", now, now, now, self.node_id, rec.series_uid),
                )
            else:
                c.execute(
                    f"UPDATE series SET last_at={self._GREATEST}(last_at, ?), updated_at=?,"
                    f" sender_state={_SENDER_OPEN}, sender_node=?, n_instances={count} WHERE series_uid=?",
                    (now, now, self.node_id, rec.series_uid, rec.series_uid),
                )
            return RecordOutcome(old is not None, previous, series_state_before=state, reopened=reopen)

        return self._write(work)

    def has_instance(self, sop_instance_uid: str) -> bool:
        return bool(self._query("SELECT 1 AS one FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)))

    def instance_paths(self) -> list[str]:
        """Relative paths of every indexed instance (for consistency checks)."""
        return [str(r["path"]) for r in self._query("SELECT path FROM instances ORDER BY path")]

    def series_paths(self, series_uid: str) -> list[Path]:
        """Absolute paths of the series' instance files, sorted by SOP Instance UID.

        Sorting here is only for determinism; the volume builder orders slices geometrically.
        """
        rows = self._query("SELECT path FROM instances WHERE series_uid=? ORDER BY sop_instance_uid",
                           (series_uid,))
        return [self.files_dir / r["path"] for r in rows]

    def series_of_association(self, assoc_id: str) -> list[str]:
        """Series UIDs that received at least one instance through ``assoc_id``."""
        rows = self._query("SELECT DISTINCT series_uid FROM instances WHERE assoc_id=? ORDER BY series_uid",
                           (assoc_id,))
        return [str(r["series_uid"]) for r in rows]

    # --- series ---------------------------------------------------------------------------
    def get_series(self, series_uid: str) -> SeriesRow | None:
        rows = self._query("SELECT * FROM series WHERE series_uid=?", (series_uid,))
        return _series_row(rows[0]) if rows else None

    def list_series(self, states: Sequence[str] | None = None, limit: int = 1000) -> list[SeriesRow]:
        """Series, newest activity first (for ``medclf-node jobs``)."""
        if states:
            rows = self._query(
                f"SELECT * FROM series WHERE state IN ({_marks(len(states))}) ORDER BY updated_at DESC LIMIT ?",
                (*states, limit),
            )
        else:
            rows = self._query("SELECT * FROM series ORDER BY updated_at DESC LIMIT ?", (limit,))
        return [_series_row(r) for r in rows]

    def series_counts(self) -> dict[str, int]:
        """Number of series in each state (metrics)."""
        rows = self._query("SELECT state, COUNT(*) AS n FROM series GROUP BY state")
        return {str(r["state"]): int(r["n"]) for r in rows}

    def mark_complete(self, series_uid: str, how: str, *, now: float | None = None) -> bool:
        """``received -> complete``; ``how`` is "release", "quiet", "max_wait" or "forced".

        Returns False (and changes nothing) unless the series is in ``received``.
        """
        t = time.time() if now is None else now
        return self._write(lambda c: self._transition(
            c, series_uid, "complete", ["completed_at=?", "completion=?", "updated_at=?"], (t, how, t),
            expect=("received",)))

    def force_complete(self, series_uid: str) -> bool:
        """Operator action: a ``received`` series becomes ``complete`` now (how="forced")."""
        return self.mark_complete(series_uid, "forced")

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
            " WHERE state='received' AND (last_at <= ? OR COALESCE(opened_at, first_at) <= ?) ORDER BY series_uid",
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
        return self._write(lambda c: int(c.execute(
            f"UPDATE series SET sender_state=? WHERE state='received' AND series_uid IN ({_marks(len(series_uids))})",
            (sender_state, *series_uids),
        ).rowcount))

    def hold_interrupted_on_startup(self) -> list[str]:
        """After a crash/restart: a received series whose association was still open *on this node*
        counts as aborted.

        The node stopping (kill -9, power loss) dropped that connection; the sender did not
        say it was done.  Call once at start-up before the listener opens.  Series another
        node is receiving are left alone.
        """
        def work(c: Tx) -> list[str]:
            where = "state='received' AND sender_state='open' AND (sender_node IS NULL OR sender_node=?)"
            uids = [str(r["series_uid"]) for r in c.execute(
                f"SELECT series_uid FROM series WHERE {where} ORDER BY series_uid", (self.node_id,)).fetchall()]
            c.execute(f"UPDATE series SET sender_state='aborted' WHERE {where}", (self.node_id,))
            return uids

        return self._write(work)

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
        holder: str | None = None,
    ) -> bool:
        """Move a series to ``state`` (along :data:`~medclf_node.store.states.TRANSITIONS`) and record why.

        With ``generation`` given, the update only happens if the series still has that
        generation (a late instance may have re-opened it meanwhile); with ``holder``, only
        if that worker still holds its lease (it may have expired and moved): returns False
        then.  ``rule`` and ``timings`` (seconds per stage) are stored for ``jobs`` when
        given.  A transition the table forbids raises ``IllegalTransition``.
        """
        if state not in states.SERIES_STATES:
            raise ValueError(f"unknown series state {state!r}")
        now = time.time()
        sets = ["reason_code=?", "reason_text=?", "updated_at=?"]
        params: list[Any] = [reason_code, reason_text, now]
        if rule is not None:
            sets.append("rule=?")
            params.append(rule)
        if timings is not None:
            sets.append("timings_json=?")
            params.append(json.dumps(timings))
        if state == "complete":
            sets.append("completed_at=COALESCE(completed_at, ?)")
            params.append(now)
        if state != "processing":
            sets.append("lease_expires_at=NULL")
        return self._write(lambda c: self._transition(c, series_uid, state, sets, params, generation=generation,
                                                      holder=holder))

    # --- work queue -----------------------------------------------------------------------
    def claim_next_complete(self, worker: str, *, lease_seconds: float | None = None) -> SeriesRow | None:
        """Atomically take the oldest ``complete`` series and move it to ``processing`` under a lease.

        Returns the claimed row (state already ``processing``, ``worker`` = this node's lease
        holder; remember its ``generation``) or None when nothing is waiting.  Two workers,
        on this node or another, never get the same series while the lease runs; renew it
        with :meth:`renew_lease` while processing.
        """
        lease = self.lease_seconds if lease_seconds is None else lease_seconds
        who = self.holder(worker)

        def work(c: Tx) -> SeriesRow | None:
            r = c.execute("SELECT series_uid FROM series WHERE state='complete'"
                          f" ORDER BY completed_at, series_uid LIMIT 1{self._CLAIM}").fetchone()
            if r is None:
                return None
            now = time.time()
            uid = str(r["series_uid"])
            self._transition(c, uid, "processing", ["worker=?", "lease_expires_at=?", "updated_at=?"],
                             (who, now + lease, now), expect=("complete",))
            return _series_row(c.execute("SELECT * FROM series WHERE series_uid=?", (uid,)).fetchone())

        return self._write(work)

    def renew_lease(self, series_uid: str, holder: str, generation: int, lease_seconds: float | None = None) -> bool:
        """Extend a running claim; False when it is no longer this holder's (expired and taken, re-opened)."""
        lease = self.lease_seconds if lease_seconds is None else lease_seconds
        return self._write(lambda c: c.execute(
            "UPDATE series SET lease_expires_at=? WHERE series_uid=? AND state='processing' AND worker=?"
            " AND generation=?", (time.time() + lease, series_uid, holder, generation)).rowcount == 1)

    def reclaim_expired(self, now: float | None = None) -> list[str]:
        """Processing series whose lease ran out (their node died or hangs) go back to ``complete``.

        Any node may call this; the next claim (on any node) processes them again.
        """
        t = time.time() if now is None else now

        def work(c: Tx) -> list[str]:
            rows = c.execute("SELECT series_uid FROM series WHERE state='processing' AND lease_expires_at IS NOT NULL"
                             f" AND lease_expires_at < ? ORDER BY series_uid{self._CLAIM}", (t,)).fetchall()
            out = []
            for r in rows:
                uid = str(r["series_uid"])
                if self._transition(c, uid, "complete",
                                    ["worker=NULL", "lease_expires_at=NULL", "updated_at=?",
                                     "reason_text='lease expired; taken over'"], (t,), expect=("processing",)):
                    out.append(uid)
            return out

        uids = self._write(work)
        if uids:
            log.warning("%d series had an expired lease (their worker stopped); they run again", len(uids))
        return uids

    def reset_processing_on_startup(self) -> int:
        """After a crash/restart: this node's ``processing`` series go back to ``complete``.

        Call once at start-up before workers run.  Claims of other nodes are left to their
        leases.  Returns how many series were reset.
        """
        now = time.time()

        def work(c: Tx) -> int:
            rows = c.execute(
                "SELECT series_uid FROM series WHERE state='processing' AND (worker IS NULL OR worker NOT LIKE ?"
                " OR worker LIKE ?) ORDER BY series_uid", ("%/%", f"{self.node_id}/%")).fetchall()
            n = 0
            for r in rows:
                n += self._transition(c, str(r["series_uid"]), "complete",
                                      ["worker=NULL", "lease_expires_at=NULL", "updated_at=?",
                                       "reason_text='resumed after restart'"], (now,), expect=("processing",))
            return n

        n = self._write(work)
        if n:
            log.info("resuming %d series that were being processed when the node stopped", n)
        return n

    # --- results --------------------------------------------------------------------------
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
        self._write(lambda c: c.execute(
            "INSERT INTO results (series_uid, model_name, model_version, generation, probability, positive,"
            " key_slice_index, timings_json, details_json, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(series_uid, model_name) DO UPDATE SET model_version=excluded.model_version,"
            " generation=excluded.generation, probability=excluded.probability, positive=excluded.positive,"
            " key_slice_index=excluded.key_slice_index, timings_json=excluded.timings_json,"
            " details_json=excluded.details_json, created_at=excluded.created_at",
            (series_uid, model_name, model_version, generation, float(probability), int(bool(positive)),
             key_slice_index, json.dumps(timings or {}), json.dumps(details or {}), time.time()),
        ))

    def results(self, series_uid: str) -> list[ResultRow]:
        rows = self._query("SELECT * FROM results WHERE series_uid=? ORDER BY model_name", (series_uid,))
        return [
            ResultRow(
                series_uid=r["series_uid"], model_name=r["model_name"], model_version=r["model_version"],
                generation=int(r["generation"]), probability=r["probability"], positive=bool(r["positive"]),
                key_slice_index=r["key_slice_index"], timings=json.loads(r["timings_json"]),
                details=json.loads(r["details_json"]), created_at=r["created_at"],
            )
            for r in rows
        ]

    # --- result versions ------------------------------------------------------------------
    def report_version(
        self, series_uid: str, model_name: str, kind: Kind, sop_instance_uid: str
    ) -> tuple[int, ReportRecord | None]:
        """``(version, predecessor)`` for the result object ``sop_instance_uid`` about to be built.

        If that object was recorded before (a re-run of the same generation after a crash or
        restart), its stored version and predecessor come back, so it is rebuilt identically.
        Otherwise the predecessor is the newest object recorded for this series, model and kind
        (any earlier generation or model version) and the version is one more than its.
        """
        mine = self._query("SELECT * FROM reports WHERE sop_instance_uid=?", (sop_instance_uid,))
        if mine:
            pre_uid = mine[0]["predecessor_uid"]
            pre = [] if pre_uid is None else self._query("SELECT * FROM reports WHERE sop_instance_uid=?",
                                                          (pre_uid,))
            return int(mine[0]["version"]), _report_record(pre[0]) if pre else None
        last = self._query(
            "SELECT * FROM reports WHERE series_uid=? AND model_name=? AND kind=?"
            " ORDER BY version DESC, created_at DESC LIMIT 1", (series_uid, model_name, kind),
        )
        if not last:
            return 1, None
        prev = _report_record(last[0])
        return prev.version + 1, prev

    def record_report(self, rec: ReportRecord, *, generation: int | None = None) -> bool:
        """Remember a result object (idempotent per SOP Instance UID) before it is queued.

        With ``generation`` given, refuses (returns False) when the series has moved on to a
        newer generation meanwhile: an object computed from an outdated instance set is not sent.
        Also refuses when this series generation already has another object of this model and
        kind (a unique constraint: at most one result version per series generation, even
        when two nodes raced on it).
        """
        def work(c: Tx) -> bool:
            if generation is not None:
                cur = c.execute("SELECT generation FROM series WHERE series_uid=?", (rec.series_uid,)).fetchone()
                if cur is not None and int(cur["generation"]) != generation:
                    return False
            c.execute(
                "INSERT INTO reports (sop_instance_uid, series_uid, model_name, kind, generation, version,"
                " study_uid, result_series_uid, sop_class_uid, predecessor_uid, created_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (rec.sop_instance_uid, rec.series_uid, rec.model_name, rec.kind, rec.generation, rec.version,
                 rec.study_uid, rec.result_series_uid, rec.sop_class_uid, rec.predecessor_uid, time.time()),
            )
            held = c.execute("SELECT sop_instance_uid FROM reports WHERE series_uid=? AND model_name=? AND kind=?"
                             " AND generation=?", (rec.series_uid, rec.model_name, rec.kind, rec.generation)
                             ).fetchall()
            return any(r["sop_instance_uid"] == rec.sop_instance_uid for r in held)

        return self._write(work)

    def reports(self, series_uid: str) -> list[ReportRecord]:
        """Every result object recorded for a series, oldest version first."""
        rows = self._query("SELECT * FROM reports WHERE series_uid=? ORDER BY model_name, kind, version",
                           (series_uid,))
        return [_report_record(r) for r in rows]

    # --- outbox ---------------------------------------------------------------------------
    def enqueue_outbox(
        self,
        object_uid: str,
        series_uid: str,
        destination: str,
        kind: Kind,
        path: str,
        *,
        replace_sent: bool = False,
    ) -> bool:
        """Persist one object for delivery to ``destination`` (peer name or "sender").

        ``path`` is relative to the files directory and the file must already be durably
        written.  Idempotent per (object_uid, destination): enqueuing again after a crash (or
        by a second node that re-ran the generation) does not create a second item.  An item
        already ``sent`` stays sent unless ``replace_sent``.  Returns True if the item is
        (now) queued, False if it was left as sent.
        """
        now = time.time()

        def work(c: Tx) -> bool:
            r = c.execute(f"SELECT state FROM outbox WHERE object_uid=? AND destination=?{self._LOCK}",
                          (object_uid, destination)).fetchone()
            if r is None:
                c.execute(
                    "INSERT INTO outbox (object_uid, series_uid, destination, kind, path, state, attempts,"
                    " next_attempt_at, created_at) VALUES (?,?,?,?,?,'queued',0,?,?)"
                    " ON CONFLICT(object_uid, destination) DO NOTHING",
                    (object_uid, series_uid, destination, kind, path, now, now),
                )
                return True
            if r["state"] == "sent" and not replace_sent:
                return False
            c.execute(
                "UPDATE outbox SET path=?, kind=?, series_uid=?, state='queued', attempts=0, next_attempt_at=?,"
                " last_error=NULL, sent_at=NULL, claimed_by=NULL, claim_expires_at=NULL"
                " WHERE object_uid=? AND destination=?",
                (path, kind, series_uid, now, object_uid, destination),
            )
            return True

        return self._write(work)

    def due_outbox(self, now: float, limit: int = 100) -> list[OutboxItem]:
        """Queued items whose ``next_attempt_at`` has come, oldest first (claimed or not)."""
        rows = self._query(
            "SELECT * FROM outbox WHERE state='queued' AND next_attempt_at<=? ORDER BY next_attempt_at, id LIMIT ?",
            (now, limit),
        )
        return [_outbox_item(r) for r in rows]

    def claim_outbox(self, now: float, limit: int = 100, *, lease_seconds: float = 120.0) -> list[OutboxItem]:
        """Due items nobody holds (or whose claim ran out), now claimed by this node until
        ``now + lease_seconds``: nodes sharing the store do not send the same item at once.

        ``mark_sent`` / ``mark_failed_attempt`` / ``mark_dead`` end the claim.
        """
        def work(c: Tx) -> list[OutboxItem]:
            rows = c.execute(
                "SELECT * FROM outbox WHERE state='queued' AND next_attempt_at<=? AND (claimed_by IS NULL"
                " OR claimed_by=? OR claim_expires_at<=?) ORDER BY next_attempt_at, id LIMIT ?" + self._CLAIM,
                (now, self.node_id, now, limit)).fetchall()
            items = [_outbox_item(r) for r in rows]
            for i in range(0, len(items), 200):
                chunk = items[i:i + 200]
                c.execute(f"UPDATE outbox SET claimed_by=?, claim_expires_at=? WHERE id IN ({_marks(len(chunk))})",
                          (self.node_id, now + lease_seconds, *(it.id for it in chunk)))
            return items

        return self._write(work)

    def next_outbox_due_at(self) -> float | None:
        """Earliest ``next_attempt_at`` of any queued item (None: nothing queued)."""
        rows = self._query("SELECT MIN(next_attempt_at) AS t FROM outbox WHERE state='queued'")
        v = rows[0]["t"] if rows else None
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

    def outbox_depth(self) -> int:
        """Result objects still waiting to be sent (metrics)."""
        return int(self._query("SELECT COUNT(*) AS n FROM outbox WHERE state='queued'")[0]["n"])

    def _series_to(self, c: Tx, series_uid: str, dst: str, among: Sequence[str], sets: Sequence[str],
                   params: Sequence[Any], extra: str = "") -> None:
        """A series move the outbox causes, from any of ``among`` (each checked against the table)."""
        src = states.sources(dst, among)
        c.execute(f"UPDATE series SET state=?, {', '.join(sets)} WHERE series_uid=? AND state IN ({_marks(len(src))})"
                  + extra, (dst, *params, series_uid, *src))

    def mark_sent(self, item_id: int) -> None:
        """Item delivered.  When no item of its series is left queued or dead, the series
        moves ``reported -> sent`` (and ``failed`` caused by a dead item back to ``sent``)."""
        now = time.time()

        def work(c: Tx) -> None:
            c.execute("UPDATE outbox SET state='sent', sent_at=?, attempts=attempts+1, last_error=NULL,"
                      " claimed_by=NULL, claim_expires_at=NULL WHERE id=?", (now, item_id))
            r = c.execute("SELECT series_uid FROM outbox WHERE id=?", (item_id,)).fetchone()
            if r is None:
                return
            uid = str(r["series_uid"])
            c.execute(f"SELECT state FROM series WHERE series_uid=?{self._LOCK}", (uid,)).fetchone()
            left = c.execute("SELECT COUNT(*) AS n FROM outbox WHERE series_uid=? AND state!='sent'",
                             (uid,)).fetchone()["n"]
            if int(left) == 0:
                self._series_to(c, uid, "sent", ("reported",), ["reason_code=NULL", "reason_text=NULL",
                                                                "updated_at=?"], (now,))
                self._series_to(c, uid, "sent", ("failed",), ["reason_code=NULL", "reason_text=NULL",
                                                              "updated_at=?"], (now,),
                                extra=" AND reason_code='dispatch_dead'")

        self._write(work)

    def _dead_series(self, c: Tx, series_uid: str, error: str) -> None:
        self._series_to(c, series_uid, "failed", ("reported", "sent"),
                        ["reason_code='dispatch_dead'", "reason_text=?", "updated_at=?"],
                        (f"delivery failed: {error[:200]}", time.time()))

    def mark_failed_attempt(self, item_id: int, error: str, next_attempt_at: float, max_attempts: int) -> str:
        """Record a failed send; dead-letter the item once ``max_attempts`` is reached.

        Returns the item's new state ("queued" or "dead").  A dead item marks its series
        ``failed`` with reason_code ``dispatch_dead``.
        """
        def work(c: Tx) -> str:
            r = c.execute(f"SELECT attempts, series_uid FROM outbox WHERE id=?{self._LOCK}", (item_id,)).fetchone()
            if r is None:
                raise KeyError(item_id)
            attempts = int(r["attempts"]) + 1
            state = "dead" if attempts >= max_attempts else "queued"
            c.execute("UPDATE outbox SET attempts=?, state=?, next_attempt_at=?, last_error=?, claimed_by=NULL,"
                      " claim_expires_at=NULL WHERE id=?", (attempts, state, next_attempt_at, error[:1000], item_id))
            if state == "dead":
                self._dead_series(c, str(r["series_uid"]), error)
            return state

        return self._write(work)

    def mark_dead(self, item_id: int, error: str) -> None:
        """Dead-letter an item at once (e.g. its destination cannot be resolved)."""
        def work(c: Tx) -> None:
            c.execute("UPDATE outbox SET state='dead', last_error=?, claimed_by=NULL, claim_expires_at=NULL"
                      " WHERE id=?", (error[:1000], item_id))
            r = c.execute("SELECT series_uid FROM outbox WHERE id=?", (item_id,)).fetchone()
            if r is not None:
                self._dead_series(c, str(r["series_uid"]), error)

        self._write(work)

    def requeue_dead(self, series_uids: Sequence[str] | None = None) -> int:
        """Dead items (all, or those of the given series) go back to ``queued`` with
        attempts reset; their series return from ``failed``/dispatch_dead to ``reported``.
        Returns the number of items re-queued."""
        now = time.time()

        def work(c: Tx) -> int:
            if series_uids is None:
                uids = [str(r["series_uid"]) for r in c.execute(
                    "SELECT DISTINCT series_uid FROM outbox WHERE state='dead' ORDER BY series_uid").fetchall()]
            else:
                uids = list(series_uids)
            n = 0
            for uid in uids:
                n += c.execute("UPDATE outbox SET state='queued', attempts=0, next_attempt_at=?, last_error=NULL"
                               " WHERE state='dead' AND series_uid=?", (now, uid)).rowcount
                self._series_to(c, uid, "reported", ("failed",),
                                ["reason_code=NULL", "reason_text='re-queued'", "updated_at=?"], (now,),
                                extra=" AND reason_code='dispatch_dead'")
            return int(n)

        return self._write(work)

    # --- retention / health ---------------------------------------------------------------
    def ping(self) -> bool:
        """The store answers a query (readiness)."""
        return bool(self._query("SELECT 1 AS one"))

    def retention_candidates(self) -> list[tuple[str, str, str, float]]:
        """``(series_uid, state, path, finished_at)`` for every instance of a finished series."""
        fin = tuple(sorted(FINISHED_STATES))
        rows = self._query(
            "SELECT s.series_uid, s.state, i.path, s.updated_at FROM instances i JOIN series s"
            f" ON s.series_uid = i.series_uid WHERE s.state IN ({_marks(len(fin))}) ORDER BY i.path", fin,
        )
        return [(str(r["series_uid"]), str(r["state"]), str(r["path"]), float(r["updated_at"])) for r in rows]

    def forget_instances(self, paths: Sequence[str]) -> int:
        """Drop the index rows of deleted spool files (paths relative to the files directory).

        The series rows stay (``jobs`` keeps the history; ``n_instances`` keeps what was received).
        """
        return self._write(lambda c: sum(c.execute("DELETE FROM instances WHERE path=?", (p,)).rowcount
                                         for p in paths))
