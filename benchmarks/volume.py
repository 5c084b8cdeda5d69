"""Volume assembly benchmark: 300-slice 512x512 CT from files on disk.

Compares ``assemble_volume`` with the naive reference (``dcmread`` every file with pixels,
``pixel_array * slope + intercept``, sort by position, ``np.stack``) in the same run.  Each
measurement runs in a fresh child process, alternating ours/naive, so neither inherits the
other's heap; time is measured without tracing, memory in a separate run with tracemalloc
(numpy reports its buffers to it) and as the growth of the process's peak RSS over its RSS
just before the call (Linux ``/proc/self/clear_refs``).

    .venv/bin/python benchmarks/volume.py [--slices 300] [--size 512] [--repeat 3] [--dir D]

Targets (issue 3): <= 1.0 s on 2 cores, peak <= 2.5x the float32 volume.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
from machine import describe_machine

ROOT = Path(__file__).resolve().parent.parent


def make_series(directory: Path, slices: int, size: int) -> None:
    """Write the benchmark series (uint16 + intercept -1024, like most CT scanners)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from ctseries import axial_positions, make_series, write_series  # noqa: PLC0415

    rng = np.random.default_rng(0)
    paths_written = 0
    chunk = 50
    study = pydicom.uid.generate_uid()
    series = pydicom.uid.generate_uid()
    frame = pydicom.uid.generate_uid()
    positions = axial_positions(slices, spacing=1.0)
    for start in range(0, slices, chunk):
        n = min(chunk, slices - start)
        hu = rng.integers(-1024, 2000, size=(n, size, size)).astype(np.float32)
        datasets = make_series(hu, positions[start : start + n], study_uid=study, series_uid=series)
        for k, ds in enumerate(datasets):
            ds.FrameOfReferenceUID = frame
            ds.InstanceNumber = start + k + 1
        for i, p in enumerate(write_series(datasets, directory / "tmp")):
            p.rename(directory / f"{start + i:05d}.dcm")
            paths_written += 1
    (directory / "tmp").rmdir()


def naive(paths: list[Path]) -> np.ndarray:
    """The reference everyone writes first."""
    datasets = [pydicom.dcmread(p) for p in paths]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    slices = [d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets]
    return np.stack(slices)


def ours(paths: list[Path]) -> np.ndarray:
    from medclf_node.config import VolumeSection  # noqa: PLC0415
    from medclf_node.ingest.volume import assemble_volume  # noqa: PLC0415

    return assemble_volume(paths, VolumeSection()).array


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux clear_refs 5); returns the current RSS in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") * 1024
    except OSError:  # not Linux, or not allowed: fall back to the (monotonic) rusage peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(which: str, directory: Path, trace: bool) -> dict[str, float]:
    paths = sorted(directory.glob("*.dcm"))
    random.Random(1).shuffle(paths)  # arrival order is random
    fn = ours if which == "ours" else naive
    if which == "ours":  # import cost is paid once per node process, not per series
        import medclf_node.ingest.volume  # noqa: F401, PLC0415
    rss0 = _reset_peak_rss()
    if trace:
        tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    arr = fn(paths)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = tracemalloc.get_traced_memory()[1] if trace else 0
    rss1 = _peak_rss()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,  # user + system CPU: less sensitive to other load on a shared machine
        "traced_peak": float(peak),
        "rss_growth": float(rss1 - rss0),
        "volume_bytes": float(arr.nbytes),
        "checksum": float(arr.sum(dtype=np.float64)),  # order-independent: the two sort differently
    }


def run_child(which: str, directory: Path, trace: bool) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", which, "--dir", str(directory)] + (["--trace"] if trace else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="reuse/create the series here")
    ap.add_argument("--child", choices=["ours", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dir, args.trace)))
        return
    print(describe_machine())
    tmp = None
    directory = args.dir
    if directory is None:
        tmp = tempfile.TemporaryDirectory(prefix="medclf-volbench-")
        directory = Path(tmp.name)
    directory.mkdir(parents=True, exist_ok=True)
    if len(list(directory.glob("*.dcm"))) != args.slices:
        t = time.perf_counter()
        make_series(directory, args.slices, args.size)
        print(f"wrote {args.slices} x {args.size}x{args.size} slices in {time.perf_counter() - t:.1f} s")
    for p in sorted(directory.glob("*.dcm")):  # warm the page cache: we measure assembly, not the disk
        p.read_bytes()
    times: dict[str, list[float]] = {"ours": [], "naive": []}
    cpus: dict[str, list[float]] = {"ours": [], "naive": []}
    mem: dict[str, dict[str, float]] = {}
    checks: dict[str, float] = {}
    for _ in range(args.repeat):
        for which in ("ours", "naive"):
            r = run_child(which, directory, trace=False)
            times[which].append(r["seconds"])
            cpus[which].append(r["cpu_seconds"])
            checks[which] = r["checksum"]
            vol_bytes = r["volume_bytes"]
    for which in ("ours", "naive"):
        mem[which] = run_child(which, directory, trace=True)
    same = bool(np.isclose(checks["ours"], checks["naive"], rtol=1e-9))
    mib = vol_bytes / 2**20
    print(f"series: {args.slices} x {args.size}x{args.size}, float32 volume {mib:.0f} MiB, {args.repeat} runs each")
    print(
        f"{'':8}{'median s':>10}{'min s':>8}{'cpu s':>7}{'traced peak':>14}{'x vol':>7}{'RSS growth':>12}{'x vol':>7}"
    )
    for which in ("ours", "naive"):
        m = mem[which]
        print(
            f"{which:8}{statistics.median(times[which]):10.3f}{min(times[which]):8.3f}"
            f"{statistics.median(cpus[which]):7.3f}"
            f"{m['traced_peak'] / 2**20:11.0f} MiB{m['traced_peak'] / vol_bytes:7.2f}"
            f"{m['rss_growth'] / 2**20:9.0f} MiB{m['rss_growth'] / vol_bytes:7.2f}"
        )
    speed = statistics.median(times["naive"]) / statistics.median(times["ours"])
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"speed-up vs naive (median): {speed:.2f}x; same HU sum: {same}; load average now {load}")
    print("target: ours <= 1.0 s and peak <= 2.5x volume")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
