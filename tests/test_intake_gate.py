"""The pre-association gate: connections cost nothing until they send a complete A-ASSOCIATE-RQ.

Real node subprocess (``node_factory``), raw sockets, pynetdicom requestors and DCMTK echoscu.
Measured before the gate (issue 15): 60 connect-and-close probes locked every sender out for
60 s ("Local Limit Exceeded"), 300 silent sockets ran 612 threads, one host could hold every slot.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import NODE_AE, SENDER_AE, RunningNode, echoscu, needs_dcmtk
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from stores import open_test_store
from test_badinput import RQ, _read_pdu

from medclf_node.net.slots import AE_LIMIT, HOST_LIMIT, TOTAL_LIMIT, AssociationSlots, Ticket

LIMIT_RJ = (0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local-limit-exceeded


def threads(node: RunningNode) -> int:
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def _associate(port: int, calling: str = SENDER_AE, source: str = "127.0.0.1") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification, [ImplicitVRLittleEndian])
    ae.network_timeout = 30
    return ae.associate("127.0.0.1", port, ae_title=NODE_AE, bind_address=(source, 0))


def _rj(assoc: Any) -> tuple[int, int, int]:
    rj = assoc.acceptor.primitive
    return (rj.result, rj.result_source, rj.diagnostic)


def _timed_echo(node: RunningNode) -> float:
    t0 = time.monotonic()
    done = echoscu(node.port)
    assert done.returncode == 0, done.stdout + done.stderr
    return time.monotonic() - t0


def _closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True when the node closes ``s`` (EOF or reset) within ``timeout`` seconds."""
    s.settimeout(timeout)
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


@pytest.fixture
def held() -> Iterator[list[Any]]:
    """Sockets and associations a test holds open; closed at teardown whatever happens."""
    things: list[Any] = []
    yield things
    for t in things:
        if isinstance(t, socket.socket):
            t.close()
        elif t.is_established:
            t.release()


@needs_dcmtk
def test_probes_and_garbage_do_not_lock_senders_out(node_factory: Callable[..., RunningNode]) -> None:
    """Issue 15: 60 connect-and-close probes made echoscu fail for 60 s; random bytes and a huge PDU length too."""
    node = node_factory()
    for _ in range(60):
        socket.create_connection(("127.0.0.1", node.port)).close()
    assert _timed_echo(node) < 2
    for i in range(20):
        with socket.create_connection(("127.0.0.1", node.port)) as s:
            s.sendall(os.urandom(64) if i % 2 else struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0) + RQ[6:40])
    assert _timed_echo(node) < 2
    # the huge announced length is answered with A-ABORT at once, nothing of it is read
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
        s.sendall(struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0))
        t0 = time.monotonic()
        assert _read_pdu(s)[:1] == b"\x07"
        assert time.monotonic() - t0 < 1
    port = int((node.data_dir / "metrics.port").read_text())
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    counts = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("medclf_gate_connections_total{")}
    assert counts.get("closed", 0) >= 60 and counts.get("not_associate_rq", 0) >= 11, counts
    assert counts.get("handed_off", 0) >= 2, counts


@needs_dcmtk
def test_silent_connections_take_no_thread_and_no_slot(
    node_factory: Callable[..., RunningNode], held: list[Any]
) -> None:
    node = node_factory(limits={"max_associations": 2})
    time.sleep(0.5)
    before = threads(node)
    held.extend(socket.create_connection(("127.0.0.1", node.port)) for _ in range(100))
    held.extend(socket.create_connection(("127.0.0.1", node.port)) for _ in range(10))
    for s in held[-10:]:
        s.sendall(RQ[:30])  # half an A-ASSOCIATE-RQ
    time.sleep(0.5)
    assert threads(node) <= before + 2, (before, threads(node))
    for _ in range(3):
        assert _timed_echo(node) < 2


def test_artim_timer_closes_connections_without_associate_rq(node_factory: Callable[..., RunningNode]) -> None:
    node = node_factory(limits={"artim_timeout_seconds": 1.0})
    silent = socket.create_connection(("127.0.0.1", node.port))
    partial = socket.create_connection(("127.0.0.1", node.port))
    partial.sendall(RQ[:-5])
    t0 = time.monotonic()
    try:
        assert _closed_by_peer(silent, 5) and _closed_by_peer(partial, 5)
    finally:
        silent.close()
        partial.close()
    assert 0.8 < time.monotonic() - t0 < 4
    # an established association is governed by idle_timeout_seconds (60 s), not ARTIM
    assoc = _associate(node.port)
    try:
        time.sleep(1.6)
        assert assoc.is_established and assoc.send_c_echo().Status == 0
    finally:
        assoc.release()


def test_artim_is_never_longer_than_the_idle_timeout(node_factory: Callable[..., RunningNode]) -> None:
    node = node_factory(limits={"idle_timeout_seconds": 1.0})
    with socket.create_connection(("127.0.0.1", node.port)) as s:
        t0 = time.monotonic()
        assert _closed_by_peer(s, 5)
        assert time.monotonic() - t0 < 3


def test_peer_eof_frees_the_slot_at_once(node_factory: Callable[..., RunningNode]) -> None:
    """A peer that vanishes after A-ASSOCIATE-AC (no release, no abort) gives its slot back at once."""
    node = node_factory(limits={"max_associations": 1})
    waited = []
    for _ in range(5):
        t0 = time.monotonic()
        while True:
            with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
                s.sendall(RQ)
                answer = _read_pdu(s)[:1]  # then the peer closes without a word
            if answer == b"\x02" or time.monotonic() - t0 > 2:
                break
            time.sleep(0.02)
        assert answer == b"\x02", "the previous peer's slot is free again"
        waited.append(time.monotonic() - t0)
    assert max(waited) < 1.0, waited


def test_one_host_cannot_take_every_slot(node_factory: Callable[..., RunningNode], held: list[Any]) -> None:
    node = node_factory(limits={"max_associations": 4, "max_associations_per_host": 2})
    for _ in range(2):
        held.append(_associate(node.port))
        assert held[-1].is_established
    extra = _associate(node.port)
    assert extra.is_rejected and _rj(extra) == LIMIT_RJ
    other = _associate(node.port, source="127.0.0.2")
    held.append(other)
    assert other.is_established, "another host still gets in"
    audit = [json.loads(line) for line in (node.data_dir / "audit.jsonl").read_text().splitlines()]
    assert any(r.get("reason") == HOST_LIMIT for r in audit)


def test_one_ae_title_cannot_take_every_slot(node_factory: Callable[..., RunningNode], held: list[Any]) -> None:
    node = node_factory(accept={"calling_ae_titles": ["*"]},
                        limits={"max_associations": 4, "max_associations_per_ae": 2})
    for _ in range(2):
        held.append(_associate(node.port))
        assert held[-1].is_established
    extra = _associate(node.port)
    assert extra.is_rejected and _rj(extra) == LIMIT_RJ
    other = _associate(node.port, calling="OTHER")
    held.append(other)
    assert other.is_established
    # and the total: two more AE titles fill the remaining slots... one more is refused
    held.append(_associate(node.port, calling="THIRD"))
    assert held[-1].is_established
    last = _associate(node.port, calling="FOURTH")
    assert last.is_rejected and _rj(last) == LIMIT_RJ
    held[0].release()
    time.sleep(0.3)
    again = _associate(node.port, calling="FOURTH")
    held.append(again)
    assert again.is_established, "a released slot is usable again"


def test_waiting_connections_overflow_evicts_the_busiest_host(
    node_factory: Callable[..., RunningNode], held: list[Any]
) -> None:
    node = node_factory(limits={"max_pending_connections": 8})
    flood = []
    for _ in range(20):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", node.port))
        flood.append(s)
    held.extend(flood)
    a = _associate(node.port)
    assert a.is_established
    a.release()
    time.sleep(0.5)
    closed = sum(_closed_by_peer(s, 0.05) for s in flood)
    assert closed >= 12, closed
    assert not _closed_by_peer(flood[-1], 0.05), "the newest waiting connections stay"


# --- AssociationSlots ----------------------------------------------------------------------
def test_slots_count_caps_and_release_once() -> None:
    slots = AssociationSlots(total=3, per_host=2, per_ae=2)
    a = slots.acquire("h1", "A")
    b = slots.acquire("h1", "B")
    assert isinstance(a, Ticket) and isinstance(b, Ticket)
    assert slots.acquire("h1", "C") == HOST_LIMIT
    c = slots.acquire("h2", "A")
    assert isinstance(c, Ticket)
    assert slots.acquire("h3", "A") == AE_LIMIT
    assert slots.acquire("h3", "D") == TOTAL_LIMIT
    a.release()
    a.release()  # idempotent
    assert slots.running == 2
    assert isinstance(slots.acquire("h1", "C"), Ticket)
    assert slots.acquire("h4", "E") == TOTAL_LIMIT


# --- in process: stop, and one connection's surprise ------------------------------------------------
@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Any]:
    from medclf_node.config import parse_config
    from medclf_node.ingest.spool import Spool
    from medclf_node.net.scp import StoreSCP

    cfg = parse_config({"node": {"ae_title": NODE_AE, "port": 0, "data_dir": str(tmp_path / "d")},
                        "accept": {"calling_ae_titles": [SENDER_AE]}})
    index = open_test_store(tmp_path / "d")
    node = StoreSCP(cfg, Spool(tmp_path / "d", index, durable=False))
    node.start()
    yield node
    node.stop()
    index.close()


def test_stop_closes_waiting_connections_at_once(scp: Any) -> None:
    socks = [socket.create_connection(("127.0.0.1", scp.port)) for _ in range(20)]
    try:
        deadline = time.monotonic() + 5
        while scp.gate.pending < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scp.gate.pending == 20
        t0 = time.monotonic()
        scp.stop()
        assert time.monotonic() - t0 < 3
        assert all(_closed_by_peer(s, 2) for s in socks)
    finally:
        for s in socks:
            s.close()
    scp.start()  # and it serves again after a restart
    assoc = _associate(scp.port)
    assert assoc.is_established
    assoc.release()


def test_an_unexpected_error_on_one_connection_does_not_stop_the_gate(
    scp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medclf_node.net import gate

    real = gate.AssociationGate._start
    calls = {"n": 0}

    def flaky(self: Any, sel: Any, conn: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("surprise")
        real(self, sel, conn)

    monkeypatch.setattr(gate.AssociationGate, "_start", flaky)
    with socket.create_connection(("127.0.0.1", scp.port), timeout=5) as s:
        s.sendall(RQ)
        assert _closed_by_peer(s, 5)
    assert scp.gate.outcomes["error"] == 1
    assoc = _associate(scp.port)
    assert assoc.is_established, "the next connection is served"
    assoc.release()
