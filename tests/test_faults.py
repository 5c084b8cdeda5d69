"""Faults: kill -9 at random points, a flapping destination, a full disk, a locked index.

Bounded for CI (``MEDCLF_FAULT_ROUNDS`` rounds, default 5); ``benchmarks/reliability.py`` runs
them with more rounds and turns the figures they ``record()`` into ``docs/reliability.md``.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pg
import pydicom
import pytest
from conftest import NODE_AE, SENDER_AE, RunningNode, free_port
from fixtures_models import phantom_volume, tiny_models_dir  # noqa: F401  (fixture)
from intake_series import write_ct_series
from test_faults_common import index_state, record, restart, rounds, spool_state

from medclf_node.net.receiver import StoringReceiver
from medclf_node.net.scu import Peer, SendResult, send_files
from medclf_node.synthetic.dicom_writer import write_ct_series as write_phantom_series

SHAPE = (24, 96, 96)
SPACING = (2.5, 3.5, 3.5)


@pytest.fixture
def nodes() -> Iterator[list[RunningNode]]:
    """Nodes (re)started by a test; all stopped at teardown."""
    started: list[RunningNode] = []
    yield started
    for n in started:
        n.stop()


def _send(port: int, paths: list[Path], out: list[SendResult]) -> None:
    try:
        out.extend(send_files(Peer(NODE_AE, "127.0.0.1", port), paths, local_ae=SENDER_AE, timeout=10))
    except Exception:  # noqa: BLE001 - the node was killed before the association: nothing acknowledged
        pass


def _send_until_acknowledged(port: int, paths: list[Path], attempts: int = 3) -> int:
    """Send like a modality does: re-send what got no Success (up to ``attempts``); returns the re-sends.

    A re-send is visible in the figures (``sender_retries``): it means a C-STORE got no answer
    within the sender's 10 s timeout.
    """
    pending, resent = list(paths), 0
    for attempt in range(attempts):
        results: list[SendResult] = []
        _send(port, pending, results)
        done = {res.path for res in results if res.status == 0}
        pending = [p for p in pending if p not in done]
        if not pending:
            return resent
        resent += len(pending) if attempt < attempts - 1 else 0
    raise AssertionError(f"{len(pending)} instance(s) never acknowledged after {attempts} attempts")


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_kill9_during_receive_loses_nothing_acknowledged(
    node_factory: Callable[..., RunningNode], nodes: list[RunningNode], tmp_path: Path
) -> None:
    n_rounds, per_round = rounds(), 30
    rng = random.Random(9)
    node = node_factory()
    nodes.append(node)
    acked: set[str] = set()
    sent = orphans = 0
    for r in range(n_rounds):
        paths = write_ct_series(tmp_path / f"r{r}", per_round, 64, 64, seed=r)
        results: list[SendResult] = []
        sender = threading.Thread(target=_send, args=(node.port, paths, results))
        sender.start()
        time.sleep(rng.uniform(0.05, 0.6))
        node.kill9()
        sender.join(timeout=30)
        sent += len(paths)
        acked |= {_uid(res.path) for res in results if res.status == 0}
        spool, index = spool_state(node.data_dir), index_state(node.data_dir)
        assert not spool.incomplete, f"partial files visible: {spool.incomplete}"
        assert index.integrity == "ok"
        missing = acked - set(index.instances)
        assert not missing, f"round {r}: acknowledged but not indexed: {len(missing)}"
        assert acked <= set(spool.visible), "acknowledged but no file"
        assert set(index.instances) <= set(spool.visible), "index rows without a file"
        unindexed = set(spool.visible) - set(index.instances)
        assert not unindexed & acked
        orphans += len(unindexed)  # renamed into place, killed before the index commit: never acknowledged
        node = restart(node)
        nodes.append(node)
        assert spool_state(node.data_dir).temporary == [], "leftover temporary files removed at start-up"
    # the senders retry what was never acknowledged: afterwards everything is there exactly once
    everything = [p for r in range(n_rounds) for p in sorted((tmp_path / f"r{r}").glob("*.dcm"))]
    retry: list[SendResult] = []
    _send(node.port, everything, retry)
    refused = [(res.path.name, res.status, res.error) for res in retry if res.status != 0]
    assert not refused, f"{len(refused)} of {len(retry)} re-sent instances not stored: {refused[:5]}"
    index = index_state(node.data_dir)
    assert len(index.instances) == len(everything) == len(spool_state(node.data_dir).visible)
    record("kill -9 during receive", "sender streams 64x64 slices, node killed at a random moment, restarted",
           rounds=n_rounds, instances=sent, acknowledged=len(acked), losses=len(acked - set(index.instances)),
           unacknowledged_complete_files_at_crash=orphans)


def _result_node(node_factory: Callable[..., RunningNode], models: Path, pacs_port: int, **extra: Any) -> RunningNode:
    return node_factory(
        peers=[
            {"name": "scanner", "ae_title": SENDER_AE, "host": "127.0.0.1", "port": free_port()},
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
        ],
        results={"destinations": ["pacs"]},
        models={"directory": str(models)},
        rules=[{"name": "ct", "models": ["test-2p5d-int8"], "min_slices": 3}],
        pipeline={"enabled": True, "poll_seconds": 0.2},
        # release completes a series; the quiet timer is only the fallback. At 2 s a sender stalled on a loaded
        # machine had a partial series completed mid-association, and its rest then (correctly) made a 2nd version
        completion={"on_release": True, "quiet_seconds": 15.0},
        dispatch={"initial_backoff_seconds": 0.2, "max_backoff_seconds": 1.0, "max_attempts": 100,
                  "timeout_seconds": 5.0},
        audit={"fsync": False},
        metrics={"enabled": False},
        **extra,
    )


def _phantom_series(tmp: Path, name: str) -> list[Path]:
    hu = phantom_volume(SHAPE, SPACING, None, seed=1)
    return write_phantom_series(hu, SPACING, tmp / name, patient_id=f"P-{name}", uid_seed=name)


def _results_by_patient(receivers: list[StoringReceiver]) -> dict[str, Counter[tuple[str, str]]]:
    """PatientID -> Counter of (modality, SOP Instance UID) deliveries, over all receiver lives."""
    out: dict[str, Counter[tuple[str, str]]] = {}
    for rec in receivers:
        for uid, n in rec.counts.items():
            ds = rec.datasets[uid]
            out.setdefault(str(ds.PatientID), Counter())[(str(ds.Modality), uid)] += n
    return out


def _wait_all_sent(node: RunningNode, n_series: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = index_state(node.data_dir).series
        if len(states) >= n_series and all(s == "sent" for s in states.values()):
            return True
        time.sleep(0.3)
    return False


def test_kill9_during_process_and_send_reports_each_series_once(
    node_factory: Callable[..., RunningNode], nodes: list[RunningNode], tiny_models_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    n_rounds = rounds(default=3)  # each round loads the model and runs the pipeline: heavier than receive
    rng = random.Random(10)
    pacs = StoringReceiver("PACS", free_port(), tmp_path / "pacs")
    try:
        node = _result_node(node_factory, tiny_models_dir, pacs.port)
        nodes.append(node)
        retries = 0
        for r in range(n_rounds):
            retries += _send_until_acknowledged(node.port, _phantom_series(tmp_path, f"s{r}"))
            time.sleep(rng.uniform(0.0, 2.5))  # somewhere in completion, volume, inference, SR/SC, send
            node.kill9()
            node = restart(node)
            nodes.append(node)
        assert _wait_all_sent(node, n_rounds, timeout=60 + 10 * n_rounds), node.log()[-3000:]
        delivered = _results_by_patient([pacs])
    finally:
        pacs.stop()
    assert sorted(delivered) == sorted(f"P-s{r}" for r in range(n_rounds))
    duplicates = 0
    lost = 2 * n_rounds - sum(len(got) for got in delivered.values())
    for patient, got in delivered.items():
        kinds = Counter(modality for modality, _uid in got)
        assert kinds["SR"] == 1 and sum(kinds.values()) == 2, f"{patient}: one SR and one SC UID, got {got}"
        duplicates += sum(n - 1 for n in got.values())
    record("kill -9 during process/send", "series sent, node killed 0-2.5 s later (completion, inference, "
           "SR/SC, dispatch), restarted; receiver counts result UIDs", rounds=n_rounds,
           instances=n_rounds * SHAPE[0], series=n_rounds, losses=lost, result_uids_per_series=2,
           duplicate_deliveries_same_uid=duplicates, sender_retries=retries)


def test_destination_flapping_delivers_everything(
    node_factory: Callable[..., RunningNode], nodes: list[RunningNode], tiny_models_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    n_series = 3
    port = free_port()
    lives: list[StoringReceiver] = [StoringReceiver("PACS", port, tmp_path / "pacs")]
    node = _result_node(node_factory, tiny_models_dir, port)
    nodes.append(node)
    flips = 0
    try:
        for s in range(n_series):
            _send_until_acknowledged(node.port, _phantom_series(tmp_path, f"f{s}"))
        up = True
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            time.sleep(random.uniform(0.3, 0.9))
            if up:
                lives[-1].stop()
            else:
                lives.append(StoringReceiver("PACS", port, tmp_path / "pacs"))
            up, flips = not up, flips + 1
        if not up:
            lives.append(StoringReceiver("PACS", port, tmp_path / "pacs"))
        assert _wait_all_sent(node, n_series, timeout=90), node.log()[-3000:]
    finally:
        lives[-1].stop()
    delivered = _results_by_patient(lives)
    assert sorted(delivered) == [f"P-f{s}" for s in range(n_series)]
    for got in delivered.values():
        kinds = Counter(modality for modality, _uid in got)
        assert kinds["SR"] == 1 and sum(kinds.values()) == 2, got  # one SR + one SC (Modality OT) UID
    duplicates = sum(n - 1 for got in delivered.values() for n in got.values())
    lost = 2 * n_series - sum(len(got) for got in delivered.values())
    record("destination flapping", f"result destination stopped/started {flips} times at random intervals",
           rounds=flips, series=n_series, objects=2 * n_series, losses=lost, duplicate_deliveries_same_uid=duplicates)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.decode()[:200]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.skipif(pg.on_postgres(), reason="sized for SQLite's file on the tiny file system; on PostgreSQL the "
                    "store is elsewhere and the test's fill never reaches full (not yet re-sized)")
def test_disk_full_gives_a700_no_partial_file_and_recovers(
    node_factory: Callable[..., RunningNode], nodes: list[RunningNode], small_fs: Path, tmp_path: Path
) -> None:
    data = small_fs / "data"
    node = node_factory(data_dir=data, retention={"min_free_disk_mb": 0})
    nodes.append(node)
    paths = write_ct_series(tmp_path / "full", 80, 128, 128, seed=3)  # ~33 kB each, 2.6 MB in all
    results: list[SendResult] = []
    _send(node.port, paths, results)
    statuses = [res.status for res in results]
    assert 0xA700 in statuses, statuses
    assert set(statuses) <= {0x0000, 0xA700}
    acked = {_uid(res.path) for res in results if res.status == 0}
    spool = spool_state(data)
    assert not spool.incomplete and not spool.temporary, "no partial or temporary file left"
    assert node.proc.poll() is None
    lost = len(acked - set(spool.visible)) + len(acked - set(index_state(data).instances))
    assert lost == 0, "every acknowledged instance is on disk and indexed"
    # space returns: delete a third of what was stored (as retention would), re-send the refused ones
    for uid in sorted(acked)[: len(acked) // 2]:
        spool.visible[uid].unlink()
    refused = [res.path for res in results if res.status == 0xA700]
    again: list[SendResult] = []
    _send(node.port, refused[:5], again)
    assert [res.status for res in again] == [0] * len(again) and again
    record("disk full", "data_dir on a 3 MB tmpfs, 80 x 33 kB instances, then space freed",
           rounds=1, instances=len(paths), acknowledged=len(acked), refused_a700=len(refused), losses=lost,
           recovered=len(again))


@pytest.mark.skipif(pg.on_postgres(), reason="SQLite's file write lock; PostgreSQL locks rows")
def test_sqlite_write_lock_is_waited_out(
    node_factory: Callable[..., RunningNode], nodes: list[RunningNode], tmp_path: Path
) -> None:
    node = node_factory()
    nodes.append(node)
    paths = write_ct_series(tmp_path / "busy", 20, 64, 64, seed=4)
    results: list[SendResult] = []
    con = sqlite3.connect(node.data_dir / "index.sqlite", timeout=5, isolation_level=None)
    con.execute("BEGIN IMMEDIATE")  # another writer holds the lock for 3 s
    try:
        sender = threading.Thread(target=_send, args=(node.port, paths, results))
        sender.start()
        time.sleep(3.0)
        assert not results, "nothing acknowledged while the index is locked"
    finally:
        con.execute("COMMIT")
        con.close()
    sender.join(timeout=60)
    assert [res.status for res in results] == [0] * len(paths)
    lost = len(paths) - len(index_state(node.data_dir).instances)
    assert lost == 0
    record("SQLite locked", "another connection holds the index write lock for 3 s during a transfer",
           rounds=1, instances=len(paths), losses=lost)
