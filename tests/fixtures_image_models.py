"""Tiny image models (schema 2, ``input.kind = "image"``) with hand-set weights, and OP test images.

No training: each model is global average pooling of the RGB input followed by one Dense layer
whose weights make its output a known function of the image's mean colour, so the tests know
what every image must score:

* ``test-dr-grade`` (multiclass, ordinal, 5 grades): logit_k = 80 k r - 10 k^2 on the mean red
  r, so the grade is about round(4 r) (r = 0.5 -> grade 2).  fp32 and int8 .tflite.
* ``test-findings`` (multilabel, "Hemorrhage" = A, "Retinal exudate" = B):
  P(A) = sigmoid(20 (r - 0.5)), P(B) = sigmoid(20 (b - 0.5)) on mean red / blue; thresholds 0.5 and 0.7.  fp32 .tflite.
* ``test-binary-image`` (binary, grey input): P = sigmoid(20 (g - 0.5)) on the mean grey.

``op_image(path, rgb, ...)`` writes an Ophthalmic Photography 8 Bit instance whose pixels are
``rgb``, JPEG baseline YBR_FULL_422 (Pillow encodes, 4:2:2), as a fundus camera would send.
The models are built in a subprocess (TensorFlow) and cached like ``fixtures_models``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from medclf_node.inference.manifest import (
    ClassSpec,
    CodeSpec,
    FindingSpec,
    InputSpec,
    Labels,
    Manifest,
    Provenance,
    write_manifest,
)
from medclf_node.preprocess import PreprocessSpec

F32 = npt.NDArray[np.float32]
OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
SIZE = 32
DR = CodeSpec(value="4855003", scheme="SCT", meaning="Diabetic retinopathy")
GRADES = [
    CodeSpec(value="260413007", scheme="SCT", meaning="None"),
    CodeSpec(value="312903003", scheme="SCT", meaning="Mild nonproliferative diabetic retinopathy"),
    CodeSpec(value="312904009", scheme="SCT", meaning="Moderate nonproliferative diabetic retinopathy"),
    CodeSpec(value="312905005", scheme="SCT", meaning="Severe nonproliferative diabetic retinopathy"),
    CodeSpec(value="59276001", scheme="SCT", meaning="Proliferative diabetic retinopathy"),
]
# illustrative SCT codes (dciodvfy warns about private schemes); the tiny models only see colour
FINDING_A = CodeSpec(value="50960005", scheme="SCT", meaning="Hemorrhage")
FINDING_B = CodeSpec(value="274743002", scheme="SCT", meaning="Retinal exudate")
_BUILD_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def rgb_spec(size: int = SIZE) -> PreprocessSpec:
    return PreprocessSpec(mode="image", input_shape=(size, size), color="rgb", normalization="unit")


def manifests(artifacts: dict[str, list[Any]]) -> dict[str, Manifest]:
    """The manifests of the tiny models (artifacts: name -> manifest Artifacts)."""
    common: dict[str, Any] = dict(
        schema_version=2, version="0.0.1-test", training_package_version="tests",
        provenance=Provenance(dataset="hand-set weights (tests/fixtures_image_models.py); NOT clinical"),
    )
    return {
        "test-dr-grade": Manifest(
            name="test-dr-grade", task="multiclass", ordinal=True, labels=Labels(finding=DR),
            classes=tuple(ClassSpec(code=c) for c in GRADES), positive_classes=(2, 3, 4),
            input=InputSpec(kind="image", shape=(SIZE, SIZE, 3), layout="NHWC"), preprocessing=rgb_spec(),
            artifacts=tuple(artifacts["test-dr-grade"]), default_artifact="model_fp32.tflite", **common),
        "test-findings": Manifest(
            name="test-findings", task="multilabel",
            labels=Labels(finding=CodeSpec(value="404684003", scheme="SCT", meaning="Clinical finding")),
            findings=(FindingSpec(code=FINDING_A, threshold=0.5), FindingSpec(code=FINDING_B, threshold=0.7)),
            input=InputSpec(kind="image", shape=(SIZE, SIZE, 3), layout="NHWC"), preprocessing=rgb_spec(),
            artifacts=tuple(artifacts["test-findings"]), default_artifact="model_fp32.tflite", **common),
        "test-binary-image": Manifest(
            name="test-binary-image", task="binary", threshold=0.5,
            labels=Labels(finding=CodeSpec(value="36222008", scheme="SCT", meaning="Opacity")),
            input=InputSpec(kind="image", shape=(SIZE, SIZE, 1), layout="NHWC"),
            preprocessing=PreprocessSpec(mode="image", input_shape=(SIZE, SIZE), color="grey", normalization="unit"),
            artifacts=tuple(artifacts["test-binary-image"]), default_artifact="model_fp32.tflite", **common),
    }


def _build(dest: Path) -> None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tf_keras as keras

    from tests.fixtures_models import export_artifacts

    def dense_model(channels: int, kernel: F32, bias: F32, activation: str) -> Any:
        m = keras.Sequential([
            keras.layers.Input((SIZE, SIZE, channels)),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(kernel.shape[1], activation=activation),
        ])
        m.layers[-1].set_weights([kernel, bias])
        return m

    rng = np.random.default_rng(0)
    # calibration images of every mean colour (uniform noise alone would average to 0.5 everywhere)
    rep3 = np.clip(rng.random((64, 1, 1, 3), dtype=np.float32)
                   + rng.normal(0, 0.05, (64, SIZE, SIZE, 3)).astype(np.float32), 0, 1)
    rep1 = np.ascontiguousarray(rep3[..., :1])
    k = np.arange(5, dtype=np.float32)
    grade_kernel = np.zeros((3, 5), np.float32)
    grade_kernel[0] = 80.0 * k
    models = {
        "test-dr-grade": (dense_model(3, grade_kernel, -10.0 * k**2, "softmax"), ["fp32", "int8"], rep3),
        "test-findings": (dense_model(3, np.array([[20, 0], [0, 0], [0, 20]], np.float32),
                                      np.array([-10, -10], np.float32), "sigmoid"), ["fp32"], rep3),
        "test-binary-image": (dense_model(1, np.array([[20]], np.float32), np.array([-10], np.float32),
                                          "sigmoid"), ["fp32"], rep1),
    }
    arts: dict[str, list[Any]] = {}
    for name, (model, kinds, rep) in models.items():
        (dest / name).mkdir(parents=True)
        arts[name] = export_artifacts(model, dest / name, kinds, rep)
    for name, man in manifests(arts).items():
        write_manifest(man, dest / name)
    (dest / "build.json").write_text(json.dumps(sorted(models)))


def cached_image_models(cache_root: Path) -> Path:
    final = cache_root / f"image-models-{_BUILD_VERSION}"
    if (final / "build.json").is_file():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=cache_root))
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "build", str(tmp / "models")], check=True,
                   env=env, timeout=300)
    try:
        os.rename(tmp / "models", final)
    except OSError:  # a concurrent run finished first
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def image_models_dir(request: pytest.FixtureRequest) -> Path:
    """A models directory with test-dr-grade, test-findings and test-binary-image (do not modify)."""
    return cached_image_models(Path(str(request.config.cache.mkdir("medclf-test-models"))))


# ------------------------------------------------------------------------------------------
# Test images
# ------------------------------------------------------------------------------------------


def coloured(rgb: tuple[float, float, float], size: int = 64, seed: int = 0, spot: bool = False) -> F32:
    """A (size, size, 3) image in [0, 1] of mean colour ~``rgb`` with mild noise; ``spot`` puts a
    bright red disc in the upper left quadrant (what a heat map should find)."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.asarray(rgb, np.float32)
    img += rng.normal(0.0, 0.02, img.shape).astype(np.float32)
    if spot:
        yy, xx = np.mgrid[:size, :size]
        disc = (yy - size * 0.3) ** 2 + (xx - size * 0.3) ** 2 <= (size * 0.18) ** 2
        img[disc, 0] = 1.0
    return np.clip(img, 0.0, 1.0)


def op_image(path: Path, rgb: F32, *, study_uid: str, series_uid: str, laterality: str = "R",
             instance: int = 1, quality: int = 95) -> Path:
    """Write an OP 8-bit instance (JPEG baseline, YBR_FULL_422) of ``rgb`` (rows, cols, 3) in [0, 1]."""
    pixels = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=quality, subsampling=1)  # 4:2:2
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = OP_8BIT
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = OP_8BIT, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality = "OP"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Fundus", "FUNDUS1", "19600101", "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261202", "120000", "ACC1", "1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = 1, instance
    ds.ImageLaterality = laterality
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined = "EYE"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "build":
        sys.exit("usage: fixtures_image_models.py build DEST")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    _build(Path(sys.argv[2]))
