"""DR grading through the node's image path: images/s of models/dr-grade-int8, int8 vs fp32, same run.

    .venv/bin/python benchmarks/dr_images.py [--model models/dr-grade-int8] [--size 512] [--images 64]
                                             [--threads 2] [--repeat 3] [--dicom]

Each configuration runs ``predict_images`` (preprocessing: box-average resize to the model input,
then LiteRT) on the same ``--images`` synthetic photographs of ``--size`` pixels, round-robin, best
of ``--repeat``; ``--dicom`` also times reading them from OP JPEG (YBR_FULL_422) files with the node's
image reader.  Only the ratio int8/fp32 from one run means anything on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe_machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from medclf_node.config import LimitsSection  # noqa: E402
from medclf_node.domain import Image2D, SliceRef  # noqa: E402
from medclf_node.inference.predict_image import predict_images  # noqa: E402
from medclf_node.inference.registry import load_model  # noqa: E402
from medclf_node.ingest.image2d import read_image  # noqa: E402
from medclf_node.synthetic.fundus import make_fundus  # noqa: E402
from medclf_node.synthetic.fundus_dicom import write_fundus  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "dr-grade-int8")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dicom", action="store_true")
    a = p.parse_args()
    print(describe_machine())
    print(f"load average {os.getloadavg()}")
    fs = [make_fundus(1_500_000 + k, size=a.size, target_grade=k % 5) for k in range(a.images)]
    imgs = [Image2D(f.image.astype(np.float32) / 255.0, SliceRef("1.2.840.10008.5.1.4.1.1.77.1.5.1", f"2.25.{k}"),
                    "RGB", None) for k, f in enumerate(fs)]
    models = {art: load_model(a.model, threads=a.threads, artifact=art)
              for art in ("model_int8.tflite", "model_fp32.tflite")}
    best = dict.fromkeys(models, float("inf"))
    for _ in range(a.repeat):
        for art, m in models.items():
            t0 = time.perf_counter()
            for img in imgs:  # one image per call, as the node scores a study's images
                predict_images(m, [img], heatmap=False)
            best[art] = min(best[art], time.perf_counter() - t0)
    for art, secs in best.items():
        print(f"{art}: {a.images / secs:.1f} images/s ({1000 * secs / a.images:.2f} ms/image), {a.size}x{a.size} "
              f"source, {a.threads} threads")
    print(f"int8 / fp32 throughput: {best['model_fp32.tflite'] / best['model_int8.tflite']:.2f}x")
    from medclf_node.preprocess import image_input

    x = np.stack([image_input(img.pixels, models["model_int8.tflite"].manifest.preprocessing) for img in imgs])
    only = dict.fromkeys(models, float("inf"))
    for _ in range(a.repeat):
        for art, m in models.items():
            t0 = time.perf_counter()
            for k in range(0, len(x), 16):
                m.runtime.predict(x[k : k + 16])
            only[art] = min(only[art], time.perf_counter() - t0)
    for art, secs in only.items():
        print(f"{art} model only (batches of 16 preprocessed inputs): {1000 * secs / len(x):.2f} ms/image")
    print(f"model-only int8 / fp32 speed: {only['model_fp32.tflite'] / only['model_int8.tflite']:.2f}x")
    if a.dicom:
        with tempfile.TemporaryDirectory() as tmp:
            paths = [write_fundus(f.image, Path(tmp) / f"{k}.dcm", laterality=f.laterality, patient_id=f.patient_id)
                     for k, f in enumerate(fs)]
            t0 = time.perf_counter()
            read = [read_image(path, LimitsSection()) for path in paths]
            dt = time.perf_counter() - t0
            print(f"node image reader, OP JPEG YBR_FULL_422: {len(read) / dt:.1f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
