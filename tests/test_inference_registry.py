"""Model registry: loads only the configured models, verifies sha256, refuses bad manifests clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fixtures_models import tiny_models_dir  # noqa: F401

from medclf_node.config import parse_config
from medclf_node.inference.registry import ModelLoadError, ModelRegistry, load_model


def _copy(src_root: Path, dest: Path, *names: str) -> Path:
    for n in names:
        shutil.copytree(src_root / n, dest / n)
    return dest


def _edit_manifest(model_dir: Path, **updates: object) -> None:
    path = model_dir / "manifest.json"
    data = json.loads(path.read_text())
    data.update(updates)
    path.write_text(json.dumps(data))


def test_loads_only_models_named_by_rules(tiny_models_dir: Path) -> None:  # noqa: F811
    cfg = parse_config({
        "models": {"directory": str(tiny_models_dir)},
        "rules": [{"name": "ct", "models": ["test-2p5d-int8"]}],
    })
    reg = ModelRegistry.from_config(cfg)
    assert reg.names() == ["test-2p5d-int8"]
    m = reg.get("test-2p5d-int8")
    assert m.version == "0.0.1-test" and m.artifact_path == "model_int8.tflite"
    assert "test-3d" not in reg
    with pytest.raises(KeyError, match="test-3d"):
        reg.get("test-3d")


def test_default_model_and_enabled(tiny_models_dir: Path) -> None:  # noqa: F811
    cfg = parse_config({"models": {"directory": str(tiny_models_dir), "default_model": "test-3d"}})
    assert ModelRegistry.from_config(cfg).names() == ["test-3d"]
    cfg = parse_config({"models": {"directory": str(tiny_models_dir), "enabled": ["test-3d", "test-2p5d-int8"]}})
    assert ModelRegistry.from_config(cfg).names() == ["test-2p5d-int8", "test-3d"]


def test_unknown_model_name_lists_what_exists(tiny_models_dir: Path) -> None:  # noqa: F811
    cfg = parse_config({"models": {"directory": str(tiny_models_dir), "default_model": "nodule-xyz"}})
    with pytest.raises(ModelLoadError, match=r"no model named \['nodule-xyz'\].*test-2p5d-int8"):
        ModelRegistry.from_config(cfg)


def test_tampered_artifact_is_refused(tiny_models_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    root = _copy(tiny_models_dir, tmp_path, "test-2p5d-int8")
    art = root / "test-2p5d-int8" / "model_int8.tflite"
    data = bytearray(art.read_bytes())
    data[-1] ^= 0xFF
    art.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as exc:
        load_model(root / "test-2p5d-int8")
    assert str(root / "test-2p5d-int8") in str(exc.value)
    assert "artifacts['model_int8.tflite'].sha256 mismatch" in str(exc.value)


def test_invalid_manifest_names_dir_and_key(tiny_models_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    root = _copy(tiny_models_dir, tmp_path, "test-2p5d-int8", "test-3d")
    _edit_manifest(root / "test-3d", threshold="high")
    cfg = parse_config({"models": {"directory": str(root), "enabled": ["test-3d"]}})
    with pytest.raises(ModelLoadError) as exc:
        ModelRegistry.from_config(cfg)
    assert "test-3d/manifest.json" in str(exc.value) and "threshold" in str(exc.value)
    # an unused broken model does not stop the others
    cfg = parse_config({"models": {"directory": str(root), "enabled": ["test-2p5d-int8"]}})
    assert ModelRegistry.from_config(cfg).names() == ["test-2p5d-int8"]


def test_declared_input_dtype_must_match_artifact(tiny_models_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    root = _copy(tiny_models_dir, tmp_path, "test-2p5d-int8")
    d = root / "test-2p5d-int8"
    data = json.loads((d / "manifest.json").read_text())
    data["input"]["dtype"] = "float32"
    for a in data["artifacts"]:
        a["input_dtype"] = "float32"
    (d / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=r"input_dtype is float32 but the model takes int8"):
        load_model(d)


def test_other_artifact_can_be_served(tiny_models_dir: Path) -> None:  # noqa: F811
    m = load_model(tiny_models_dir / "test-2p5d-int8", artifact="model_fp32.tflite")
    assert m.artifact_path == "model_fp32.tflite"
    with pytest.raises(ModelLoadError, match="no artifact with path 'nope.tflite'"):
        load_model(tiny_models_dir / "test-2p5d-int8", artifact="nope.tflite")
