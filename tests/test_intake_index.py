"""The SQLite index: idempotent intake, series state machine, claims, late instances, outbox states."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from stores import open_test_store, walk

from medclf_node.store import InstanceRecord, Store


def rec(sop: str, series: str = "1.2.3", *, assoc: str = "a1", at: float | None = None) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=sop, series_uid=series, study_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1", path=f"spool/1.2/{series}/{sop}.dcm", size=10,
        calling_ae="SCANNER", assoc_id=assoc, received_at=time.time() if at is None else at,
    )


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Store]:
    idx = open_test_store(tmp_path)
    yield idx
    idx.close()


def test_record_is_idempotent_and_counts(index: Store) -> None:
    assert index.record_instance(rec("1.1")).series_state_before is None
    again = index.record_instance(rec("1.1"))
    assert again.replaced and not again.reopened
    index.record_instance(rec("1.2"))
    (s,) = index.list_series()
    assert (s.state, s.n_instances, s.calling_ae) == ("received", 2, "SCANNER")
    assert [p.name for p in index.series_paths("1.2.3")] == ["1.1.dcm", "1.2.dcm"]
    assert index.series_of_association("a1") == ["1.2.3"]


def test_completion_timers(index: Store) -> None:
    t0 = 1000.0
    index.record_instance(rec("1.1", "1.5", at=t0))
    index.record_instance(rec("2.1", "1.6", at=t0))
    index.record_instance(rec("2.2", "1.6", at=t0 + 8))
    due = dict(index.due_for_completion(quiet_seconds=5, max_wait_seconds=100, now=t0 + 9))
    assert due == {"1.5": "quiet"}
    due = dict(index.due_for_completion(quiet_seconds=50, max_wait_seconds=5, now=t0 + 9))
    assert due == {"1.5": "max_wait", "1.6": "max_wait"}
    assert index.mark_complete("1.5", "quiet")
    assert not index.mark_complete("1.5", "quiet")  # only from received
    s = index.get_series("1.5")
    assert s is not None and s.state == "complete" and s.completion == "quiet"


def test_claim_is_atomic_across_threads(index: Store) -> None:
    for i in range(20):
        index.record_instance(rec(f"1.{i}", f"2.{i}"))
        index.mark_complete(f"2.{i}", "forced")
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (row := index.claim_next_complete(name)) is not None:
            assert row.state == "processing" and row.worker == index.holder(name)
            with lock:
                claimed.append(row.series_uid)

    threads = [threading.Thread(target=worker, args=(f"w{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(f"2.{i}" for i in range(20))


def test_restart_resumes_processing(tmp_path: Path) -> None:
    idx = open_test_store(tmp_path)
    idx.record_instance(rec("1.1"))
    idx.mark_complete("1.2.3", "release")
    assert idx.claim_next_complete("w") is not None
    idx.close()  # "crash" while processing
    idx2 = open_test_store(tmp_path)
    assert idx2.reset_processing_on_startup() == 1
    row = idx2.claim_next_complete("w2")
    assert row is not None and row.series_uid == "1.2.3"
    idx2.close()


def test_late_instance_reprocess_bumps_generation(index: Store) -> None:
    index.record_instance(rec("1.1"))
    index.mark_complete("1.2.3", "release")
    claimed = index.claim_next_complete("w")
    assert claimed is not None and claimed.generation == 0
    out = index.record_instance(rec("1.2"))  # late, while processing
    assert out.reopened and out.series_state_before == "processing"
    s = index.get_series("1.2.3")
    assert s is not None and (s.state, s.generation, s.n_instances) == ("received", 1, 2)
    # the stale worker cannot overwrite the newer generation
    assert not index.set_series_state("1.2.3", "reported", generation=0)
    assert index.get_series("1.2.3").state == "received"  # type: ignore[union-attr]


def test_late_instance_ignore(tmp_path: Path) -> None:
    idx = open_test_store(tmp_path, late_instances="ignore")
    idx.record_instance(rec("1.1"))
    idx.mark_complete("1.2.3", "release")
    walk(idx, "1.2.3", "sent")
    out = idx.record_instance(rec("1.2"))
    assert not out.reopened
    s = idx.get_series("1.2.3")
    assert s is not None and (s.state, s.generation, s.n_instances) == ("sent", 0, 2)
    idx.close()


def test_complete_series_takes_late_instance_without_reopening(index: Store) -> None:
    index.record_instance(rec("1.1"))
    index.mark_complete("1.2.3", "release")
    out = index.record_instance(rec("1.2"))
    assert not out.reopened
    assert index.get_series("1.2.3").state == "complete"  # type: ignore[union-attr]


def test_results_and_timings(index: Store) -> None:
    index.record_instance(rec("1.1"))
    index.record_result("1.2.3", "m", "1.0", 0.75, True, key_slice_index=3, timings={"inference": 0.1})
    walk(index, "1.2.3", "reported", rule="default-ct", timings={"volume": 0.2})
    (r,) = index.results("1.2.3")
    assert (r.probability, r.positive, r.key_slice_index, r.timings) == (0.75, True, 3, {"inference": 0.1})
    s = index.get_series("1.2.3")
    assert s is not None and s.rule == "default-ct" and s.timings == {"volume": 0.2}
    with pytest.raises(ValueError):
        index.set_series_state("1.2.3", "bogus")  # type: ignore[arg-type]


def test_outbox_lifecycle(index: Store) -> None:
    index.record_instance(rec("1.1"))
    walk(index, "1.2.3", "reported")
    assert index.enqueue_outbox("9.1", "1.2.3", "pacs", "SR", "out/9.1.dcm")
    assert index.enqueue_outbox("9.1", "1.2.3", "pacs", "SR", "out/9.1.dcm")  # idempotent
    assert index.enqueue_outbox("9.2", "1.2.3", "pacs", "SC", "out/9.2.dcm")
    now = time.time()
    due = index.due_outbox(now + 1)
    assert [i.object_uid for i in due] == ["9.1", "9.2"]
    sr, sc = due
    assert index.mark_failed_attempt(sr.id, "down", now + 100, max_attempts=2) == "queued"
    assert [i.object_uid for i in index.due_outbox(now + 1)] == ["9.2"]
    index.mark_sent(sc.id)
    assert index.get_series("1.2.3").state == "reported"  # type: ignore[union-attr]  # SR still pending
    assert index.mark_failed_attempt(sr.id, "down", now + 200, max_attempts=2) == "dead"
    s = index.get_series("1.2.3")
    assert s is not None and s.state == "failed" and s.reason_code == "dispatch_dead"
    assert index.requeue_dead() == 1
    assert index.get_series("1.2.3").state == "reported"  # type: ignore[union-attr]
    (again,) = index.due_outbox(time.time() + 1)
    assert again.attempts == 0
    index.mark_sent(again.id)
    assert index.get_series("1.2.3").state == "sent"  # type: ignore[union-attr]
    # a sent object is not re-queued by a repeated enqueue (restart after crash) ...
    assert not index.enqueue_outbox("9.1", "1.2.3", "pacs", "SR", "out/9.1.dcm")
    # ... unless its content changed (re-processing)
    assert index.enqueue_outbox("9.1", "1.2.3", "pacs", "SR", "out/9.1.dcm", replace_sent=True)


def test_jobs_command_shows_state_model_score_timings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import write_config

    from medclf_node.cli import main

    idx = open_test_store(tmp_path / "d")
    idx.record_instance(rec("1.1"))
    idx.record_result("1.2.3", "nodule-2d", "1.0", 0.8125, True, timings={"inference": 0.5})
    walk(idx, "1.2.3", "reported", timings={"volume": 0.25, "inference": 0.5})
    idx.close()
    cfg = write_config(tmp_path / "c.toml", {"node": {"data_dir": str(tmp_path / "d")}})
    assert main(["jobs", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["series", "state", "n", "model(s)"]
    fields = out[1].split()
    assert fields[:5] == ["1.2.3", "reported", "1", "nodule-2d", "0.812"]
    assert "volume=0.25" in out[1] and "inference=0.50" in out[1]
