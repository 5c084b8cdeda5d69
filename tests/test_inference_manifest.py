"""Model manifest: validation errors name the key; sha256 of files and SavedModel directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from medclf_node.inference.manifest import (
    ManifestError,
    load_manifest,
    parse_manifest,
    sha256_path,
    verify_artifacts,
    write_manifest,
)


def _valid(sha: str = "0" * 64) -> dict[str, Any]:
    return {
        "name": "nodule-2p5d",
        "version": "1.0.0",
        "labels": {"finding": {"value": "427359005", "scheme": "SCT", "meaning": "Pulmonary nodule"}},
        "input": {"shape": [64, 64, 3], "layout": "NHWC", "dtype": "int8"},
        "preprocessing": {
            "mode": "2.5d",
            "windows": [{"center": -600, "width": 1500}],
            "input_shape": [64, 64],
            "context_slices": 1,
        },
        "aggregation": {"method": "topk_mean", "k": 3},
        "artifacts": [
            {"path": "model.tflite", "format": "tflite", "precision": "int8", "sha256": sha, "input_dtype": "int8"}
        ],
        "default_artifact": "model.tflite",
        "provenance": {"dataset": "synthetic", "seed": 1},
    }


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ManifestError) as exc:
        parse_manifest(data, "models/x/manifest.json")
    return str(exc.value)


def test_valid_manifest_defaults_and_codes() -> None:
    m = parse_manifest(_valid())
    assert m.finding.value == "427359005" and m.finding.scheme == "SCT"
    assert m.labels.positive.meaning == "Present" and m.labels.negative.meaning == "Absent"
    assert m.threshold == 0.5 and m.output.kind == "probability" and m.task == "series_classification"
    assert m.artifact().precision == "int8"


def test_roundtrip_through_json(tmp_path: Path) -> None:
    m = parse_manifest(_valid())
    write_manifest(m, tmp_path)
    again = load_manifest(tmp_path)
    assert again == m
    assert json.loads((tmp_path / "manifest.json").read_text())["preprocessing"]["mode"] == "2.5d"


@pytest.mark.parametrize(
    ("mutate", "key", "words"),
    [
        (lambda d: d.pop("labels"), "labels", "required key is missing"),
        (lambda d: d.update(thresold=0.3), "thresold", "unknown key"),
        (lambda d: d.update(threshold=1.5), "threshold", "less than or equal to 1"),
        (lambda d: d["artifacts"][0].update(path="../evil.tflite"), "artifacts[0].path", "'..'"),
        (lambda d: d["artifacts"][0].update(path="/abs.tflite"), "artifacts[0].path", "relative"),
        (lambda d: d["artifacts"][0].update(sha256="xyz"), "artifacts[0].sha256", "hex"),
        (lambda d: d.update(default_artifact="other.tflite"), "default_artifact", "other.tflite"),
        (lambda d: d["input"].update(shape=[32, 32, 3]), "input.shape", "preprocessing output"),
        (lambda d: d["input"].update(dtype="float32"), "input.dtype", "input_dtype"),
        (lambda d: d.pop("aggregation"), "aggregation", "required for 2d"),
        (lambda d: d.update(sliding_window={"enabled": True, "stride": 4}), "sliding_window", "3d"),
        (lambda d: d.update(name="bad name!"), "name", "model name"),
        (lambda d: d["preprocessing"].update(mode="4d"), "preprocessing.mode", "'2d'"),
    ],
)
def test_errors_name_the_key(mutate: Any, key: str, words: str) -> None:
    data = _valid()
    mutate(data)
    msg = _error(data)
    assert "models/x/manifest.json" in msg
    assert key in msg and words in msg, msg


def test_unreadable_and_non_json_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_sha256_of_file_and_directory(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    assert sha256_path(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    d = tmp_path / "saved_model"
    (d / "variables").mkdir(parents=True)
    (d / "saved_model.pb").write_bytes(b"graph")
    (d / "variables" / "variables.index").write_bytes(b"idx")
    h1 = sha256_path(d)
    assert h1 == sha256_path(d)  # deterministic
    (d / "variables" / "variables.index").write_bytes(b"idX")
    assert sha256_path(d) != h1  # content matters
    (d / "variables" / "variables.index").write_bytes(b"idx")
    (d / "variables" / "variables.index").rename(d / "variables" / "renamed.index")
    assert sha256_path(d) != h1  # names matter


def test_verify_artifacts(tmp_path: Path) -> None:
    (tmp_path / "model.tflite").write_bytes(b"model bytes")
    m = parse_manifest(_valid(sha256_path(tmp_path / "model.tflite")))
    verify_artifacts(m, tmp_path)
    (tmp_path / "model.tflite").write_bytes(b"model bytes, tampered")
    with pytest.raises(ManifestError, match=r"artifacts\['model.tflite'\].sha256 mismatch"):
        verify_artifacts(m, tmp_path)
    (tmp_path / "model.tflite").unlink()
    with pytest.raises(ManifestError, match="missing"):
        verify_artifacts(m, tmp_path)
