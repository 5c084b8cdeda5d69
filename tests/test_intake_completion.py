"""Series completion: release, quiet time, max wait, aborts, series spread over associations."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from conftest import NODE_AE, SENDER_AE, RunningNode
from intake_series import write_ct_series

from medclf_node.config import CompletionSection
from medclf_node.ingest.index import Index, InstanceRecord
from medclf_node.ingest.series import CompletionTracker


def _rec(sop: str, series: str, assoc: str, at: float) -> InstanceRecord:
    return InstanceRecord(sop, series, "1.2", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                          f"spool/{sop}.dcm", 1, "SCANNER", assoc, at)


def _deliver(index: Index, tracker: CompletionTracker, sop: str, series: str, assoc: str, at: float) -> None:
    index.record_instance(_rec(sop, series, assoc, at))
    tracker.instance_received(assoc, series)


def _state(index: Index, uid: str) -> tuple[str, str | None]:
    s = index.get_series(uid)
    assert s is not None
    return s.state, s.completion


def test_release_completes_unless_another_association_still_sends(tmp_path: Path) -> None:
    index = Index(tmp_path)
    done: list[str] = []
    tracker = CompletionTracker(index, CompletionSection(), on_complete=done.append)
    now = time.time()
    _deliver(index, tracker, "1.1", "5.1", "a", now)
    _deliver(index, tracker, "1.2", "5.1", "b", now)  # same series on a second association
    _deliver(index, tracker, "2.1", "5.2", "a", now)
    tracker.association_released("a")
    assert _state(index, "5.2") == ("complete", "release")
    assert _state(index, "5.1") == ("received", None)  # "b" is still open
    tracker.association_released("b")
    assert _state(index, "5.1") == ("complete", "release")
    assert done == ["5.2", "5.1"]
    index.close()


def test_abort_does_not_complete_but_quiet_does(tmp_path: Path) -> None:
    index = Index(tmp_path)
    tracker = CompletionTracker(index, CompletionSection(quiet_seconds=5, max_wait_seconds=100))
    t0 = time.time()
    _deliver(index, tracker, "1.1", "5.1", "a", t0)
    tracker.association_aborted("a")
    assert _state(index, "5.1") == ("received", None)
    assert tracker.scan_once(now=t0 + 4) == 0
    assert tracker.scan_once(now=t0 + 6) == 1
    assert _state(index, "5.1") == ("complete", "quiet")
    index.close()


def test_on_release_off_and_max_wait(tmp_path: Path) -> None:
    index = Index(tmp_path)
    tracker = CompletionTracker(index, CompletionSection(on_release=False, quiet_seconds=50, max_wait_seconds=10))
    t0 = time.time()
    for k in range(5):  # a sender trickling one instance every 3 s never goes quiet...
        _deliver(index, tracker, f"1.{k}", "5.1", "a", t0 + 3 * k)
    tracker.association_released("a")
    assert _state(index, "5.1") == ("received", None)
    assert tracker.scan_once(now=t0 + 12) == 1  # ...but max_wait ends it
    assert _state(index, "5.1") == ("complete", "max_wait")
    index.close()


def test_quiet_completion_through_the_network(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An aborted association leaves the series to the quiet timer of the running node."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    files = write_ct_series(tmp_path / "s", 3, 16, 16, seed=9)
    node: RunningNode = node_factory(completion={"quiet_seconds": 1.0})
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    for f in files:
        assert assoc.send_c_store(f).Status == 0
    assoc.abort()
    db = node.data_dir / "index.sqlite"
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT state FROM series").fetchall() == [("received",)]
    deadline = time.monotonic() + 10
    state: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        with sqlite3.connect(db) as c:
            state = c.execute("SELECT state, completion FROM series").fetchall()
        if state == [("complete", "quiet")]:
            break
        time.sleep(0.2)
    assert state == [("complete", "quiet")]
