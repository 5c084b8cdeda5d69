"""Training-data benchmark: phantom synthesis, DICOM writing, and tf.data throughput.

Prints, in one run on this machine:
  * phantom generation time for one 300x512x512 volume, and writing it as a 300-file
    DICOM series (explicit VR), with the plain-pydicom writer as reference in the same run;
  * input-pipeline samples/s for 2.5D (3x256x256) and 3D (2x32x96x96) samples, with and
    without augmentation (flips, rotation, contrast/brightness, elastic), batch 16.

    .venv/bin/python benchmarks/data_pipeline.py [--batches 20] [--skip-volume]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import describe_machine


def _time(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_volume(tmp: Path) -> None:
    import pydicom

    from medclf_node.synthetic.dicom_writer import write_ct_series
    from medclf_node.synthetic.phantoms import make_phantom

    box: dict[str, Any] = {}
    t_gen = _time(lambda: box.setdefault("p", make_phantom(1, shape=(300, 512, 512), spacing=(1.0, 0.7, 0.7))))
    ph = box["p"]
    t_write = _time(lambda: write_ct_series(ph.hu, ph.spacing, tmp / "fast", patient_id=ph.patient_id))
    datasets = [pydicom.dcmread(p) for p in sorted((tmp / "fast").glob("*.dcm"))]

    def plain() -> None:  # reference: pydicom's own save_as of the same 300 datasets
        for i, ds in enumerate(datasets):
            ds.save_as(tmp / f"ref{i}.dcm", enforce_file_format=True)

    t_ref = _time(plain)
    print(f"phantom 300x512x512: {t_gen:.2f} s")
    print(
        f"write 300-slice series: {t_write:.2f} s (pixels from HU included); pydicom save_as of the same: {t_ref:.2f} s"
    )


def bench_pipeline(tmp: Path, batches: int) -> None:
    from medclf_node.preprocess import PreprocessSpec, Window
    from medclf_node.synthetic.phantoms import make_phantom
    from training.data.augment import AugmentConfig
    from training.data.config import ConvertConfig, ConvertSection, SampleSection
    from training.data.convert import convert
    from training.data.pipeline import make_dataset
    from training.data.synth import phantom_case

    lung = Window(center=-600, width=1500)
    specs = {
        "2.5d 256x256x3": PreprocessSpec(
            mode="2.5d", windows=(lung,), input_shape=(256, 256), context_slices=1, target_spacing=(2.5, 1.4, 1.4)
        ),
        "3d 32x96x96x2": PreprocessSpec(
            mode="3d",
            windows=(lung, Window(center=40, width=400)),
            input_shape=(32, 96, 96),
            target_spacing=(2.5, 3.6, 3.6),
        ),
    }
    cases = [phantom_case(make_phantom(s, shape=(96, 256, 256), nodules=s % 2)) for s in range(6)]
    aug = AugmentConfig(flip_axes=(-1,), rotate_deg=10, elastic_alpha=2.0, elastic_sigma=8.0, elastic_prob=1.0)
    for name, spec in specs.items():
        out = tmp / name.split()[0]
        cfg = ConvertConfig(preprocess=spec, convert=ConvertSection(shards=2, samples=SampleSection(window_stride=8)))
        t_conv = _time(lambda: convert(cases, out, cfg, progress=False))  # noqa: B023
        for label, a in (("no augmentation", None), ("augmented", aug)):
            ds, info = make_dataset(out, batch_size=16, training=True, augment_cfg=a, cache=True, seed=0)
            it = iter(ds)
            next(it)  # warm-up: tracing, cache fill
            next(it)
            t0 = time.perf_counter()
            for _ in range(batches):
                next(it)
            dt = time.perf_counter() - t0
            print(
                f"{name}: {info.samples} samples (convert {t_conv:.1f} s); {label}: {batches * 16 / dt:.0f} samples/s"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--skip-volume", action="store_true")
    args = ap.parse_args()
    print(describe_machine(), flush=True)
    np.seterr(all="ignore")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.skip_volume:
            bench_volume(tmp)
        bench_pipeline(tmp, args.batches)


if __name__ == "__main__":
    main()
