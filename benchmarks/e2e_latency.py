"""End-to-end latency: release of the sending association -> SR at the destination.

A node (`medclf-node serve`, subprocess, the shipped default model unless --models/--model) receives a
synthetic 300-slice 512x512 chest CT from DCMTK storescu (TCP_NODELAY=1); a pynetdicom SCP stands in for the
PACS.  Prints the wall time from storescu's exit (association released) to the SR's arrival, and the node's
own per-stage breakdown (completion, headers, volume, inference, report, send) from its index, plus the
reference figure in the same run: the plain inference time of the same model on the same volume in-process.

    .venv/bin/python benchmarks/e2e_latency.py [--slices 300] [--size 512] [--repeat 3]

Run it through tools/netns-loopback if you like; everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from machine import describe_machine
from pydicom import dcmread

from medclf_node.config import DEFAULT_MODELS_DIR
from medclf_node.domain import Volume
from medclf_node.inference.predict import predict_series
from medclf_node.inference.registry import load_model
from medclf_node.net.receiver import StoringReceiver
from medclf_node.synthetic.dicom_writer import write_ct_series
from medclf_node.synthetic.phantoms import make_phantom

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_node(work: Path, models: Path, model: str, pacs_port: int) -> tuple[subprocess.Popen[bytes], int]:
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "node.toml"
    cfg.write_text(
        f"""
[node]
port = 0
data_dir = "{work / 'data'}"
[[peers]]
name = "scanner"
ae_title = "SCANNER"
host = "127.0.0.1"
port = 1
[[peers]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}
[results]
destinations = ["pacs"]
[models]
directory = "{models}"
[[rules]]
name = "ct"
models = ["{model}"]
[metrics]
enabled = false
"""
    )
    log = (work / "node.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "medclf_node.cli", "serve", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT)
    port_file = work / "data" / "node.port"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text())
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError((work / "node.log").read_text())


def stage_times(data_dir: Path, series_uid: str) -> dict[str, float]:
    with sqlite3.connect(data_dir / "index.sqlite") as c:
        row = c.execute("SELECT timings_json, completed_at, last_at FROM series WHERE series_uid=?",
                        (series_uid,)).fetchone()
    t = {k.split(":")[0]: v for k, v in json.loads(row[0] or "{}").items()}
    t["completion (last image -> complete)"] = round(row[1] - row[2], 3)
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    ap.add_argument("--model", default="nodule-2p5d-int8")
    args = ap.parse_args()
    print(describe_machine(), flush=True)

    env = {**os.environ, "TCP_NODELAY": "1"}
    with tempfile.TemporaryDirectory(prefix="medclf-e2e-") as tmp:
        work = Path(tmp)
        spacing = (1.0, 350.0 / args.size, 350.0 / args.size)
        ph = make_phantom(11, shape=(args.slices, args.size, args.size), spacing=spacing, nodules=1,
                          radius_range_mm=(8.0, 12.0))
        # reference in the same run: the model alone on the same volume, in this process
        model = load_model(args.models / args.model, threads=2)
        vol = Volume(ph.hu, ph.spacing, np.eye(4), (), "1", "1")
        predict_series(model, vol)
        ref = min(_timed(lambda: predict_series(model, vol)) for _ in range(args.repeat))

        receiver = StoringReceiver("PACS", 0, work / "pacs")
        proc, port = start_node(work / "node", args.models, args.model, receiver.port)
        latencies: list[float] = []
        try:
            for i in range(args.repeat):
                series = write_ct_series(ph.hu, ph.spacing, work / f"s{i}", patient_id=f"BENCH{i}",
                                         uid_seed=f"bench-{i}-{time.time()}")
                n_before = len(receiver.of_modality("SR"))
                send = subprocess.run(["storescu", "-aet", "SCANNER", "-aec", "MEDCLF", "127.0.0.1", str(port),
                                       *map(str, series)], env=env, capture_output=True, timeout=600)
                released = time.perf_counter()
                if send.returncode != 0:
                    raise RuntimeError(send.stderr.decode()[-500:])
                if not receiver.wait_for(lambda r, n=n_before: len(r.of_modality("SR")) > n, 120):
                    raise RuntimeError("no SR arrived")
                latency = time.perf_counter() - released
                latencies.append(latency)
                uid = str(dcmread(series[0], stop_before_pixels=True).SeriesInstanceUID)
                stages = stage_times(work / "node" / "data", uid)
                dispatch = latency - stages.get("total", 0.0) - stages["completion (last image -> complete)"]
                print(f"run {i + 1}: release -> SR at destination {latency:.2f} s; node stages (s): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
                      + f", claim + dispatch + network (the rest) {dispatch:.2f}", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            receiver.stop()
    print(f"\n{args.slices} x {args.size} x {args.size} series, model {args.model}, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"release -> SR: median {statistics.median(latencies):.2f} s, best {min(latencies):.2f} s (target <= 3 s)")
    print(f"reference, model alone in-process (preprocess + inference + heat map): {ref:.2f} s; "
          f"node overhead ratio {min(latencies) / ref:.2f}x")
    return 0


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
