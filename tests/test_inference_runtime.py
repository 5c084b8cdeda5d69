"""Runtimes: LiteRT (int8/fp32/fp16, batching) and TF SavedModel agree; serving LiteRT never imports TF."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fixtures_models import phantom_volume, random_nodule, tiny_models_dir  # noqa: F401

from medclf_node.inference.runtime import LiteRTRuntime, RuntimeLoadError
from medclf_node.preprocess import slices_2d

ROOT = Path(__file__).resolve().parent.parent


def _inputs(model_dir: Path, n: int = 13) -> np.ndarray:
    """2.5D inputs from phantoms, half of them with a nodule in the centre slice."""
    from medclf_node.inference.manifest import load_manifest

    spec = load_manifest(model_dir).preprocessing
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        shape, sp = (3, 80, 80), (2.5, 4.0, 4.0)
        nod = random_nodule(shape, sp, rng, z_mm=3.75) if i % 2 else None
        out.append(slices_2d(phantom_volume(shape, sp, nod, seed=i), sp, spec, indices=[1])[0])
    return np.stack(out)


def test_int8_fp32_and_batching_agree(tiny_models_dir: Path) -> None:  # noqa: F811
    d = tiny_models_dir / "test-2p5d-int8"
    x = _inputs(d)
    int8 = LiteRTRuntime(d / "model_int8.tflite", threads=2, batch_size=4)
    fp32 = LiteRTRuntime(d / "model_fp32.tflite", threads=2, batch_size=4)
    loop = LiteRTRuntime(d / "model_fp32.tflite", threads=2, batch_mode="loop")
    assert int8.input_dtype == "int8" and fp32.input_dtype == "float32"
    assert int8.input_shape == (64, 64, 3)
    p8, p32, pl = int8.predict(x)[:, 0], fp32.predict(x)[:, 0], loop.predict(x)[:, 0]
    assert p8.shape == (13,) and p8.dtype == np.float32
    assert np.all((p8 >= 0) & (p8 <= 1))
    np.testing.assert_allclose(p32, pl, atol=1e-5)  # padded batches == one sample per invoke
    np.testing.assert_allclose(p8, p32, atol=0.05)  # int8 quantisation error is small
    labels = np.arange(13) % 2 == 1
    assert np.all((p8 > 0.5) == labels), p8


def test_wrong_input_shape_and_bad_file(tiny_models_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    rt = LiteRTRuntime(tiny_models_dir / "test-2p5d-int8" / "model_int8.tflite", warm_up=False)
    with pytest.raises(ValueError, match="does not match model input"):
        rt.predict(np.zeros((2, 32, 32, 3), np.float32))
    assert rt.predict(np.zeros((0, 64, 64, 3), np.float32)).shape[0] == 0
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"this is not a flatbuffer")
    with pytest.raises(RuntimeLoadError, match="bad.tflite"):
        LiteRTRuntime(bad)


@pytest.mark.slow
def test_savedmodel_matches_litert(tiny_models_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """In a subprocess (TensorFlow stays out of the test process): the SavedModel runtime gives the
    fp32 tflite's outputs, and the registry serves the SavedModel-only model test-2p5d-tf."""
    d = tiny_models_dir / "test-2p5d-int8"
    x = _inputs(d, n=6)
    np.save(tmp_path / "x.npy", x)
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from pathlib import Path
        from medclf_node.domain import SliceRef, Volume
        from medclf_node.inference.predict import predict_series
        from medclf_node.inference.registry import load_model
        from medclf_node.inference.runtime import TFSavedModelRuntime
        rt = TFSavedModelRuntime(Path({str(d / "saved_model")!r}), threads=2, batch_size=4)
        assert rt.input_shape == (64, 64, 3), rt.input_shape
        np.save({str(tmp_path / "y.npy")!r}, rt.predict(np.load({str(tmp_path / "x.npy")!r})))
        m = load_model(Path({str(tiny_models_dir / "test-2p5d-tf")!r}))
        assert type(m.runtime).__name__ == "TFSavedModelRuntime"
        hu = np.full((12, 64, 64), -850, np.float32)
        hu[4:9, 30:36, 30:36] = 30.0
        vol = Volume(hu, (2.5, 5.0, 5.0), np.eye(4), tuple(SliceRef("1.2", f"1.2.{{i}}") for i in range(12)),
                     "1.2.3", "1.2.3.4")
        res = predict_series(m, vol)
        print("RESULT", res.positive, res.key_slice_index, "tensorflow" in sys.modules)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "RESULT True 6 True" in res.stdout, res.stdout
    y = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(y[:, 0], LiteRTRuntime(d / "model_fp32.tflite").predict(x)[:, 0], atol=1e-4)


def test_serving_litert_never_imports_tensorflow(tiny_models_dir: Path) -> None:  # noqa: F811
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from pathlib import Path
        from medclf_node.config import parse_config
        from medclf_node.domain import SliceRef, Volume
        from medclf_node.inference.registry import ModelRegistry
        from medclf_node.inference.predict import predict_series
        cfg = parse_config({{"models": {{"directory": {str(tiny_models_dir)!r},
                                         "enabled": ["test-2p5d-int8", "test-3d"]}}}})
        reg = ModelRegistry.from_config(cfg)
        hu = np.full((20, 64, 64), -850, np.float32)
        vol = Volume(hu, (2.5, 5.0, 5.0), np.eye(4), tuple(SliceRef("1.2", f"1.2.{{i}}") for i in range(20)),
                     "1.2.3", "1.2.3.4")
        for name in reg.names():
            predict_series(reg.get(name), vol)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras", "keras"))
        print("TF-MODULES", bad)
        sys.exit(1 if bad else 0)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "TF-MODULES []" in res.stdout


def test_litert_runtime_is_safe_to_share_between_threads(tiny_models_dir: Path) -> None:  # noqa: F811
    from concurrent.futures import ThreadPoolExecutor

    d = tiny_models_dir / "test-2p5d-int8"
    x = _inputs(d, n=9)
    rt = LiteRTRuntime(d / "model_fp32.tflite", batch_size=4)
    expected = rt.predict(x)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: rt.predict(x), range(12)))
    for r in results:
        np.testing.assert_array_equal(r, expected)


def test_auto_batch_size_follows_measurements(tiny_models_dir: Path) -> None:  # noqa: F811
    from medclf_node.inference.runtime import auto_batch_size

    assert auto_batch_size((64, 64, 3)) == 8  # small inputs: batching is faster
    assert auto_batch_size((256, 256, 3)) == 1  # large inputs: one per invoke is faster
    assert auto_batch_size((16, 40, 40, 1)) == 2
    assert auto_batch_size((4, 4, 1)) == 16
    rt = LiteRTRuntime(tiny_models_dir / "test-2p5d-int8" / "model_int8.tflite", warm_up=False)
    assert rt.batch_size == 8
