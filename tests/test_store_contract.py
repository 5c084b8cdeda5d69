"""The store contract on both back-ends: transitions (legal and illegal), claims and leases,
outbox claims, one result object per series generation; and an index.sqlite of the previous
release (ingest/index.py) upgrading in place."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import postgres_or_skip

from medclf_node.store import TRANSITIONS, IllegalTransition, InstanceRecord, ReportRecord, SqliteStore, Store

OLD_SCHEMA = """
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


def rec(sop: str, series: str = "1.2.3", at: float | None = None) -> InstanceRecord:
    return InstanceRecord(sop, series, "1.2", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                          f"spool/1.2/{series}/{sop}.dcm", 10, "SCANNER", "a1", time.time() if at is None else at)


@pytest.fixture(params=["sqlite", "postgresql"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    opened: list[Store] = []
    dsn = postgres_or_skip().create_database() if request.param == "postgresql" else ""

    def factory(node_id: str = "n1") -> Store:
        if request.param == "sqlite":
            s: Store = SqliteStore(tmp_path, node_id=node_id)
        else:
            from medclf_node.store.postgres import PostgresStore

            s = PostgresStore(dsn, files_dir=tmp_path, node_id=node_id)
        opened.append(s)
        return s

    yield factory
    for s in opened:
        s.close()


def _at(store: Store, uid: str, state: str) -> None:
    """Drive a fresh series to state through the real operations."""
    store.record_instance(rec(f"{uid}.1", uid))
    if state == "received":
        return
    assert store.mark_complete(uid, "forced")
    if state == "complete":
        return
    assert store.set_series_state(uid, "processing")
    if state != "processing":
        assert store.set_series_state(uid, state)  # type: ignore[arg-type]


@pytest.mark.parametrize("src", ["received", "complete", "processing", "reported", "skipped", "failed"])
def test_every_transition_is_checked_in_one_table(make: object, src: str) -> None:
    store = make()  # type: ignore[operator]
    for n, dst in enumerate(("received", "complete", "processing", "reported", "sent", "skipped", "failed")):
        uid = f"5.{n + 1}"
        _at(store, uid, src)
        if dst == src:
            continue
        if dst in TRANSITIONS[src]:
            assert store.set_series_state(uid, dst)  # type: ignore[arg-type]
            got = store.get_series(uid)
            assert got is not None and got.state == dst
        else:
            with pytest.raises(IllegalTransition):
                store.set_series_state(uid, dst)  # type: ignore[arg-type]


def test_claims_leases_and_takeover_across_nodes(make: object) -> None:
    a, b = make("node-a"), make("node-b")  # type: ignore[operator]
    for i in range(3):
        a.record_instance(rec(f"1.{i}", f"2.{i}"))
        a.mark_complete(f"2.{i}", "forced")
    ra = a.claim_next_complete("w", lease_seconds=0.2)
    rb = b.claim_next_complete("w")
    assert ra is not None and rb is not None and ra.series_uid != rb.series_uid
    assert ra.worker == "node-a/w" and rb.worker == "node-b/w"
    assert b.renew_lease(rb.series_uid, rb.worker, rb.generation)
    assert not b.renew_lease(ra.series_uid, "node-b/w", ra.generation), "not b's lease"
    b.reset_processing_on_startup()  # b restarting leaves a's claim alone
    got = b.get_series(ra.series_uid)
    assert got is not None and got.state == "processing"
    time.sleep(0.3)
    assert b.reclaim_expired() == [ra.series_uid]  # a died: its lease ran out, b's stays
    taken = b.claim_next_complete("w2")
    assert taken is not None and {taken.series_uid} <= {ra.series_uid, "2.0", "2.1", "2.2"}
    assert not a.set_series_state(ra.series_uid, "reported", holder=ra.worker) or taken.series_uid != ra.series_uid


def test_outbox_claims_and_one_object_per_generation(make: object) -> None:
    a, b = make("node-a"), make("node-b")  # type: ignore[operator]
    _at(a, "7.7", "reported")
    a.enqueue_outbox("8.1", "7.7", "pacs", "SR", "outbox/7.7/8.1.dcm")
    a.enqueue_outbox("8.2", "7.7", "pacs", "SC", "outbox/7.7/8.2.dcm")
    now = time.time() + 1
    got_a = a.claim_outbox(now, lease_seconds=60)
    assert {i.object_uid for i in got_a} == {"8.1", "8.2"} and b.claim_outbox(now) == []
    for i in got_a:
        a.mark_sent(i.id)
    row = a.get_series("7.7")
    assert row is not None and row.state == "sent"
    first = ReportRecord("8.1", "7.7", "m", "SR", 0, 1, "1.2", "1.3", "1.2.840.10008.5.1.4.1.1.88.34", None)
    other = ReportRecord("8.9", "7.7", "m", "SR", 0, 1, "1.2", "1.4", "1.2.840.10008.5.1.4.1.1.88.34", None)
    assert a.record_report(first) and a.record_report(first)
    assert not b.record_report(other), "a second SR for the same series generation is refused"
    assert [r.sop_instance_uid for r in a.reports("7.7")] == ["8.1"]


def test_index_sqlite_of_the_previous_release_upgrades_in_place(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "index.sqlite") as c:
        c.executescript(OLD_SCHEMA)
        c.execute("INSERT INTO series (series_uid, study_uid, calling_ae, state, first_at, last_at, n_instances,"
                  " updated_at, opened_at, sender_state) VALUES ('5.1','1.2','S','complete',1,1,1,1,1,'released')")
        c.execute("INSERT INTO outbox (object_uid, series_uid, destination, kind, path, state, next_attempt_at,"
                  " created_at) VALUES ('8.1','5.1','pacs','SR','outbox/x.dcm','queued',0,0)")
    store = SqliteStore(tmp_path)
    try:
        assert store.schema_version() == 2
        row = store.claim_next_complete("w")
        assert row is not None and row.series_uid == "5.1" and row.lease_expires_at is not None
        assert [i.object_uid for i in store.claim_outbox(time.time())] == ["8.1"]
    finally:
        store.close()
    again = SqliteStore(tmp_path, read_only=True)
    assert again.schema_version() == 2 and again.get_series("5.1") is not None
    again.close()
