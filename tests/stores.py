"""How tests open a store: SQLite in the data directory, or (``MEDCLF_TEST_STORE=postgresql``)
a PostgreSQL database kept per data directory, so the same tests cover both back-ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pg

from medclf_node.store import SqliteStore, Store


def open_test_store(data_dir: Path, *, late_instances: Literal["reprocess", "ignore"] = "reprocess",
                    durable: bool = True, node_id: str = "local", **kw: Any) -> Store:
    """The store a node with ``node.data_dir = data_dir`` would open in this test run."""
    if pg.on_postgres():
        from medclf_node.store.postgres import PostgresStore

        return PostgresStore(pg.server().dsn_for(str(Path(data_dir).resolve())), files_dir=Path(data_dir),
                             node_id=node_id, late_instances=late_instances, **kw)
    return SqliteStore(data_dir, late_instances=late_instances, durable=durable, node_id=node_id, **kw)


def store_section(data_dir: Path) -> dict[str, Any]:
    """The ``[store]`` a test config gets: empty on SQLite, the data directory's database on PostgreSQL."""
    if not pg.on_postgres():
        return {}
    return {"backend": "postgresql", "dsn": pg.server().dsn_for(str(Path(data_dir).resolve()))}


def walk(store: Store, series_uid: str, to: str, reason_code: str | None = None,
         reason_text: str | None = None, **kw: Any) -> bool:
    """Move a series to ``to`` along the shortest path of allowed transitions (test set-up:
    "this series was processed and sent"), the last step with the given reason."""
    from collections import deque

    from medclf_node.store import TRANSITIONS

    row = store.get_series(series_uid)
    assert row is not None, series_uid
    paths: dict[str, list[str]] = {row.state: []}
    todo = deque([row.state])
    while todo and to not in paths:
        s = todo.popleft()
        for nxt in sorted(TRANSITIONS[s]):
            if nxt not in paths:
                paths[nxt] = [*paths[s], nxt]
                todo.append(nxt)
    steps = paths[to] if row.state != to else [to]
    ok = True
    for i, s in enumerate(steps):
        last = i == len(steps) - 1
        ok = store.set_series_state(series_uid, s, reason_code if last else None,  # type: ignore[arg-type]
                                    reason_text if last else None, **(kw if last else {}))
    return ok


def query(data_dir: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a read-only SQL query on the store of ``data_dir`` (test inspection of a running or
    stopped node, on whichever back-end this run uses)."""
    if pg.on_postgres():
        import psycopg

        with psycopg.connect(pg.server().dsn_for(str(Path(data_dir).resolve()))) as c:
            return [tuple(r) for r in c.execute(sql.replace("?", "%s"), params).fetchall()]  # type: ignore[arg-type]
    import sqlite3

    con = sqlite3.connect(Path(data_dir) / "index.sqlite", timeout=30)
    try:
        return [tuple(r) for r in con.execute(sql, params).fetchall()]
    finally:
        con.close()
