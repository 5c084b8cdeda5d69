"""SQLite back-end: one database (WAL) at ``data_dir/index.sqlite``; the embedded default.

One connection guarded by a lock serves all threads of the process (writes are serialised
by SQLite anyway, and this avoids SQLITE_BUSY between our own threads); other processes
(``medclf-node jobs``) open their own connection and are protected by WAL plus
``busy_timeout``.  ``synchronous=FULL`` (``durable=True``, the default): a committed row
survives power loss, which is what a C-STORE Success status promises; ``NORMAL`` survives a
crash of the process only.  A file is one node's: several nodes share a PostgreSQL instead.

Schema versions live in table ``schema_version``; :data:`MIGRATIONS` upgrade any older
database in place, including an ``index.sqlite`` written before versions were recorded
(version 0: the tables exist, the version table does not).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from medclf_node.store.errors import StoreError, StoreMissing
from medclf_node.store.sql import DEFAULT_LEASE_SECONDS, SqlStore, Tx

log = logging.getLogger(__name__)

T = TypeVar("T")

INDEX_FILENAME = "index.sqlite"

_V1 = """
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


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {str(r[1]) for r in conn.execute(f"PRAGMA table_info({table})").fetchall()}


def _add_columns(conn: sqlite3.Connection, table: str, cols: Sequence[tuple[str, str]]) -> None:
    have = _columns(conn, table)
    for name, decl in cols:
        if name not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            log.info("store: added column %s.%s", table, name)


def _migrate_1(conn: sqlite3.Connection) -> None:
    """The tables of the first release; a pre-version database gets the columns added since."""
    existed = bool(_columns(conn, "series"))
    for stmt in _V1.split(";"):
        if stmt.strip():
            conn.execute(stmt)
    if existed:
        _add_columns(conn, "series", (("opened_at", "REAL"), ("sender_state", "TEXT")))


def _migrate_2(conn: sqlite3.Connection) -> None:
    """Leases, the receiving node, outbox claims; one result object per kind and series generation."""
    _add_columns(conn, "series", (("lease_expires_at", "REAL"), ("sender_node", "TEXT")))
    _add_columns(conn, "outbox", (("claimed_by", "TEXT"), ("claim_expires_at", "REAL")))
    dupes = conn.execute("SELECT COUNT(*) FROM (SELECT 1 FROM reports GROUP BY series_uid, model_name, kind,"
                         " generation HAVING COUNT(*) > 1)").fetchone()[0]
    if dupes:  # an older release re-ran a generation with a new model version; keep what was sent
        log.warning("store: %d series generations hold two result objects of one kind (older release); "
                    "the uniqueness rule applies from now on to the others", dupes)
        conn.execute("CREATE INDEX IF NOT EXISTS reports_generation ON reports(series_uid, model_name, kind,"
                     " generation)")
    else:
        conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS reports_generation ON reports(series_uid, model_name,"
                     " kind, generation)")


#: numbered migrations: MIGRATIONS[n - 1] takes a database from version n - 1 to n
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_migrate_1, _migrate_2)
SCHEMA_VERSION = len(MIGRATIONS)


class SqliteStore(SqlStore):
    """The store in ``data_dir/index.sqlite``.  Create one per process; call :meth:`close` at exit."""

    backend = "sqlite"

    def __init__(
        self,
        data_dir: Path,
        *,
        files_dir: Path | None = None,
        node_id: str = "local",
        late_instances: Literal["reprocess", "ignore"] = "reprocess",
        durable: bool = True,
        read_only: bool = False,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        self.data_dir = Path(data_dir)
        super().__init__(self.data_dir if files_dir is None else files_dir, node_id=node_id,
                         late_instances=late_instances, lease_seconds=lease_seconds)
        self.path = self.data_dir / INDEX_FILENAME
        self.read_only = read_only
        self._lock = threading.RLock()
        if read_only:
            if not self.path.is_file():
                raise StoreMissing(f"no store at {self.path} (the node has not run with this node.data_dir)")
            self._conn = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, timeout=10.0,
                                         isolation_level=None, check_same_thread=False)
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA busy_timeout=10000")
        if not read_only:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._conn.execute("PRAGMA foreign_keys=ON")
            with self._lock:
                self._migrate()
        elif (v := self.schema_version()) < SCHEMA_VERSION:
            self._conn.close()
            raise StoreError(f"store {self.path} is at schema version {v}, this release needs {SCHEMA_VERSION}: "
                             "start the node once (it upgrades the store in place)")

    # --- migrations -----------------------------------------------------------------------
    def schema_version(self) -> int:
        with self._lock:
            has = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone()
            if has is None:
                return 0
            v = self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
            return int(v or 0)

    def _migrate(self) -> None:
        """Apply every migration above the database's version, each in its own transaction."""
        with self._tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at REAL"
                      " NOT NULL)")
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise StoreError(f"store {self.path} is at schema version {current}, newer than this release "
                             f"({SCHEMA_VERSION}); run the newer release")
        for n in range(current + 1, SCHEMA_VERSION + 1):
            with self._tx() as c:
                MIGRATIONS[n - 1](c)
                c.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (n, time.time()))
            log.info("store %s: schema version %d", self.path, n)

    # --- plumbing -------------------------------------------------------------------------
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

    def _write(self, work: Callable[[Tx], T]) -> T:
        if self.read_only:
            raise StoreError(f"store {self.path} is open read-only")
        with self._tx() as c:
            return work(c)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

    def close(self) -> None:
        with self._lock:
            self._conn.close()
