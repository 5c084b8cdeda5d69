"""Outbox dispatch against real pynetdicom storage SCPs: backoff, dead-letter, retry, isolation, "sender"."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, write_config
from intake_series import write_ct_series
from pydicom import dcmread
from stores import open_test_store, store_section, walk

from medclf_node.config import Config, parse_config
from medclf_node.net.receiver import StoringReceiver as Receiver
from medclf_node.outbox import Dispatcher, backoff_seconds
from medclf_node.store import InstanceRecord, Store


class BlackHole:
    """Accepts TCP connections and never answers: a hung destination."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(8)
        self.conns: list[socket.socket] = []
        self._t = threading.Thread(target=self._accept, daemon=True)
        self._t.start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def stop(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def make_cfg(data_dir: Path, peers: list[dict[str, Any]], **dispatch: float) -> Config:
    return parse_config({
        "node": {"data_dir": str(data_dir), "port": 0},
        "peers": peers,
        "dispatch": {"initial_backoff_seconds": 0.2, "max_backoff_seconds": 1.0, "max_attempts": 50,
                     "timeout_seconds": 5.0, **dispatch},
    })


@pytest.fixture
def objects(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """Two small DICOM objects in data_dir/outbox/, standing in for SR and SC."""
    data = tmp_path / "data"
    files = write_ct_series(data / "outbox", 2, 16, 16, seed=21)
    uids = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    yield data, uids


def seed_series(index: Store, uids: list[str], destination: str, calling_ae: str = "SCANNER") -> None:
    index.record_instance(InstanceRecord("7.1", "7.7", "7.0", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                                         "spool/x.dcm", 1, calling_ae, "a", time.time()))
    walk(index, "7.7", "reported")
    for k, uid in enumerate(uids):
        index.enqueue_outbox(uid, "7.7", destination, "SR" if k == 0 else "SC", f"outbox/slice_{k:04d}.dcm")


def test_backoff_is_exponential_and_bounded() -> None:
    assert [backoff_seconds(a, 2.0, 10.0) for a in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_destination_down_then_up_delivers_exactly_once(objects: tuple[Path, list[str]]) -> None:
    data, uids = objects
    port = free_port()
    cfg = make_cfg(data, [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}])
    index = open_test_store(data)
    seed_series(index, uids, "pacs")
    disp = Dispatcher(cfg, index, poll_seconds=0.05)
    disp.start()
    recv = None
    try:
        assert wait_for(lambda: all(i.attempts >= 2 for i in index.outbox_items()), 10)
        assert {i.state for i in index.outbox_items()} == {"queued"}
        assert "cannot associate" in (index.outbox_items()[0].last_error or "")
        recv = Receiver("PACS", port)
        assert wait_for(lambda: {i.state for i in index.outbox_items()} == {"sent"}, 10)
        time.sleep(0.5)  # nothing further may arrive
        assert recv.counts == Counter({u: 1 for u in uids})
        assert index.get_series("7.7").state == "sent"  # type: ignore[union-attr]
    finally:
        disp.stop()
        if recv:
            recv.stop()
        index.close()


def test_dead_letter_then_cli_retry(objects: tuple[Path, list[str]], tmp_path: Path) -> None:
    data, uids = objects
    port = free_port()
    peers = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}]
    cfg = make_cfg(data, peers, max_attempts=2, initial_backoff_seconds=0.1)
    index = open_test_store(data)
    seed_series(index, uids, "pacs")
    disp = Dispatcher(cfg, index, poll_seconds=0.05)
    disp.start()
    recv = None
    try:
        assert wait_for(lambda: {i.state for i in index.outbox_items()} == {"dead"}, 10)
        assert all(i.attempts == 2 for i in index.outbox_items())
        s = index.get_series("7.7")
        assert s is not None and (s.state, s.reason_code) == ("failed", "dispatch_dead")
        recv = Receiver("PACS", port)
        time.sleep(0.3)
        assert not recv.counts  # dead items are not retried on their own
        cfg_file = write_config(tmp_path / "retry.toml", {"node": {"data_dir": str(data)}, "peers": peers,
                                                              "store": store_section(data)})
        out = subprocess.run([sys.executable, "-m", "medclf_node.cli", "retry", "--config", str(cfg_file), "--all"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "re-queued 2 item(s)" in out.stdout
        disp.wake()
        assert wait_for(lambda: {i.state for i in index.outbox_items()} == {"sent"}, 10)
        assert recv.counts == Counter({u: 1 for u in uids})
        assert index.get_series("7.7").state == "sent"  # type: ignore[union-attr]
    finally:
        disp.stop()
        if recv:
            recv.stop()
        index.close()


def test_hung_destination_does_not_block_others(objects: tuple[Path, list[str]]) -> None:
    data, uids = objects
    hung_port, ok_port = free_port(), free_port()
    cfg = make_cfg(data, [
        {"name": "hung", "ae_title": "HUNG", "host": "127.0.0.1", "port": hung_port},
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": ok_port},
    ], timeout_seconds=20.0)
    hole, recv = BlackHole(hung_port), Receiver("PACS", ok_port)
    index = open_test_store(data)
    seed_series(index, uids[:1], "hung")
    index.enqueue_outbox(uids[1], "7.7", "pacs", "SC", "outbox/slice_0001.dcm")
    disp = Dispatcher(cfg, index, poll_seconds=0.05)
    disp.start()
    try:
        t0 = time.monotonic()

        def states() -> dict[str, str]:
            return {i.destination: i.state for i in index.outbox_items()}

        assert wait_for(lambda: states()["pacs"] == "sent", 10)
        assert time.monotonic() - t0 < 10  # far less than the hung peer's 20 s timeout
        assert recv.counts[uids[1]] == 1
        assert states() == {"hung": "queued", "pacs": "sent"}
    finally:
        hole.stop()
        disp.stop()
        recv.stop()
        index.close()


def test_sender_destination_resolution(objects: tuple[Path, list[str]]) -> None:
    data, uids = objects
    port = free_port()
    cfg = make_cfg(data, [{"name": "scanner", "ae_title": "SCANNER", "host": "127.0.0.1", "port": port}])
    recv = Receiver("SCANNER", port)
    index = open_test_store(data)
    seed_series(index, uids[:1], "sender", calling_ae="SCANNER")
    # a second series from an AE that is not a peer: dead at once, with the reason
    index.record_instance(InstanceRecord("8.1", "8.8", "8.0", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                                         "spool/y.dcm", 1, "STRANGER", "b", time.time()))
    walk(index, "8.8", "reported")
    index.enqueue_outbox(uids[1], "8.8", "sender", "SC", "outbox/slice_0001.dcm")
    disp = Dispatcher(cfg, index, poll_seconds=0.05)
    disp.start()
    try:
        assert wait_for(lambda: recv.counts[uids[0]] == 1, 10)
        assert wait_for(lambda: index.outbox_items("8.8")[0].state == "dead", 5)
        assert "STRANGER" in (index.outbox_items("8.8")[0].last_error or "")
        assert index.get_series("8.8").reason_code == "dispatch_dead"  # type: ignore[union-attr]
        assert uids[1] not in recv.counts
    finally:
        disp.stop()
        recv.stop()
        index.close()


def test_cli_echo_and_send(tmp_path: Path) -> None:
    port = free_port()
    recv = Receiver("PACS", port)
    files = write_ct_series(tmp_path / "s", 3, 16, 16, seed=22)
    cfg_file = write_config(tmp_path / "c.toml", {
        "node": {"data_dir": str(tmp_path / "d")},
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
    })
    try:
        def cli(*a: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "medclf_node.cli", *a, "--config", str(cfg_file)],
                                  capture_output=True, text=True, timeout=60)

        echo = cli("echo", "pacs")
        assert echo.returncode == 0 and "status 0x0000" in echo.stdout, echo.stderr
        sent = cli("send", "--to", "pacs", str(tmp_path / "s"))
        assert sent.returncode == 0 and "sent 3/3" in sent.stdout, sent.stderr
        assert len(recv.counts) == 3
    finally:
        recv.stop()
    down = subprocess.run([sys.executable, "-m", "medclf_node.cli", "echo", "pacs", "--config", str(cfg_file)],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "FAILED" in down.stderr
    assert files
