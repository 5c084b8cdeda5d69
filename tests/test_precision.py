"""The precision policy is chosen from what runs on this machine; a policy that crashes never kills a fit.

The probe's child is replaced by a command that dies the way TensorFlow's bf16 Conv3D backward pass
does on AVX-512-BF16 CPUs (SIGSEGV / SIGABRT), so these tests behave the same on every CPU.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import training.precision as precision
from medclf_node.preprocess import PreprocessSpec, Window
from training.modeling.config import ModelConfig

SPEC_3D = PreprocessSpec(mode="3d", windows=(Window(center=-600, width=1500),), input_shape=(8, 16, 16))
MODEL_3D = ModelConfig(family="cnn3d_cbam", base_filters=8)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "_cache", {})
    monkeypatch.delenv(precision.PROBE_ENV, raising=False)


def _child_dies(monkeypatch: pytest.MonkeyPatch, how: str) -> list[str]:
    calls: list[str] = []

    def command(payload: str) -> list[str]:
        calls.append(payload)
        return [sys.executable, "-c", how]

    monkeypatch.setattr(precision, "_probe_command", command)
    return calls


def test_a_segfaulting_step_is_a_failed_probe_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    _child_dies(monkeypatch, "import ctypes; ctypes.string_at(0)")
    result = precision.probe("mixed_bfloat16", MODEL_3D, SPEC_3D)
    assert not result.ok and result.reason.startswith("killed by SIGSEGV")


def test_auto_falls_back_to_float32_with_a_logged_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = _child_dies(monkeypatch, "import os; os.abort()")
    with caplog.at_level(logging.WARNING, logger="training.precision"):
        assert precision.choose_policy("auto", MODEL_3D, SPEC_3D, gpu=False) == "float32"
    assert "killed by SIGABRT" in caplog.text and "training in float32 instead" in caplog.text
    sent = json.loads(calls[0])
    assert sent["policy"] == "mixed_bfloat16" and sent["model"]["family"] == "cnn3d_cbam"
    assert sent["model"]["base_filters"] == 4 and sent["spec"]["input_shape"] == [8, 16, 16]
    precision.choose_policy("auto", MODEL_3D, SPEC_3D, gpu=False)
    assert len(calls) == 1, "one probe per policy/family/shape in a process"


def test_a_forced_policy_that_cannot_run_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _child_dies(monkeypatch, "import ctypes; ctypes.string_at(0)")
    with pytest.raises(precision.PrecisionUnsupportedError) as err:
        precision.choose_policy("mixed_bfloat16", MODEL_3D, SPEC_3D, gpu=False)
    text = str(err.value)
    assert "fit.precision = 'mixed_bfloat16'" in text and "SIGSEGV" in text and "'float32'" in text


def test_a_failing_child_reports_its_last_words(monkeypatch: pytest.MonkeyPatch) -> None:
    noise = "E0000 00:00:1796224968.094491 11632 cuda.cc:52] noise"
    _child_dies(monkeypatch, f"import sys; sys.stderr.write('{noise}\\nValueError: no kernel\\n'); sys.exit(2)")
    result = precision.probe("mixed_float16", MODEL_3D, SPEC_3D)
    assert result.reason == "exited with status 2: ValueError: no kernel"


def test_policies_that_need_no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _child_dies(monkeypatch, "raise SystemExit(1)")
    assert precision.choose_policy("float32", MODEL_3D, SPEC_3D, gpu=False) == "float32"
    monkeypatch.setenv(precision.PROBE_ENV, "0")
    assert precision.choose_policy("auto", MODEL_3D, SPEC_3D, gpu=True) == "mixed_float16"
    assert calls == []


def test_the_real_probe_trains_one_step() -> None:
    """The child itself, unmocked: float16 on CPU is slow but works everywhere."""
    result = precision.probe("mixed_float16", ModelConfig(family="cnn2d", base_filters=4),
                             PreprocessSpec(mode="2.5d", windows=(Window(center=-600, width=1500),),
                                            input_shape=(16, 16), context_slices=1))
    assert result.ok, result.reason


FIT_3D_AUTO = '''
import json, sys
import numpy as np
from training.train import Split, fit
from training.train_config import parse_train_config
cfg = parse_train_config({
    "name": "auto3d", "output_dir": sys.argv[1],
    "preprocess": {"mode": "3d", "windows": [{"center": -600, "width": 1500}], "input_shape": [8, 16, 16]},
    "model": {"family": "cnn3d_cbam", "base_filters": 4, "dropout": 0.0},
    "fit": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0.0, "precision": "auto", "strategy": "default"},
})
rng = np.random.default_rng(0)
x = rng.random((8, 8, 16, 16, 1), dtype=np.float32)
y = np.arange(8) % 2
res = fit(cfg, Split.from_arrays(x, y), Split.from_arrays(x, y), cfg.run_dir)
print(json.dumps({"epochs": res.epochs_run}))
'''


@pytest.mark.slow
def test_a_3d_fit_with_auto_precision_finishes_on_this_cpu(tmp_path: Path) -> None:
    """The product path, unmocked, in a subprocess: on a CPU where bf16 Conv3D crashes the fit falls back."""
    proc = subprocess.run([sys.executable, "-c", FIT_3D_AUTO, str(tmp_path)], capture_output=True, text=True,
                          timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads((tmp_path / "auto3d" / "fit_result.json").read_text())
    verdict = precision.probe("mixed_bfloat16", ModelConfig(family="cnn3d_cbam", base_filters=4),
                              PreprocessSpec(mode="3d", windows=(Window(center=-600, width=1500),),
                                             input_shape=(8, 16, 16)))
    assert done["policy"] == ("mixed_bfloat16" if verdict.ok else "float32"), (done, verdict)
