"""The node's durable state behind one small interface (:class:`Store`), on SQLite or PostgreSQL.

Callers import from here only; no SQL lives outside this package.  ``open_store(cfg)`` picks
the back-end from ``[store]``: SQLite (``node.data_dir/index.sqlite``, the embedded default,
one node) or PostgreSQL (several nodes sharing one database and ``store.shared_dir``).
"""

from __future__ import annotations

from medclf_node.config import Config
from medclf_node.store.errors import StoreError, StoreMissing
from medclf_node.store.interface import Kind, Store
from medclf_node.store.records import (
    InstanceRecord,
    OutboxItem,
    RecordOutcome,
    ReportRecord,
    ResultRow,
    SeriesRow,
)
from medclf_node.store.sqlite import INDEX_FILENAME, SqliteStore
from medclf_node.store.states import (
    FINISHED_STATES,
    SERIES_STATES,
    TRANSITIONS,
    IllegalTransition,
    OutboxState,
    SeriesState,
)

__all__ = [
    "FINISHED_STATES", "INDEX_FILENAME", "SERIES_STATES", "TRANSITIONS", "IllegalTransition", "InstanceRecord",
    "Kind", "OutboxItem", "OutboxState", "RecordOutcome", "ReportRecord", "ResultRow", "SeriesRow",
    "SeriesState", "SqliteStore", "Store", "StoreError", "StoreMissing", "open_store",
]


def open_store(cfg: Config, *, read_only: bool = False) -> Store:
    """The store ``cfg`` names.  ``read_only``: never creates or migrates anything (CLI queries);
    raises :class:`StoreMissing` when there is no store yet, :class:`StoreError` when it cannot open."""
    st = cfg.store
    files = cfg.files_dir()
    if st.backend == "postgresql":
        from medclf_node.store.postgres import PostgresStore

        return PostgresStore(st.dsn, files_dir=files, node_id=cfg.node_id(),
                             late_instances=cfg.completion.late_instances, read_only=read_only,
                             lease_seconds=st.lease_seconds, max_connections=max(4, cfg.pipeline.workers + 4))
    return SqliteStore(cfg.node.data_dir, files_dir=files, node_id=cfg.node_id(),
                       late_instances=cfg.completion.late_instances, durable=cfg.node.durable_writes,
                       read_only=read_only, lease_seconds=st.lease_seconds)
