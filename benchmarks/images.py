"""Images per second through the node for a 2D image model, int8 vs fp32, on 2 threads.

A node (`medclf-node serve`, subprocess, ``models.threads = 2``) serves one image model; DCMTK storescu
(TCP_NODELAY=1) sends N fundus-like RGB photographs as JPEG baseline YBR_FULL_422 OP instances, two per
series (a right and a left eye), one association per series; a pynetdicom SCP stands in for the PACS.
The figure is images / (first send -> last SR at the destination), once per artifact precision found in
the model's manifest (int8 and fp32 .tflite), each on a fresh node.  Reference in the same run: the
model alone in this process (``predict_images`` on the same decoded images, same threads).

    .venv/bin/python benchmarks/images.py [--model-dir models/dr-grade-int8] [--images 32] [--size 1024]

The default model directory is ``models/dr-grade-int8`` when it is shipped; any image-kind model works
(e.g. the tests' ``test-dr-grade`` from tests/fixtures_image_models.py, built with ``--build-test-model``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
from machine import describe_machine
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from medclf_node.config import LimitsSection
from medclf_node.inference.manifest import load_manifest, write_manifest
from medclf_node.inference.predict_image import predict_images
from medclf_node.inference.registry import load_model
from medclf_node.ingest.image2d import read_image
from medclf_node.net.receiver import StoringReceiver

ROOT = Path(__file__).resolve().parent.parent
OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


def photograph(size: int, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """A fundus-like picture: dark surround, orange disc with a bright optic disc and some red dots.
    (The recipes' synthetic fundus generator is used instead when it is installed.)"""
    try:  # the synthetic fundus generator of the training recipes, when present
        from medclf_node.synthetic import fundus  # type: ignore[attr-defined]

        return np.asarray(fundus.make_fundus(int(rng.integers(1 << 30)), size=size).image, dtype=np.uint8)
    except ImportError:
        pass
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    r2 = yy**2 + xx**2
    img = np.zeros((size, size, 3), np.float32)
    inside = r2 < 0.21
    img[inside] = (0.75, 0.35, 0.15)
    disc = (yy + 0.05) ** 2 + (xx - 0.2) ** 2 < 0.004
    img[disc] = (1.0, 0.9, 0.6)
    for _ in range(int(rng.integers(0, 30))):
        cy, cx = rng.uniform(-0.3, 0.3, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 0.0003] = (0.45, 0.05, 0.05)
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def write_op(path: Path, rgb: npt.NDArray[np.uint8], study: str, series: str, laterality: str, number: int) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=90, subsampling=1)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = OP_8BIT
    ds.SOPClassUID = OP_8BIT
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.BodyPartExamined, ds.ImageLaterality = "OP", "EYE", laterality
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime = "Bench^Fundus", "BENCH", "20261202", "120000"
    ds.InstanceNumber, ds.SeriesNumber = number, 1
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def model_with_default(src: Path, artifact: str, dest: Path) -> str:
    """A copy of the model directory whose default artifact is ``artifact`` (copied: the node refuses
    artifacts that resolve outside their model directory, symlinks included)."""
    man = load_manifest(src)
    art = man.artifact(artifact)
    dest.mkdir(parents=True)
    for a in man.artifacts:
        (shutil.copytree if (src / a.path).is_dir() else shutil.copy2)(src / a.path, dest / a.path)
    write_manifest(man.model_copy(update={"default_artifact": art.path, "input": man.input.model_copy(
        update={"dtype": art.input_dtype})}), dest)
    return man.name


def start_node(work: Path, models: Path, model: str, pacs_port: int) -> tuple[subprocess.Popen[bytes], int]:
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "node.toml"
    cfg.write_text(f"""
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
threads = 2
[[rules]]
name = "fundus"
models = ["{model}"]
modality = ["OP"]
[metrics]
enabled = false
[retention]
min_free_disk_mb = 0
""")
    log = (work / "node.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "medclf_node.cli", "serve", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT)
    port_file = work / "data" / "node.port"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text())
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError((work / "node.log").read_text())


def through_node(work: Path, models: Path, model: str, series: list[list[Path]]) -> float:
    """Seconds from the first send to the last SR at the destination."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    receiver = StoringReceiver("PACS", 0, work / "pacs")
    proc, port = start_node(work / "node", models, model, receiver.port)
    try:
        t0 = time.perf_counter()
        for paths in series:
            send = subprocess.run(["storescu", "-xy", "-aet", "SCANNER", "-aec", "MEDCLF", "127.0.0.1", str(port),
                                   *map(str, paths)], env=env, capture_output=True, timeout=600)
            if send.returncode != 0:
                raise RuntimeError(send.stderr.decode()[-500:])
        if not receiver.wait_for(lambda r: len(r.of_modality("SR")) >= len(series), 600):
            raise RuntimeError("not every SR arrived:\n" + (work / "node" / "node.log").read_text()[-2000:])
        return time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        receiver.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=ROOT / "models" / "dr-grade-int8")
    ap.add_argument("--images", type=int, default=32, help="images sent (two per series)")
    ap.add_argument("--size", type=int, default=1024, help="photograph rows = columns")
    ap.add_argument("--build-test-model", action="store_true",
                    help="use the tests' tiny test-dr-grade model (built with TensorFlow, cached under .cache)")
    args = ap.parse_args()
    print(describe_machine(), flush=True)
    model_dir = args.model_dir
    if args.build_test_model:
        sys.path.insert(0, str(ROOT))
        from tests.fixtures_image_models import cached_image_models

        model_dir = cached_image_models(ROOT / ".cache" / "bench-image-models") / "test-dr-grade"
    if not (model_dir / "manifest.json").is_file():
        print(f"no image model at {model_dir}; pass --model-dir or --build-test-model", file=sys.stderr)
        return 2
    man = load_manifest(model_dir)
    if man.input.kind != "image":
        print(f"{man.name} is a {man.input.kind} model, not an image model", file=sys.stderr)
        return 2
    artifacts = {a.precision: a.path for a in man.artifacts if a.format == "tflite" and a.precision in ("int8", "fp32")}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="medclf-images-") as tmp:
        work = Path(tmp)
        series: list[list[Path]] = []
        for s in range(max(1, args.images // 2)):
            folder = work / "in" / f"s{s}"
            folder.mkdir(parents=True)
            study, uid = generate_uid(), generate_uid()
            for n, side in enumerate("RL", start=1):
                write_op(folder / f"{side}.dcm", photograph(args.size, rng), study, uid, side, n)
            series.append(sorted(folder.iterdir()))
        n_images = 2 * len(series)
        decoded = [read_image(p, LimitsSection()) for p in series[0]]
        print(f"model {man.name} {man.version}, input {list(man.input.shape)}; {n_images} images of "
              f"{args.size} x {args.size} (JPEG YBR_FULL_422), {len(series)} series of 2")
        rates: dict[str, float] = {}
        for precision, path in sorted(artifacts.items()):
            models = work / f"models-{precision}"
            name = model_with_default(model_dir, path, models / man.name)
            loaded = load_model(models / man.name, threads=2)
            predict_images(loaded, decoded)
            t0 = time.perf_counter()
            for _ in range(5):
                predict_images(loaded, decoded)
            alone = (time.perf_counter() - t0) / (5 * len(decoded))
            secs = through_node(work / f"run-{precision}", models, name, series)
            rates[precision] = n_images / secs
            print(f"{precision}: {rates[precision]:.1f} images/s through the node ({secs:.1f} s); model alone "
                  f"in-process (preprocess + inference + heat map when positive) {1 / alone:.1f} images/s; "
                  f"node / alone {rates[precision] * alone:.2f}", flush=True)
            shutil.rmtree(work / f"run-{precision}", ignore_errors=True)
        if "int8" in rates and "fp32" in rates:
            print(f"int8 / fp32 through the node: {rates['int8'] / rates['fp32']:.2f}x")
        print(json.dumps({"images_per_second": {k: round(v, 2) for k, v in rates.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
