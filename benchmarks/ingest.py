"""Ingest throughput: medclf-node vs DCMTK storescp receiving the same 300-slice 512x512 CT series.

Both receivers get the same series from DCMTK storescu (TCP_NODELAY=1 for DCMTK), once
from a single sender and once split over four concurrent senders.  Prints instances/s
for each and the ratio node/storescp.  The node runs with its normal durable writes
(write, fsync, rename, fsync dir, index commit) unless ``--no-fsync`` is given; storescp
never fsyncs.

Everything runs inside a private network namespace (``unshare --net``, loopback only)
when possible, so storescp, which binds all interfaces, is never reachable from outside.

    .venv/bin/python benchmarks/ingest.py [--slices 300] [--repeat 1] [--no-fsync] [--idle-seconds 10] [--keep DIR]

It also reports the CPU an idle node burns (the node's reactors must block, not poll).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
NETNS_FLAG = "--inside-netns"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


def send(port: int, called: str, parts: list[list[Path]]) -> float:
    """Run one storescu per part concurrently; returns wall seconds until all finished."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aet", "SCANNER", "-aec", called, "127.0.0.1", str(port), *map(str, part)],
            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        for part in parts
    ]
    errors = [p.communicate()[1] for p in procs]
    dt = time.perf_counter() - t0
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-1000:]}")
    return dt


def split(files: list[Path], n: int) -> list[list[Path]]:
    return [files[i::n] for i in range(n)]


def run_storescp(work: Path, files: list[Path], senders: int) -> float:
    out = work / f"storescp-{senders}"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "--fork", "-aet", "STORESCP", "-od", str(out), str(port)],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        dt = send(port, "STORESCP", split(files, senders))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    n = len(list(out.iterdir()))
    if n != len(files):
        raise RuntimeError(f"storescp stored {n} of {len(files)} files")
    return dt


def start_node(data: Path, fsync: bool) -> tuple[subprocess.Popen[bytes], int]:
    """``medclf-node serve`` on a free port with ``data`` as data_dir; returns (process, port)."""
    cfg = data.parent / f"{data.name}.toml"
    cfg.write_text(
        f'[node]\nae_title = "MEDCLF"\nport = 0\ndata_dir = "{data}"\nlog_level = "WARNING"\n'
        f"durable_writes = {'true' if fsync else 'false'}\n"
        '[accept]\ncalling_ae_titles = ["SCANNER"]\n[completion]\nquiet_seconds = 60\n'
        "[pipeline]\nenabled = false\n",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "medclf_node.cli", "serve", "--config", str(cfg)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    port_file = data / "node.port"
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_node(proc)
            raise RuntimeError(f"node did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def stop_node(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)


def run_node(work: Path, files: list[Path], senders: int, fsync: bool) -> float:
    data = work / f"node-{senders}-{'fsync' if fsync else 'nofsync'}"
    proc, port = start_node(data, fsync)
    try:
        dt = send(port, "MEDCLF", split(files, senders))
    finally:
        stop_node(proc)
    import sqlite3

    with sqlite3.connect(data / "index.sqlite") as c:
        n = c.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
    if n != len(files):
        raise RuntimeError(f"node indexed {n} of {len(files)} instances")
    return dt


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(work: Path, seconds: float) -> tuple[float, float]:
    """CPU share (of one core) of a served node doing nothing: without, then with one open idle association."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    proc, port = start_node(work / "node-idle", fsync=True)
    try:
        time.sleep(1.0)  # start-up work is not idling
        c0 = cpu_seconds(proc.pid)
        time.sleep(seconds)
        no_assoc = (cpu_seconds(proc.pid) - c0) / seconds
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDCLF")
        if not assoc.is_established:
            raise RuntimeError("idle probe: association not established")
        time.sleep(0.5)
        c0 = cpu_seconds(proc.pid)
        time.sleep(seconds)
        with_assoc = (cpu_seconds(proc.pid) - c0) / seconds
        assoc.release()
    finally:
        stop_node(proc)
    return no_assoc, with_assoc


DURABLE_STEPS = ("write", "fsync file", "rename", "fsync dir", "index commit")


def durable_steps_ms(work: Path, data: bytes, n: int = 60) -> dict[str, float]:
    """Median cost of each step of the spool's durable protocol on the work disk, in ms.

    The same steps as ``Spool.store`` with durable writes: write a new temporary file, fsync it,
    rename it into place, fsync the directory, commit the index row (SQLite WAL, synchronous=FULL,
    through the node's own :class:`Store`).  A single sender waits for each C-STORE response, so
    their sum is a floor on the node's per-instance time with fsync; storescp does none of them.
    """
    from medclf_node.store import InstanceRecord, SqliteStore

    d = work / "fsync-probe"
    d.mkdir()
    index = SqliteStore(d, durable=True)
    steps: dict[str, list[float]] = {k: [] for k in DURABLE_STEPS}
    try:
        for i in range(n):
            tmp, final = d / f".{i}.tmp", d / f"{i}.dcm"
            t0 = time.perf_counter()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            t1 = time.perf_counter()
            os.fsync(fd)
            os.close(fd)
            t2 = time.perf_counter()
            os.replace(tmp, final)
            t3 = time.perf_counter()
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)
            t4 = time.perf_counter()
            index.record_instance(InstanceRecord(f"1.2.3.{i}", "1.2.3", "1.2", "1.2.840.10008.5.1.4.1.1.2",
                                                 "1.2.840.10008.1.2.1", final.name, len(data), "BENCH", "a", t4))
            t5 = time.perf_counter()
            for key, (a, b) in zip(DURABLE_STEPS, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5)), strict=True):
                steps[key].append((b - a) * 1e3)
    finally:
        index.close()
    return {k: statistics.median(v) for k, v in steps.items()}


def enter_netns() -> bool:
    """Re-run this script inside a private network namespace with loopback up (needs root)."""
    if NETNS_FLAG in sys.argv:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        sys.argv.remove(NETNS_FLAG)
        return True
    if shutil.which("unshare") and subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0:
        os.execvp("unshare", ["unshare", "--net", sys.executable, *sys.argv, NETNS_FLAG])
    print("note: cannot create a network namespace; storescp binds all interfaces during the run")
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs per configuration")
    ap.add_argument("--no-fsync", action="store_true", help="also measure the node with durable_writes=false")
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: temporary)")
    ap.add_argument("--idle-seconds", type=float, default=10.0,
                    help="measure the idle node's CPU for this long, without and with an open association (0: skip)")
    in_ns = enter_netns()
    args = ap.parse_args()
    print(describe_machine(), flush=True)
    from intake_series import write_ct_series

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="medclf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        files = write_ct_series(work / "series", args.slices, args.size, args.size, seed=42)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"series: {len(files)} instances, {args.size}x{args.size}, {mb:.0f} MB; "
              f"network namespace: {'private' if in_ns else 'host loopback'}")
        steps = durable_steps_ms(work, files[0].read_bytes())
        total = sum(steps.values())
        print("durable protocol per instance on this disk (medians): "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in steps.items())
              + f"; sum {total:.2f} ms (single-sender ceiling with fsync ~{1000 / total:.0f} inst/s "
              "before any network work)")
        if args.idle_seconds > 0:
            no_assoc, with_assoc = idle_cpu(work, args.idle_seconds)
            print(f"idle node CPU over {args.idle_seconds:.0f} s: {100 * no_assoc:.1f}% of a core, "
                  f"{100 * with_assoc:.1f}% with one open idle association")
        modes = [True, False] if args.no_fsync else [True]
        for senders in (1, 4):
            ref = min(run_storescp(_fresh(work / f"scp-{senders}-{i}"), files, senders) for i in range(args.repeat))
            ref_rate = len(files) / ref
            print(f"{senders} sender(s): storescp        {ref_rate:7.1f} inst/s ({ref:.2f} s)")
            for fsync in modes:
                dt = min(
                    run_node(_fresh(work / f"node-{senders}-{fsync}-{i}"), files, senders, fsync)
                    for i in range(args.repeat)
                )
                rate = len(files) / dt
                label = "node (fsync)   " if fsync else "node (no fsync)"
                print(f"{senders} sender(s): {label} {rate:7.1f} inst/s ({dt:.2f} s)  "
                      f"ratio node/storescp = {rate / ref_rate:.2f}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _fresh(p: Path) -> Path:
    p.mkdir(parents=True)
    return p


if __name__ == "__main__":
    sys.exit(main())
