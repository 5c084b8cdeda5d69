"""Export-mode benchmark: per TFLite mode, file size, LiteRT latency per slice/volume (batch 1, N threads)
and the AUC delta to the fp32 Keras model on a synthetic test set.

    .venv/bin/python benchmarks/export_modes.py [--family cnn2d|efficientnet|multiscale2d|cnn3d_cbam|densenet3d]
        [--input 64] [--depth 32] [--threads 2] [--runs 50] [--train-epochs 2] [--series 48] [--json out.json]

The model is trained for ``--train-epochs`` on a synthetic set (noisy CT-like slices, positives
carry a faint blob; made with the node's own ``slices_2d``/``volume_3d``) and exported with the
production path (``training.export.bundle.export_model``), so the AUC deltas are the ones the export
checks record; ``--train-epochs 0`` exports the untrained model (latency does not depend on the
weights, the AUC delta then only says how far quantisation moves a random ranking).

Two latencies per mode, timed round-robin in one process (on a shared machine only ratios from the
same run mean anything; the load average is printed):

- ``invoke``: ``Interpreter.invoke()`` alone on a pre-quantised input: what the kernels cost;
- ``predict``: ``LiteRTRuntime.predict`` on one float32 slice: what the node pays, (de)quantisation
  of int8 inputs/outputs included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import describe_machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IS_3D = ("cnn3d_cbam", "densenet3d")


def synthetic_split(spec: Any, n_series: int, seed: int, per_series: int = 4) -> Any:
    """Half of the series carry a faint soft blob (a nodule-like lesion) in low-contrast noise.

    Built in HU and preprocessed by the node's own functions, so the inputs are what the node feeds.
    The contrast is kept low so a briefly trained model is good but not perfect (an AUC of 1.0 would
    hide any quantisation damage).
    """
    from medclf_node.preprocess import slices_2d, volume_3d
    from training.train import Split

    rng = np.random.default_rng(seed)
    xs, ys, ids = [], [], []
    for i in range(n_series):
        label = i % 2
        if spec.mode == "3d":
            depth, rows, cols = spec.input_shape
        else:
            (rows, cols), depth = spec.input_shape, per_series
        hu = rng.normal(-800, 120, size=(depth, rows, cols)).astype(np.float32)
        if label:
            zz, yy, xx = np.meshgrid(np.arange(depth), np.arange(rows), np.arange(cols), indexing="ij")
            r = max(2.0, min(rows, cols) / 10) * rng.uniform(0.7, 1.3)
            cy, cx = rng.uniform(r, rows - r), rng.uniform(r, cols - r)
            cz = rng.uniform(0, depth - 1)
            d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2 + ((zz - cz) / max(1.0, depth / 3)) ** 2
            hu += (120 * np.exp(-d2)).astype(np.float32)
        if spec.mode == "3d":
            xs.append(volume_3d(hu, (1.0, 1.0, 1.0), spec)[None])
            ys.append(label)
        else:
            xs.append(slices_2d(hu, (1.0, 1.0, 1.0), spec))
            ys += [label] * per_series
        ids += [f"{seed}-{i}"] * (1 if spec.mode == "3d" else per_series)
    return Split.from_arrays(np.concatenate(xs), np.array(ys), np.array(ids))


def recalibrate_batchnorm(model: Any, split: Any, n: int) -> None:
    """Set every BatchNorm's moving mean/variance to the statistics of ``n`` training samples.

    A fit of a few dozen steps leaves the moving averages (momentum 0.99) near their initial values,
    and a model like EfficientNet then scores every input alike in inference mode (AUC 0.5): useless
    for measuring what quantisation does to the ranking.  One forward pass in training mode with
    momentum 0 (AdaBN-style recalibration) makes inference behave like the trained network.
    """
    from training.tfenv import keras

    x = np.stack([a for a, _ in split.dataset.take(n).as_numpy_iterator()])
    bns = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
    saved = [la.momentum for la in bns]
    for la in bns:
        la.momentum = 0.0
    model(x, training=True)
    for la, m in zip(bns, saved, strict=True):
        la.momentum = m


def time_modes(model_dir: Path, names: dict[str, str], threads: int, runs: int, x: np.ndarray) -> dict[str, Any]:
    """Median ``invoke`` and ``predict`` latency (s) per mode, interleaved so load changes hit all alike."""
    from ai_edge_litert.interpreter import Interpreter

    from medclf_node.inference.runtime import LiteRTRuntime

    runtimes = {m: LiteRTRuntime(model_dir / n, threads=threads, batch_mode="loop") for m, n in names.items()}
    interps = {}
    for mode, name in names.items():
        it = Interpreter(model_path=str(model_dir / name), num_threads=threads)
        inp = it.get_input_details()[0]
        it.resize_tensor_input(inp["index"], [1, *x.shape[1:]], strict=False)
        it.allocate_tensors()
        it.set_tensor(inp["index"], runtimes[mode]._quantise(x))  # the runtime's own quantisation
        for _ in range(3):
            it.invoke()
        interps[mode] = it
    invoke: dict[str, list[float]] = {m: [] for m in names}
    predict: dict[str, list[float]] = {m: [] for m in names}
    for _ in range(runs):
        for mode in names:
            t0 = time.perf_counter()
            interps[mode].invoke()
            t1 = time.perf_counter()
            runtimes[mode].predict(x)
            invoke[mode].append(t1 - t0)
            predict[mode].append(time.perf_counter() - t1)
    return {m: (float(np.median(invoke[m])), float(np.median(predict[m]))) for m in names}


def report_model_dir(model_dir: Path, threads: int, runs: int) -> int:
    """Latency of a real export's .tflite artifacts next to the AUC deltas its export checks recorded."""
    from training.export.bundle import ARTIFACT_NAMES

    checks = json.loads((model_dir / "export_checks.json").read_text(encoding="utf-8"))
    manifest = json.loads((model_dir / "manifest.json").read_text(encoding="utf-8"))
    names = {m: ARTIFACT_NAMES[m] for m in checks if (model_dir / ARTIFACT_NAMES[m]).is_file()}
    shape = tuple(manifest["input"]["shape"])
    x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    timings = time_modes(model_dir, names, threads, runs, x)
    base = timings["fp32"][0] if "fp32" in timings else float("nan")
    print(
        f"{model_dir} input {shape}, {threads} threads, {runs} runs, load average {os.getloadavg()[0]:.2f}; "
        f"fp32 Keras holdout AUC {manifest['metrics'].get('holdout_auc_fp32_keras', float('nan')):.4f}"
    )
    print(f"{'mode':8} {'size kB':>9} {'invoke ms':>10} {'predict ms':>11} {'vs fp32':>8} {'AUC delta':>10}")
    for mode, (inv, pred) in timings.items():
        c = checks[mode]
        print(
            f"{mode:8} {(model_dir / names[mode]).stat().st_size / 1024:9.1f} {inv * 1e3:10.3f} "
            f"{pred * 1e3:11.3f} {base / inv:7.2f}x {c['auc_delta_vs_fp32_keras']:+10.4f}"
        )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--family", default="cnn2d")
    ap.add_argument("--input", type=int, default=64, help="rows = cols of the model input")
    ap.add_argument("--depth", type=int, default=32, help="slices (3D families)")
    ap.add_argument("--base-filters", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--train-epochs", type=int, default=2, help="fit on the synthetic set first (0: untrained)")
    ap.add_argument("--series", type=int, default=48, help="synthetic training series (test: half as many)")
    ap.add_argument(
        "--recalibrate-bn",
        type=int,
        default=64,
        metavar="N",
        help="after the short fit, set BatchNorm moving statistics from N training samples (0: off)",
    )
    ap.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="time the .tflite artifacts of an exported model dir instead; AUC deltas from its export_checks.json",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    print(describe_machine(), flush=True)
    if args.model_dir is not None:
        return report_model_dir(args.model_dir, args.threads, args.runs)

    from medclf_node.preprocess import PreprocessSpec, Window
    from training.export.bundle import ARTIFACT_NAMES, export_model
    from training.export.tflite import supported_tflite_modes
    from training.modeling.factory import build_model
    from training.train import fit, load_trained_model
    from training.train_config import parse_train_config

    is_3d = args.family in IS_3D
    win = (Window(center=-600, width=1500),)
    spec = (
        PreprocessSpec(mode="3d", windows=win, input_shape=(args.depth, args.input, args.input))
        if is_3d
        else PreprocessSpec(mode="2.5d", windows=win, input_shape=(args.input, args.input), context_slices=1)
    )
    tmp = Path(tempfile.mkdtemp(prefix="export_modes-"))
    cfg = parse_train_config(
        {
            "name": f"bench-{args.family}",
            "output_dir": str(tmp),
            "preprocess": spec.model_dump(),
            "model": {"family": args.family, "base_filters": args.base_filters},
            "fit": {
                "epochs": max(1, args.train_epochs),
                "batch_size": 16,
                "learning_rate": 2e-3,
                "precision": "float32",
                "early_stopping_patience": max(1, args.train_epochs),
            },
            "evaluate": {"aggregation": {"method": "topk_mean", "k": 2}},
            "export": {"modes": ["fp32"], "default": "fp32", "representative_samples": 64, "parity_samples": 32},
        }
    )
    n = max(4, args.series)
    train, val, test = synthetic_split(spec, n, 1), synthetic_split(spec, n // 4, 2), synthetic_split(spec, n // 2, 3)
    t0 = time.perf_counter()
    if args.train_epochs > 0:
        fit(cfg, train, val, cfg.run_dir)
        model = load_trained_model(cfg.run_dir)
        if args.recalibrate_bn:
            recalibrate_batchnorm(model, train, args.recalibrate_bn)
    else:
        model = build_model(cfg.model, cfg.preprocess)
    t_fit = time.perf_counter() - t0
    modes = supported_tflite_modes(model)
    t0 = time.perf_counter()
    result = export_model(
        cfg, model, tmp / "model", holdout=test, train=train, threshold=0.5, modes=modes, default="fp32"
    )
    print(f"fit {t_fit:.0f} s, export+checks {time.perf_counter() - t0:.0f} s ({tmp})", file=sys.stderr)
    x = np.stack([a for a, _ in test.dataset.take(1).as_numpy_iterator()]).astype(np.float32)
    timings = time_modes(result.model_dir, {m: ARTIFACT_NAMES[m] for m in modes}, args.threads, args.runs, x)

    unit = "volume" if is_3d else "slice"
    fp32_auc = result.manifest.metrics["holdout_auc_fp32_keras"]
    base = timings["fp32"][0]
    print(
        f"{args.family} input {model.input_shape[1:]}, {args.threads} threads, {args.runs} runs, "
        f"load average {os.getloadavg()[0]:.2f}; synthetic test set: {len(test)} {unit}s of {n // 2} series, "
        f"fp32 Keras AUC {fp32_auc:.4f} ({args.train_epochs} training epochs)"
    )
    print(
        f"{'mode':8} {'size kB':>9} {'invoke ms':>10} {'predict ms':>11} {'vs fp32':>8} {'AUC delta':>10} "
        f"{'max|dp|':>8}"
    )
    rows = []
    for mode in modes:
        inv, pred = timings[mode]
        c = result.checks[mode]
        rows.append(
            {
                "mode": mode,
                "size_bytes": c["size_bytes"],
                "invoke_ms": inv * 1e3,
                "predict_ms": pred * 1e3,
                "speedup_vs_fp32": base / inv,
                "auc_delta_vs_fp32": c["auc_delta_vs_fp32_keras"],
                "max_abs_diff_vs_keras": c["max_abs_diff_vs_keras"],
            }
        )
        print(
            f"{mode:8} {c['size_bytes'] / 1024:9.1f} {inv * 1e3:10.3f} {pred * 1e3:11.3f} {base / inv:7.2f}x "
            f"{c['auc_delta_vs_fp32_keras']:+10.4f} {c['max_abs_diff_vs_keras']:8.4f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "family": args.family,
                    "input": list(model.input_shape[1:]),
                    "threads": args.threads,
                    "runs": args.runs,
                    "load_average": os.getloadavg()[0],
                    "fp32_keras_auc": fp32_auc,
                    "train_epochs": args.train_epochs,
                    "rows": rows,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
