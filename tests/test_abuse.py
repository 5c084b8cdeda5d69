"""Load under abuse: silent and garbage connections while several DCMTK senders send (issue 15).

Measured before the pre-association gate: 300 silent TCP connections -> 0 of 10 legitimate
stores succeeded and the node ran 612 threads.  Here, with the silent connections held open
for the whole run and garbage connections (random bytes, a huge PDU length, connect-and-close,
half an A-ASSOCIATE-RQ) arriving in waves while the senders send: a C-ECHO and a 10-slice
512 x 512 C-STORE each succeed within 2 s, every instance sent is acknowledged, stored and
indexed, and the node's threads and RSS stay bounded.  Loopback only; stops by itself.

CI size (~10 s here, well under 60 s on two busy cores): 300 silent, 60 garbage per wave, 8 senders
x 100 slices of 64 x 64.  ``MEDCLF_ABUSE_SILENT``, ``MEDCLF_ABUSE_GARBAGE``, ``MEDCLF_ABUSE_SENDERS``,
``MEDCLF_ABUSE_SLICES`` and ``MEDCLF_ABUSE_ROWS`` change it; ``benchmarks/reliability.py
--abuse-full`` runs the issue's size (300 silent, 60 garbage, 8 senders x 200 slices of 512 x 512).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import NODE_AE, SENDER_AE, RunningNode, dcmtk_env, echoscu, needs_dcmtk, storescu
from intake_series import write_ct_series
from test_badinput import RQ
from test_faults_common import index_state, record, spool_state

SILENT = int(os.environ.get("MEDCLF_ABUSE_SILENT", "300"))
GARBAGE = int(os.environ.get("MEDCLF_ABUSE_GARBAGE", "60"))
SENDERS = int(os.environ.get("MEDCLF_ABUSE_SENDERS", "8"))
SLICES = int(os.environ.get("MEDCLF_ABUSE_SLICES", "100"))
ROWS = int(os.environ.get("MEDCLF_ABUSE_ROWS", "64"))
CHECK_WITHIN_S = 2.0


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _garbage_wave(port: int, n: int) -> int:
    """``n`` hostile connections of four kinds; returns how many connected."""
    done = 0
    for i in range(n):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                kind = i % 4
                if kind == 0:
                    s.sendall(os.urandom(256))
                elif kind == 1:
                    s.sendall(struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0) + os.urandom(32))
                elif kind == 2:
                    s.sendall(RQ[: len(RQ) // 2])
                done += 1  # kind 3: connect and close without a byte
        except OSError:
            pass
    return done


def _closed_by_node(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _timed(run: Callable[[], subprocess.CompletedProcess[str]]) -> float:
    t0 = time.monotonic()
    proc = run()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return time.monotonic() - t0


@needs_dcmtk
def test_senders_get_through_silent_and_garbage_connections(
    node_factory: Callable[..., RunningNode], tmp_path: Path
) -> None:
    check_series = [write_ct_series(tmp_path / f"check{i}", 10, 512, 512, seed=200 + i) for i in range(3)]
    dirs = []
    for s in range(SENDERS):
        write_ct_series(tmp_path / f"in{s}", SLICES, ROWS, ROWS, seed=100 + s, patient_id=f"ABUSE{s}")
        dirs.append(tmp_path / f"in{s}")
    # silent connections are held for the whole run: ARTIM (and the idle timeout bounding it) above the run time
    node = node_factory(limits={"artim_timeout_seconds": 300.0, "idle_timeout_seconds": 300.0})
    time.sleep(0.5)
    idle_threads = _proc_status(node.proc.pid)["Threads"]
    silent = []
    try:
        for _ in range(SILENT):
            silent.append(socket.create_connection(("127.0.0.1", node.port), timeout=10))
        garbage = _garbage_wave(node.port, GARBAGE)
        time.sleep(0.3)
        with_silent = _proc_status(node.proc.pid)["Threads"]
        echo_s = _timed(lambda: echoscu(node.port))
        store_s = _timed(lambda: storescu(node.port, check_series[0]))
        assert echo_s < CHECK_WITHIN_S and store_s < CHECK_WITHIN_S, (echo_s, store_s)

        samples: list[dict[str, int]] = []
        stop = threading.Event()

        def abuse_and_watch() -> None:
            nonlocal garbage
            while not stop.is_set():
                garbage += _garbage_wave(node.port, GARBAGE)
                for _ in range(5):
                    samples.append(_proc_status(node.proc.pid))
                    if stop.wait(0.1):
                        return

        watcher = threading.Thread(target=abuse_and_watch, daemon=True)
        t0 = time.monotonic()
        watcher.start()
        procs = [
            subprocess.Popen(["storescu", "-aet", SENDER_AE, "-aec", NODE_AE, "127.0.0.1", str(node.port),
                              "+sd", str(d)], env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for d in dirs
        ]
        during = storescu(node.port, check_series[1])  # a late-comer in the middle of it all
        outputs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
        elapsed = time.monotonic() - t0
        stop.set()
        watcher.join(timeout=30)
        assert during.returncode == 0, during.stdout[-2000:]
        assert [p.returncode for p in procs] == [0] * SENDERS, [o[-1000:] for o in outputs]
        after_store_s = _timed(lambda: storescu(node.port, check_series[2]))
        still_open = sum(1 for s in silent if not _closed_by_node(s))
    finally:
        for s in silent:
            s.close()
    total = SENDERS * SLICES + 30
    index = index_state(node.data_dir)
    spool = spool_state(node.data_dir)
    assert len(index.instances) == total and len(spool.visible) == total, (len(index.instances), total)
    assert not spool.incomplete and not spool.temporary
    assert node.proc.poll() is None
    assert still_open == SILENT, "the silent connections were held (not evicted, not timed out) for the whole run"
    peak_threads = max(s["Threads"] for s in samples) if samples else with_silent
    peak_rss_mb = _proc_status(node.proc.pid)["VmHWM"] / 1024
    # two threads (association + DUL) per running association: the senders, the late-comer, one spare
    assert with_silent <= idle_threads + 2, (idle_threads, with_silent)
    assert peak_threads <= idle_threads + 2 * (SENDERS + 2) + 4, (idle_threads, peak_threads)
    assert peak_rss_mb < 150 + 2 * ROWS * ROWS * 2 * (SENDERS + 1) / 1e6 * 8, peak_rss_mb
    record("load under abuse",
           f"{SILENT} silent TCP connections held open, {GARBAGE} garbage connections per wave (random bytes, "
           f"huge PDU length, half A-ASSOCIATE-RQ, connect-close) during the load, {SENDERS} concurrent DCMTK "
           f"storescu x {SLICES} slices {ROWS}x{ROWS}, plus three 10-slice 512x512 checks",
           rounds=1, instances=total, losses=total - len(index.instances), garbage_connections=garbage,
           echo_s=round(echo_s, 2), store_10_s=round(store_s, 2), store_10_after_s=round(after_store_s, 2),
           instances_per_s=round(SENDERS * SLICES / elapsed, 1), node_threads_idle=idle_threads,
           node_threads_with_silent=with_silent, node_threads_peak=peak_threads,
           node_peak_rss_mb=round(peak_rss_mb, 1), silent_still_open=still_open)
