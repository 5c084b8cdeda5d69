"""Tiny but meaningful test models, until the training package ships real ones.

``build_test_models(dest)`` trains (~25 s CPU, tf-keras) two small CNNs on synthetic CT
phantoms where "a bright round nodule inside a lung" is positive, exports them as int8 / fp32
/ fp16 .tflite and SavedModel, and writes manifests with ``medclf_node.inference.manifest``:

* ``test-2p5d-int8``: 2.5D slice model, input 64x64x3 (lung window, +-1 neighbour slice,
  in-plane 5 mm), default artifact int8 .tflite; also fp32 .tflite and a SavedModel.
* ``test-2p5d-tf``: the same network served from its SavedModel (needs TensorFlow).
* ``test-3d``: 3D model (one strided Conv3D, no pooling), input 16x40x40x1 at 8 mm, sliding
  window along z (stride 8), default artifact fp16 .tflite; also a SavedModel.  Conv3D
  back-propagation on CPU costs ~5 s per step here, so its Conv3D is fixed to difference-of-
  Gaussian blob detectors and only the dense head is trained.

Use the session fixture ``tiny_models_dir`` (import it into a test module or conftest) or call
``build_test_models``.  The build runs in a subprocess so the test process never imports
TensorFlow, and its result is cached in pytest's cache directory keyed by this file's hash.

``phantom_volume`` (numpy only) makes HU volumes of the same kind the models were trained on:
an ellipse of lung density (-850 HU) in air, and optionally a spherical soft-tissue nodule of
radius >= 8 mm.  There are deliberately no soft-tissue walls: the tiny models only learn "bright
blob on a dark background", so series with chest walls or vessels (e.g. the training package's
anatomical phantoms) would confuse them.  Nodules smaller than ~8 mm are below their resolution.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from medclf_node.inference.manifest import (
    Aggregation,
    Artifact,
    CodeSpec,
    InputSpec,
    Labels,
    Manifest,
    Provenance,
    SlidingWindow,
    sha256_path,
    write_manifest,
)
from medclf_node.preprocess import PreprocessSpec, Window, slices_2d, volume_3d

F32 = npt.NDArray[np.float32]
LUNG_WINDOW = Window(center=-600.0, width=1500.0)
NODULE = CodeSpec(value="427359005", scheme="SCT", meaning="Pulmonary nodule")

SPEC_2P5D = PreprocessSpec(
    mode="2.5d",
    windows=(LUNG_WINDOW,),
    input_shape=(64, 64),
    target_spacing=(2.5, 5.0, 5.0),
    context_slices=1,
)
SPEC_3D = PreprocessSpec(
    mode="3d", windows=(LUNG_WINDOW,), input_shape=(16, 40, 40), target_spacing=(8.0, 8.0, 8.0)
)
_BUILD_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------
# Synthetic phantoms (numpy only)
# ------------------------------------------------------------------------------------------


def lung_centres_mm(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> list[tuple[float, float]]:
    """(row, col) centres in mm of the two lungs of ``phantom_volume``; nodules go near these."""
    h = shape[1] * spacing[1]
    w = shape[2] * spacing[2]
    return [(h / 2, w / 2 - 0.22 * w), (h / 2, w / 2 + 0.22 * w)]


def phantom_volume(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    nodule: tuple[float, float, float, float] | None = None,
    seed: int = 0,
    noise_hu: float = 20.0,
) -> F32:
    """A (z, y, x) HU chest phantom; ``nodule`` = (z, y, x, radius) in mm from the volume origin."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    yy = (np.arange(y, dtype=np.float32) + 0.5) * spacing[1]
    xx = (np.arange(x, dtype=np.float32) + 0.5) * spacing[2]
    h, w = y * spacing[1], x * spacing[2]
    yg, xg = np.meshgrid(yy, xx, indexing="ij")
    body = ((yg - h / 2) / (0.36 * h)) ** 2 + ((xg - w / 2) / (0.46 * w)) ** 2 <= 1.0
    sl = np.full((y, x), -1000.0, np.float32)
    sl[body] = -850.0  # lung density everywhere inside: the models know no soft-tissue walls
    vol = np.repeat(sl[None], z, axis=0)
    if nodule is not None:
        nz, ny, nx, r = nodule
        zz = (np.arange(z, dtype=np.float32) + 0.5) * spacing[0]
        d2 = (
            (zz[:, None, None] - nz) ** 2
            + (yy[None, :, None] - ny) ** 2
            + (xx[None, None, :] - nx) ** 2
        )
        vol[d2 <= r * r] = 30.0
    vol += rng.normal(0.0, noise_hu, vol.shape).astype(np.float32)
    return vol


def random_nodule(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator,
    z_mm: float | None = None,
) -> tuple[float, float, float, float]:
    """A nodule (z, y, x, r mm) of radius 8-16 mm inside a random lung of the phantom."""
    cy, cx = lung_centres_mm(shape, spacing)[int(rng.integers(2))]
    h, w = shape[1] * spacing[1], shape[2] * spacing[2]
    r = float(rng.uniform(8.0, 16.0))
    ny = cy + float(rng.uniform(-0.12, 0.12)) * h
    nx = cx + float(rng.uniform(-0.06, 0.06)) * w
    nz = z_mm if z_mm is not None else float(rng.uniform(0.3, 0.7)) * shape[0] * spacing[0]
    return (nz, ny, nx, r)


def _training_2p5d(n: int, rng: np.random.Generator) -> tuple[F32, F32]:
    shape = (3, 64, 64)
    xs, ys = [], []
    for i in range(n):
        pos = i % 2 == 1
        # slightly varied field of view so the lungs do not always sit on the same pixels
        s = (2.5, float(rng.uniform(4.5, 5.5)), float(rng.uniform(4.5, 5.5)))
        nod = random_nodule(shape, s, rng, z_mm=1.5 * 2.5) if pos else None
        vol = phantom_volume(shape, s, nod, seed=int(rng.integers(1 << 30)))
        xs.append(slices_2d(vol, s, SPEC_2P5D, indices=[1])[0])
        ys.append(float(pos))
    return np.stack(xs), np.asarray(ys, np.float32)


def _training_3d(n: int, rng: np.random.Generator) -> tuple[F32, F32]:
    shape, spacing = (16, 40, 40), (8.0, 8.0, 8.0)
    xs, ys = [], []
    for i in range(n):
        pos = i % 2 == 1
        nod = random_nodule(shape, spacing, rng) if pos else None
        vol = phantom_volume(shape, spacing, nod, seed=int(rng.integers(1 << 30)))
        xs.append(volume_3d(vol, spacing, SPEC_3D))
        ys.append(float(pos))
    return np.stack(xs), np.asarray(ys, np.float32)


# ------------------------------------------------------------------------------------------
# Building (TensorFlow; run in a subprocess by the fixture)
# ------------------------------------------------------------------------------------------


def _dog_kernel(sigma: float, size: int = 5) -> F32:
    """A zero-sum 3D difference of Gaussians (sigma, 2 sigma): responds to bright blobs."""
    r = np.arange(size, dtype=np.float32) - size // 2
    d2 = r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2
    g1 = np.exp(-d2 / (2 * sigma**2))
    g2 = np.exp(-d2 / (8 * sigma**2))
    return (g1 / g1.sum() - g2 / g2.sum()).astype(np.float32)


def export_artifacts(model: Any, out: Path, kinds: list[str], rep: F32) -> list[Artifact]:
    """Export a tf-keras model as ``model_<kind>.tflite`` (fp32/fp16/int8 with int8 I/O) and/or
    ``saved_model`` (serving_default takes "input"); returns the manifest artifacts."""
    import tensorflow as tf

    shape = list(model.input_shape[1:])
    arts: list[Artifact] = []

    @tf.function(input_signature=[tf.TensorSpec([None, *shape], tf.float32, name="input")])
    def serve(x: Any) -> dict[str, Any]:
        return {"probability": model(x, training=False)}

    conc = serve.get_concrete_function()
    for kind in kinds:
        if kind == "saved_model":
            tf.saved_model.save(model, str(out / "saved_model"), signatures={"serving_default": conc})
            arts.append(Artifact(path="saved_model", format="saved_model", precision="fp32",
                                 sha256=sha256_path(out / "saved_model")))
            continue
        conv = tf.lite.TFLiteConverter.from_concrete_functions([conc], model)
        dtype = "float32"
        if kind == "fp16":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.target_spec.supported_types = [tf.float16]
        elif kind == "int8":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]

            def gen() -> Iterator[list[F32]]:
                for k in range(min(64, len(rep))):
                    yield [rep[k : k + 1]]

            conv.representative_dataset = gen
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
            dtype = "int8"
        path = out / f"model_{kind}.tflite"
        path.write_bytes(conv.convert())
        arts.append(Artifact(path=path.name, format="tflite", precision=kind,
                             sha256=sha256_path(path), input_dtype=dtype))
    return arts


def _build(dest: Path) -> None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)

    def fit(model: keras.Model, x: F32, y: F32, val: tuple[F32, F32], epochs: int, lr: float = 3e-3,
            fit_model: keras.Model | None = None) -> dict[str, float]:
        """Train (``fit_model`` if given: a head sharing layers with ``model``); metrics on ``val``."""
        trainer = fit_model or model
        trainer.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy")
        trainer.fit(x, y, batch_size=32, epochs=epochs, verbose=0, shuffle=True)
        model.compile(loss="binary_crossentropy", metrics=["accuracy", keras.metrics.AUC(name="auc")])
        res = model.evaluate(val[0], val[1], verbose=0, return_dict=True)
        return {f"val_{k}": float(v) for k, v in res.items()}

    # --- 2.5D -----------------------------------------------------------------------------
    spec2 = SPEC_2P5D
    x2, y2 = _training_2p5d(480, rng)
    val2 = _training_2p5d(96, rng)
    m2 = keras.Sequential([
        keras.layers.Input((64, 64, 3)),
        keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.GlobalMaxPooling2D(),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    metrics2 = fit(m2, x2, y2, val2, epochs=8)
    common = dict(
        version="0.0.1-test",
        labels=Labels(finding=NODULE),
        provenance=Provenance(dataset="synthetic chest phantoms (tests/fixtures_models.py); NOT clinical",
                              seed=0, command="tests/fixtures_models.py build"),
        training_package_version="tests",
        threshold=0.5,
    )
    d = dest / "test-2p5d-int8"
    d.mkdir(parents=True)
    arts = export_artifacts(m2, d, ["int8", "fp32", "saved_model"], x2)
    man = Manifest(name="test-2p5d-int8", description="Tiny 2.5D test model (int8 LiteRT)",
                   input=InputSpec(shape=(64, 64, 3), layout="NHWC", dtype="int8"),
                   preprocessing=spec2, aggregation=Aggregation(method="max"), metrics=metrics2,
                   artifacts=tuple(arts), default_artifact="model_int8.tflite", **common)
    write_manifest(man, d)
    dtf = dest / "test-2p5d-tf"
    shutil.copytree(d / "saved_model", dtf / "saved_model")
    tf_art = next(a for a in arts if a.format == "saved_model")
    write_manifest(man.model_copy(update={
        "name": "test-2p5d-tf", "description": "Tiny 2.5D test model (TensorFlow SavedModel)",
        "input": InputSpec(shape=(64, 64, 3), layout="NHWC", dtype="float32"),
        "artifacts": (tf_art,), "default_artifact": "saved_model",
        "aggregation": Aggregation(method="topk_mean", k=2)}), dtf)

    # --- 3D -------------------------------------------------------------------------------
    # Conv3D back-propagation on CPU is ~5 s per step here, so the 3D model's strided Conv3D is
    # fixed to difference-of-Gaussians blob detectors and only the dense head is trained.
    x3, y3 = _training_3d(240, rng)
    val3 = _training_3d(64, rng)
    conv = keras.layers.Conv3D(2, 5, strides=2, padding="same", activation="relu", trainable=False)
    head = keras.layers.Dense(1, activation="sigmoid")
    m3 = keras.Sequential([keras.layers.Input((16, 40, 40, 1)), conv, keras.layers.GlobalMaxPooling3D(), head])
    conv.set_weights([np.stack([_dog_kernel(0.6), _dog_kernel(1.0)], -1)[:, :, :, None, :],
                      np.zeros(2, np.float32)])
    feats = keras.Model(m3.inputs, m3.layers[1].output).predict(x3, verbose=0, batch_size=64)
    head_only = keras.Sequential([keras.layers.Input((2,)), head])
    metrics3 = fit(m3, feats, y3, val3, epochs=150, lr=0.05, fit_model=head_only)
    d3 = dest / "test-3d"
    d3.mkdir(parents=True)
    arts3 = export_artifacts(m3, d3, ["fp16", "saved_model"], x3)
    write_manifest(Manifest(name="test-3d", description="Tiny 3D test model (strided Conv3D)",
                            input=InputSpec(shape=(16, 40, 40, 1), layout="NDHWC"),
                            preprocessing=SPEC_3D, sliding_window=SlidingWindow(enabled=True, stride=8),
                            metrics=metrics3, artifacts=tuple(arts3), default_artifact="model_fp16.tflite",
                            **common), d3)
    (dest / "build.json").write_text(json.dumps({"2p5d": metrics2, "3d": metrics3}, indent=1))


def build_test_models(dest: Path) -> dict[str, Path]:
    """Build the test models into ``dest`` (a models directory); returns {model name: model dir}.

    Runs the TensorFlow work in a subprocess.  ``dest`` must not contain the models yet.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "build", str(dest)], check=True, env=env,
                   timeout=300)
    return {p.name: p for p in sorted(dest.iterdir()) if (p / "manifest.json").is_file()}


def cached_test_models(cache_root: Path) -> Path:
    """The models directory under ``cache_root``, built once per version of this file."""
    final = cache_root / f"models-{_BUILD_VERSION}"
    if (final / "build.json").is_file():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=cache_root))
    build_test_models(tmp / "models")
    try:
        os.rename(tmp / "models", final)
    except OSError:  # a concurrent run finished first: use its result
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def tiny_models_dir(request: pytest.FixtureRequest) -> Path:
    """A models directory holding test-2p5d-int8, test-2p5d-tf and test-3d (do not modify it)."""
    cache = Path(str(request.config.cache.mkdir("medclf-test-models")))
    return cached_test_models(cache)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "build":
        sys.exit("usage: fixtures_models.py build DEST")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    _build(Path(sys.argv[2]))
