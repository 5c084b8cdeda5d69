"""`medclf-train synth | convert | split` end to end on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_experiment import CONVERT_SAMPLES, PREPROCESS_25D

from training.cli import main
from training.data.splits import Splits

CONFIG = """
name = "tiny"   # tables other commands use are ignored by convert
""" + PREPROCESS_25D + CONVERT_SAMPLES


def test_synth_convert_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dicom = tmp_path / "dicom"
    assert (
        main(["synth", str(dicom), "-n", "6", "--shape", "12x40x40", "--positive-fraction", "0.5", "--seed", "5"]) == 0
    )
    index = json.loads((dicom / "synth_index.json").read_text())
    assert len(index) == 6 and sum(c["label"] for c in index) == 3
    assert all((dicom / c["truth_path"]).is_file() for c in index)

    cfg = tmp_path / "exp.toml"
    cfg.write_text(CONFIG)
    tfr = tmp_path / "tfr"
    assert main(["convert", str(dicom), str(tfr), "--config", str(cfg), "--no-progress"]) == 0
    summary = json.loads((tfr / "dataset.json").read_text())
    assert summary["totals"]["patients"] == 6 and summary["totals"]["positive_patients"] == 3
    assert summary["preprocess"]["mode"] == "2.5d" and summary["image_shape"] == [32, 32, 3]
    assert len(list(tfr.glob("shard-*.tfrecord"))) == 2

    assert main(["split", str(tfr), "-k", "2", "--test-fraction", "0.34"]) == 0
    splits = Splits.load(tfr / "splits.json")
    assert len(splits.test) == 2 and sum(len(f) for f in splits.folds) == 4
    out = capsys.readouterr().out
    assert "fold 1:" in out


def test_bad_config_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[preprocess]\nmode = "4d"\n')
    assert main(["convert", str(tmp_path), str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert "preprocess.mode" in capsys.readouterr().err
