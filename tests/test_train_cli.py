"""`medclf-train pipeline` (synth -> convert -> split -> train -> evaluate -> export) and `export` on its run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_experiment import CONVERT_SAMPLES, PREPROCESS_25D

from medclf_node.inference.manifest import load_manifest, verify_artifacts
from training.cli import main

CONFIG = """
name = "cli-tiny"
version = "0.0.1"
output_dir = "runs"
cv_folds = 2
""" + PREPROCESS_25D + CONVERT_SAMPLES + """
[data]
tfrecord_dir = "tfr"

[model]
family = "cnn2d"
base_filters = 4

[fit]
epochs = 1
batch_size = 8
precision = "mixed_bfloat16"

[evaluate]
bootstrap = 50

[export]
modes = ["fp32", "int8"]
default = "int8"
representative_samples = 16

[pipeline]
synth_count = 8
synth_positive_fraction = 0.5
synth_shape = [12, 40, 40]
test_fraction = 0.25
run_cv = false
fold = 1
"""


@pytest.mark.slow
def test_pipeline_then_commands_resume_and_refuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "exp.toml"
    cfg.write_text(CONFIG)
    assert main(["pipeline", "--config", str(cfg)]) == 0
    run = tmp_path / "runs" / "cli-tiny" / "fold-1"
    model_dir = tmp_path / "work" / "model" / "cli-tiny"
    assert (run / "best.weights.h5").is_file() and (run / "evaluation" / "test_series_roc.png").is_file()
    report = json.loads((run / "evaluation" / "report.json").read_text())
    assert report["test_series"]["n"] == 2  # 25% of 8 patients held out, one series each
    man = load_manifest(model_dir)
    verify_artifacts(man, model_dir)
    assert man.threshold == pytest.approx(report["threshold"]) and man.input.dtype == "int8"
    assert "int8_auc_delta_vs_fp32" in man.metrics and "test_auc" in man.metrics

    # a second run resumes: every step is skipped and nothing is rewritten
    stamp = (run / "best.weights.h5").stat().st_mtime_ns, (model_dir / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["pipeline", "--config", str(cfg)]) == 0
    assert stamp == ((run / "best.weights.h5").stat().st_mtime_ns, (model_dir / "manifest.json").stat().st_mtime_ns)

    # the single commands work on the same run; export refuses without an evaluation (threshold source)
    assert main(["export", "--config", str(cfg), "--fold", "1", "--out", str(tmp_path / "m"), "--modes", "fp8"]) == 2
    bare = tmp_path / "bare-run"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("evaluation"))
    capsys.readouterr()
    assert main(["export", "--config", str(cfg), "--run", str(bare), "--out", str(tmp_path / "m")]) == 2
    assert "evaluate" in capsys.readouterr().err
    assert main(["export", "--config", str(cfg), "--fold", "1", "--out", str(tmp_path / "m"),
                 "--modes", "fp32", "--default", "fp32"]) == 0
    assert load_manifest(tmp_path / "m").default_artifact == "model_fp32.tflite"
