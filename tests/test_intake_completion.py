"""Series completion: release, quiet time, max wait, aborts, series spread over associations."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import NODE_AE, SENDER_AE, RunningNode
from intake_series import write_ct_series
from stores import open_test_store, walk

from medclf_node.config import CompletionSection
from medclf_node.ingest.series import CompletionTracker
from medclf_node.store import InstanceRecord, Store


def _rec(sop: str, series: str, assoc: str, at: float) -> InstanceRecord:
    return InstanceRecord(sop, series, "1.2", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                          f"spool/{sop}.dcm", 1, "SCANNER", assoc, at)


def _deliver(index: Store, tracker: CompletionTracker, sop: str, series: str, assoc: str, at: float) -> None:
    index.record_instance(_rec(sop, series, assoc, at))
    tracker.instance_received(assoc, series)


def _state(index: Store, uid: str) -> tuple[str, str | None]:
    s = index.get_series(uid)
    assert s is not None
    return s.state, s.completion


def test_release_completes_unless_another_association_still_sends(tmp_path: Path) -> None:
    index = open_test_store(tmp_path)
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


def test_abort_holds_quiet_until_a_later_clean_release(tmp_path: Path) -> None:
    """A partial send that ended in A-ABORT is not completed by the quiet timer; the re-send's release does."""
    index = open_test_store(tmp_path)
    tracker = CompletionTracker(index, CompletionSection(quiet_seconds=5, max_wait_seconds=100))
    t0 = time.time()
    _deliver(index, tracker, "1.1", "5.1", "a", t0)
    tracker.association_aborted("a")
    assert _state(index, "5.1") == ("received", None)
    assert tracker.scan_once(now=t0 + 6) == 0  # quiet, but the sender aborted
    assert tracker.scan_once(now=t0 + 60) == 0
    row = index.get_series("5.1")
    assert row is not None and row.sender_state == "aborted"
    # the sender re-sends everything on a new association (duplicates included) and releases it
    _deliver(index, tracker, "1.1", "5.1", "b", t0 + 61)
    _deliver(index, tracker, "1.2", "5.1", "b", t0 + 61)
    tracker.association_released("b")
    assert _state(index, "5.1") == ("complete", "release")
    index.close()


def test_abort_then_max_wait(tmp_path: Path) -> None:
    """Without a re-send, max_wait_seconds ends the wait (counted from the first instance)."""
    index = open_test_store(tmp_path)
    tracker = CompletionTracker(index, CompletionSection(quiet_seconds=5, max_wait_seconds=100))
    t0 = time.time()
    _deliver(index, tracker, "1.1", "5.1", "a", t0)
    tracker.association_aborted("a")
    assert tracker.scan_once(now=t0 + 99) == 0
    assert tracker.scan_once(now=t0 + 101) == 1
    assert _state(index, "5.1") == ("complete", "max_wait")
    index.close()


def test_aborted_again_keeps_the_hold_and_a_released_one_lifts_it_for_quiet(tmp_path: Path) -> None:
    """A second abort keeps holding; a clean release with on_release off leaves it to the quiet timer."""
    index = open_test_store(tmp_path)
    tracker = CompletionTracker(index, CompletionSection(on_release=False, quiet_seconds=5, max_wait_seconds=100))
    t0 = time.time()
    _deliver(index, tracker, "1.1", "5.1", "a", t0)
    tracker.association_aborted("a")
    _deliver(index, tracker, "1.2", "5.1", "b", t0 + 1)  # a new instance alone does not lift the hold
    tracker.association_aborted("b")
    assert tracker.scan_once(now=t0 + 10) == 0
    _deliver(index, tracker, "1.3", "5.1", "c", t0 + 11)
    tracker.association_released("c")
    assert _state(index, "5.1") == ("received", None)  # on_release is off...
    assert tracker.scan_once(now=t0 + 17) == 1  # ...and the quiet timer applies again
    assert _state(index, "5.1") == ("complete", "quiet")
    index.close()


def test_quiet_after_abort_option(tmp_path: Path) -> None:
    """completion.quiet_after_abort: for senders that always end with an abort."""
    index = open_test_store(tmp_path)
    tracker = CompletionTracker(index, CompletionSection(quiet_seconds=5, max_wait_seconds=100,
                                                         quiet_after_abort=True))
    t0 = time.time()
    _deliver(index, tracker, "1.1", "5.1", "a", t0)
    tracker.association_aborted("a")
    assert tracker.scan_once(now=t0 + 6) == 1
    assert _state(index, "5.1") == ("complete", "quiet")
    index.close()


def test_association_open_when_the_node_stopped_counts_as_aborted(tmp_path: Path) -> None:
    """After kill -9 nobody saw the association end: on restart the series waits like an aborted one."""
    index = open_test_store(tmp_path)
    tracker = CompletionTracker(index, CompletionSection(quiet_seconds=5, max_wait_seconds=100))
    t0 = time.time()
    _deliver(index, tracker, "1.1", "5.1", "a", t0)  # node dies here; "a" never ends
    _deliver(index, tracker, "2.1", "5.2", "x", t0)
    tracker.association_released("x")  # 5.2 was finished cleanly before the crash
    index.close()
    index = open_test_store(tmp_path)
    tracker = CompletionTracker(index, CompletionSection(quiet_seconds=5, max_wait_seconds=100), scan_interval=3600)
    tracker.start()
    try:
        assert tracker.scan_once(now=t0 + 10) == 0
        assert _state(index, "5.1") == ("received", None)
        assert tracker.scan_once(now=t0 + 101) == 1
        assert _state(index, "5.1") == ("complete", "max_wait")
    finally:
        tracker.stop()
    index.close()


def test_reopened_series_max_wait_counts_from_the_reopen(tmp_path: Path) -> None:
    """A late instance long after the first must not complete the re-opened series at once via max_wait."""
    index = open_test_store(tmp_path)
    tracker = CompletionTracker(index, CompletionSection(quiet_seconds=5, max_wait_seconds=100))
    t0 = time.time() - 1000
    _deliver(index, tracker, "1.1", "5.1", "a", t0)
    tracker.association_released("a")
    assert walk(index, "5.1", "sent")
    _deliver(index, tracker, "1.2", "5.1", "b", t0 + 500)  # re-opens: generation 1
    row = index.get_series("5.1")
    assert row is not None and (row.state, row.generation, row.opened_at) == ("received", 1, t0 + 500)
    assert tracker.scan_once(now=t0 + 502) == 0  # not max_wait: 2 s into this generation
    assert tracker.scan_once(now=t0 + 506) == 1
    assert _state(index, "5.1") == ("complete", "quiet")
    index.close()


def test_on_release_off_and_max_wait(tmp_path: Path) -> None:
    index = open_test_store(tmp_path)
    tracker = CompletionTracker(index, CompletionSection(on_release=False, quiet_seconds=50, max_wait_seconds=10))
    t0 = time.time()
    for k in range(5):  # a sender trickling one instance every 3 s never goes quiet...
        _deliver(index, tracker, f"1.{k}", "5.1", "a", t0 + 3 * k)
    tracker.association_released("a")
    assert _state(index, "5.1") == ("received", None)
    assert tracker.scan_once(now=t0 + 12) == 1  # ...but max_wait ends it
    assert _state(index, "5.1") == ("complete", "max_wait")
    index.close()


def test_abort_through_the_network_waits_for_the_resend(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An aborted association is not completed on the running node's quiet timer; the re-send's release completes it."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    files = write_ct_series(tmp_path / "s", 3, 16, 16, seed=9)
    node: RunningNode = node_factory(completion={"quiet_seconds": 1.0})
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    for f in files[:2]:
        assert assoc.send_c_store(f).Status == 0
    assoc.abort()
    def state() -> list[tuple[str, str | None, str | None]]:
        store = open_test_store(node.data_dir, read_only=True)
        try:
            return [(r.state, r.completion, r.sender_state) for r in store.list_series()]
        finally:
            store.close()

    deadline = time.monotonic() + 10
    while state() != [("received", None, "aborted")] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state() == [("received", None, "aborted")]
    time.sleep(3.0)  # three quiet periods
    assert state() == [("received", None, "aborted")], node.log()[-2000:]
    assert "not completed on the quiet timer" in node.log()
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    for f in files:
        assert assoc.send_c_store(f).Status == 0
    assoc.release()
    deadline = time.monotonic() + 10
    while state()[0][0] == "received" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state() == [("complete", "release", "released")]
