"""Load: 8 concurrent DCMTK senders x 300 slices plus idle associations held open.

Everything must be stored and indexed, nothing lost; the idle associations must be aborted
by the idle timeout while the load runs; the node's peak RSS (VmHWM) is reported.
CI size: 8 x 150 slices of 64x64 (the node's cost is per instance; ``benchmarks/reliability.py``
runs 8 x 300); ``MEDCLF_LOAD_SLICES``, ``MEDCLF_LOAD_ROWS=512`` (full-size CT) and
``MEDCLF_LOAD_SENDERS`` change the shape of the load.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import NODE_AE, SENDER_AE, RunningNode, dcmtk_env, needs_dcmtk
from intake_series import write_ct_series
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from test_faults_common import index_state, record, spool_state

SENDERS = int(os.environ.get("MEDCLF_LOAD_SENDERS", "8"))
SLICES = int(os.environ.get("MEDCLF_LOAD_SLICES", "150"))  # CI size; benchmarks/reliability.py runs 300
ROWS = int(os.environ.get("MEDCLF_LOAD_ROWS", "64"))
IDLE = 4
IDLE_TIMEOUT = 3.0


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _idle_association(port: int) -> Any:
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(Verification, [ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    return assoc


@needs_dcmtk
def test_concurrent_senders_and_idle_associations(node_factory: Callable[..., RunningNode], tmp_path: Path) -> None:
    dirs = []
    for s in range(SENDERS):
        write_ct_series(tmp_path / f"in{s}", SLICES, ROWS, ROWS, seed=100 + s, patient_id=f"LOAD{s}")
        dirs.append(tmp_path / f"in{s}")
    node = node_factory(limits={"idle_timeout_seconds": IDLE_TIMEOUT, "max_associations": SENDERS + IDLE + 4})
    idle = [_idle_association(node.port) for _ in range(IDLE)]
    try:
        t0 = time.monotonic()
        procs = [
            subprocess.Popen(["storescu", "-aet", SENDER_AE, "-aec", NODE_AE, "127.0.0.1", str(node.port),
                              "+sd", str(d)], env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for d in dirs
        ]
        outputs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
        elapsed = time.monotonic() - t0
        assert [p.returncode for p in procs] == [0] * SENDERS, outputs
        deadline = time.monotonic() + IDLE_TIMEOUT + 5
        while any(a.is_established for a in idle) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(a.is_aborted for a in idle), "idle associations are aborted by the idle timeout"
        rss = peak_rss_mb(node.proc.pid)
    finally:
        for a in idle:
            if a.is_established:
                a.abort()
    total = SENDERS * SLICES
    index = index_state(node.data_dir)
    spool = spool_state(node.data_dir)
    assert len(index.instances) == total and len(spool.visible) == total
    assert not spool.incomplete and not spool.temporary
    record("load", f"{SENDERS} concurrent DCMTK storescu x {SLICES} slices {ROWS}x{ROWS}, {IDLE} idle associations "
           f"(idle timeout {IDLE_TIMEOUT:g} s)", rounds=1, instances=total, losses=total - len(index.instances),
           idle_aborted=IDLE, instances_per_s=round(total / elapsed, 1), node_peak_rss_mb=round(rss, 1))
