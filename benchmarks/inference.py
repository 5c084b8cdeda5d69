"""Inference benchmark: a 300-slice 512x512 series through a tiny-ish 2.5D model, in one run:
LiteRT int8 vs LiteRT fp32 vs TensorFlow SavedModel, plus LiteRT batching (loop vs resized batch).

    .venv/bin/python benchmarks/inference.py [--slices 300] [--size 512] [--input 256] [--threads 2]
                                             [--width 16] [--repeat 2] [--json out.json]

The model is untrained (random weights: only speed is measured here) with the architecture of
the test models, scaled: 2.5D, lung window, +-1 neighbour slice, in-plane resampled so the
512x512 field of view becomes ``--input`` pixels.  Reported per runtime: load + warm-up,
``predict_series`` seconds per series (preprocessing + inference + occlusion heat map), the
same without heat map, and runtime-only seconds on the already preprocessed inputs.  All
configurations are timed round-robin, best of ``--repeat``, and the load average is printed:
on a shared machine only ratios from the same run mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from machine import describe_machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fixtures_models import LUNG_WINDOW, NODULE, export_artifacts, phantom_volume  # noqa: E402

from medclf_node.domain import SliceRef, Volume  # noqa: E402
from medclf_node.inference.manifest import (  # noqa: E402
    Aggregation,
    InputSpec,
    Labels,
    Manifest,
    Provenance,
    write_manifest,
)
from medclf_node.inference.predict import predict_series  # noqa: E402
from medclf_node.inference.registry import load_model  # noqa: E402
from medclf_node.inference.runtime import LiteRTRuntime  # noqa: E402
from medclf_node.preprocess import PreprocessSpec, slices_2d  # noqa: E402


def best_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_volume(slices: int, size: int, spacing: tuple[float, float, float]) -> Volume:
    """A phantom series built slice-wise (bounded memory) with a nodule in the middle."""
    one = phantom_volume((1, size, size), spacing, None, seed=0, noise_hu=0.0)[0]
    rng = np.random.default_rng(0)
    arr = np.empty((slices, size, size), np.float32)
    for k in range(slices):
        arr[k] = one + rng.standard_normal((size, size), dtype=np.float32) * 20.0
    c = slices // 2
    yy, xx = np.ogrid[:size, :size]
    disk = (yy - size * 0.45) ** 2 + (xx - size * 0.3) ** 2 <= (12.0 / spacing[1]) ** 2
    for k in range(max(0, c - 5), min(slices, c + 6)):
        arr[k][disk] = 30.0
    refs = tuple(SliceRef("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{k}") for k in range(slices))
    return Volume(arr, spacing, np.eye(4), refs, "1.2.3", "1.2.3.4")


def build_model(dest: Path, spec: PreprocessSpec, rep: np.ndarray, width: int = 16) -> Path:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    s = spec.input_shape[0]
    model = keras.Sequential([
        keras.layers.Input((s, s, 3)),
        keras.layers.Conv2D(width, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(2 * width, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(2 * width, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(4 * width, 3, padding="same", activation="relu"),
        keras.layers.GlobalMaxPooling2D(),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    d = dest / "bench-2p5d"
    d.mkdir(parents=True)
    arts = export_artifacts(model, d, ["int8", "fp32", "saved_model"], rep)
    write_manifest(Manifest(
        name="bench-2p5d", version="0", labels=Labels(finding=NODULE),
        input=InputSpec(shape=(s, s, 3), layout="NHWC", dtype="int8"), preprocessing=spec,
        aggregation=Aggregation(method="max"), artifacts=tuple(arts), default_artifact="model_int8.tflite",
        provenance=Provenance(dataset="none: untrained, benchmark only"),
    ), d)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--input", type=int, default=256, help="model input rows/cols")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--width", type=int, default=16, help="filters of the first conv (then 2x, 2x, 4x)")
    ap.add_argument("--repeat", type=int, default=2, help="best of N")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    print(describe_machine(), flush=True)

    spacing = (1.0, 0.7, 0.7)
    fov = args.size * spacing[1]
    spec = PreprocessSpec(mode="2.5d", windows=(LUNG_WINDOW,), input_shape=(args.input, args.input),
                          target_spacing=(spacing[0], fov / args.input, fov / args.input), context_slices=1)
    vol = make_volume(args.slices, args.size, spacing)
    t0 = time.perf_counter()
    x = slices_2d(vol.array, vol.spacing, spec)
    prep_s = time.perf_counter() - t0
    results: dict[str, object] = {
        "load_average_1min": round(os.getloadavg()[0], 2),
        "slices": args.slices, "size": args.size, "input": args.input, "threads": args.threads,
        "cpu_count": os.cpu_count(), "preprocess_all_slices_s": round(prep_s, 3),
    }
    print(f"series {args.slices}x{args.size}x{args.size}, model input {args.input}x{args.input}x3, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"preprocessing all slices: {prep_s:.2f} s")

    with tempfile.TemporaryDirectory() as tmp:
        mdir = build_model(Path(tmp), spec, x[:: max(1, len(x) // 64)], width=args.width)
        # LiteRT batching: one invoke per slice vs an input tensor resized to a batch of B.  The
        # configurations are timed round-robin (best of --repeat) so a noisy machine hurts all alike.
        runtimes: dict[str, LiteRTRuntime] = {}
        for art in ("model_int8.tflite", "model_fp32.tflite"):
            for mode, b in (("loop", 1), ("resize", 4), ("resize", 8), ("resize", 16), ("resize", 32)):
                key = f"{art.split('_')[1].split('.')[0]} {mode}{'' if mode == 'loop' else f' b={b}'}"
                runtimes[key] = LiteRTRuntime(mdir / art, threads=args.threads, batch_size=b,
                                              batch_mode=mode)  # type: ignore[arg-type]
        batching = {k: float("inf") for k in runtimes}
        for _ in range(args.repeat):
            for key, rt in runtimes.items():
                batching[key] = min(batching[key], round(best_of(partial(rt.predict, x), 1), 3))
        for key, secs in batching.items():
            print(f"  LiteRT {key:<18} runtime only: {secs:.2f} s")
        results["litert_batching_runtime_only_s"] = batching

        per: dict[str, dict[str, float]] = {}
        models = {}
        for label, art in (("litert_int8", "model_int8.tflite"), ("litert_fp32", "model_fp32.tflite"),
                           ("tf_savedmodel", "saved_model")):
            t0 = time.perf_counter()
            models[label] = load_model(mdir, threads=args.threads, artifact=art)  # TF is imported only here
            per[label] = {"load_warmup_s": round(time.perf_counter() - t0, 3), "series_s": float("inf"),
                          "series_no_heatmap_s": float("inf"), "runtime_only_s": float("inf")}
        for _ in range(args.repeat):  # round-robin, best of --repeat
            for label, m in models.items():
                for key, fn in (("runtime_only_s", partial(m.runtime.predict, x)),
                                ("series_s", partial(predict_series, m, vol)),
                                ("series_no_heatmap_s", partial(predict_series, m, vol, heatmap=False))):
                    per[label][key] = min(per[label][key], round(best_of(fn, 1), 3))
        for label, r in per.items():
            print(f"  {label:<14} load+warm-up {r['load_warmup_s']:6.2f} s | series {r['series_s']:6.2f} s | "
                  f"no heat map {r['series_no_heatmap_s']:6.2f} s | runtime only {r['runtime_only_s']:6.2f} s")
        results["per_runtime"] = per
        base = per["tf_savedmodel"]["series_s"]
        for label in ("litert_int8", "litert_fp32"):
            print(f"  {label}: {base / per[label]['series_s']:.2f}x faster than TF SavedModel per series")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
