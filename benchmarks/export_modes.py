"""Export-mode benchmark: per TFLite mode, file size, LiteRT latency per slice/volume (batch 1,
N threads) and, when a trained model directory is given, its AUC delta to fp32 from the export checks.

    .venv/bin/python benchmarks/export_modes.py [--family cnn2d|efficientnet|multiscale2d|cnn3d_cbam|densenet3d]
        [--input 64] [--depth 32] [--threads 2] [--runs 50] [--model-dir models/NAME] [--json out.json]

Models are untrained (random weights): latency does not depend on the weights.  The modes are
timed round-robin in one process and the load average is printed: on a shared machine only the
ratios from the same run mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--family", default="cnn2d")
    ap.add_argument("--input", type=int, default=64, help="rows = cols of the model input")
    ap.add_argument("--depth", type=int, default=32, help="slices (3D families)")
    ap.add_argument("--base-filters", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--model-dir", type=Path, default=None, help="an exported model dir: report its AUC deltas")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from medclf_node.inference.runtime import LiteRTRuntime
    from medclf_node.preprocess import PreprocessSpec, Window
    from training.export.tflite import convert, supported_tflite_modes
    from training.modeling.config import ModelConfig
    from training.modeling.factory import build_model

    is_3d = args.family in ("cnn3d_cbam", "densenet3d")
    win = (Window(center=-600, width=1500),)
    spec = (PreprocessSpec(mode="3d", windows=win, input_shape=(args.depth, args.input, args.input)) if is_3d
            else PreprocessSpec(mode="2.5d", windows=win, input_shape=(args.input, args.input), context_slices=1))
    model = build_model(ModelConfig(family=args.family, base_filters=args.base_filters), spec)
    rng = np.random.default_rng(0)
    rep = rng.random((16, *model.input_shape[1:]), dtype=np.float32)
    x = rep[:1]
    tmp = Path(tempfile.mkdtemp())
    runtimes = {}
    sizes = {}
    for mode in supported_tflite_modes(model):
        t0 = time.perf_counter()
        path = tmp / f"{mode}.tflite"
        path.write_bytes(convert(model, mode, rep))
        sizes[mode] = path.stat().st_size
        runtimes[mode] = LiteRTRuntime(path, threads=args.threads, batch_mode="loop")
        print(f"converted {mode} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    times: dict[str, list[float]] = {m: [] for m in runtimes}
    for _ in range(args.runs):  # round-robin so load changes hit every mode alike
        for mode, rt in runtimes.items():
            t0 = time.perf_counter()
            rt.predict(x)
            times[mode].append(time.perf_counter() - t0)
    checks = {}
    if args.model_dir is not None:
        checks = json.loads((args.model_dir / "export_checks.json").read_text(encoding="utf-8"))
    unit = "volume" if is_3d else "slice"
    rows = []
    base = float(np.median(times["fp32"]))
    print(f"{args.family} input {model.input_shape[1:]}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"{'mode':8} {'size kB':>9} {'ms/' + unit:>10} {'vs fp32':>8} {'AUC delta':>10}")
    for mode, ts in times.items():
        med = float(np.median(ts))
        delta = checks.get(mode, {}).get("auc_delta_vs_fp32_keras")
        rows.append({"mode": mode, "size_bytes": sizes[mode], "median_ms": med * 1e3, "speedup_vs_fp32": base / med,
                     "auc_delta_vs_fp32": delta})
        print(f"{mode:8} {sizes[mode] / 1024:9.1f} {med * 1e3:10.3f} {base / med:7.2f}x "
              f"{'' if delta is None else f'{delta:+.4f}':>10}")
    if args.json:
        args.json.write_text(json.dumps({"family": args.family, "input": list(model.input_shape[1:]),
                                         "threads": args.threads, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
