"""Progress bars: tqdm over training epochs/steps on a terminal, Keras' epoch lines otherwise; the
pipeline no longer silences convert's bar itself."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from training.progress import TqdmEpochs, fit_progress
from training.tfenv import keras


def test_tqdm_epochs_callback_draws_epochs_and_steps() -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="sgd", loss="binary_crossentropy", metrics=[keras.metrics.AUC(name="auc")])
    x = np.random.default_rng(0).normal(size=(24, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    out = io.StringIO()
    model.fit(x, y, batch_size=8, epochs=2, validation_data=(x, y), verbose=0, callbacks=[TqdmEpochs(file=out)])
    text = out.getvalue()
    assert "epochs: 100%" in text and "2/2" in text  # the epoch bar finished
    assert "epoch 1:" in text and "epoch 2:" in text and "/3 [" in text  # step bars: 24 / 8 steps
    assert "val_auc=" in text


def test_fit_progress_quiet_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    callbacks, verbose = fit_progress()  # under pytest stderr is captured, not a terminal
    assert callbacks == [] and verbose == 2
    callbacks, verbose = fit_progress(True)
    assert [type(c) for c in callbacks] == [TqdmEpochs] and verbose == 0


def test_pipeline_leaves_convert_progress_to_the_terminal_check(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from training import commands_model
    from training.cli import main

    seen: list[list[str]] = []

    class Stop(Exception):
        pass

    def data_step(argv: list[str]) -> None:
        seen.append(argv)
        if argv[0] == "convert":
            raise Stop

    monkeypatch.setattr(commands_model, "_data_step", data_step)
    cfg = tmp_path / "exp.toml"
    cfg.write_text('[preprocess]\nmode = "2.5d"\ninput_shape = [32, 32]\ncontext_slices = 1\n'
                   'windows = [{center = -600, width = 1500}]\n[fit]\nprecision = "float32"\n')
    with pytest.raises(Stop):
        main(["pipeline", "--config", str(cfg)])
    convert: Any = seen[-1]
    assert convert[0] == "convert" and "--no-progress" not in convert


def test_convert_bar_is_quiet_without_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.cli import main

    dicom = tmp_path / "dicom"
    assert main(["synth", str(dicom), "-n", "2", "--shape", "8x32x32"]) == 0
    cfg = tmp_path / "exp.toml"
    cfg.write_text('[preprocess]\nmode = "2.5d"\ninput_shape = [32, 32]\ncontext_slices = 1\n'
                   'windows = [{center = -600, width = 1500}]\n[convert]\nshards = 1\n')
    capsys.readouterr()
    assert main(["convert", str(dicom), str(tmp_path / "tfr"), "--config", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "convert:" not in err and "case/s" not in err


def test_fit_draws_the_epoch_bar_on_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The training loop itself: tqdm bars when stderr is a terminal (Keras' lines are off then)."""
    import sys

    from training.train import Split, fit
    from training.train_config import parse_train_config

    cfg = parse_train_config({
        "name": "bar", "output_dir": str(tmp_path),
        "preprocess": {"mode": "2.5d", "windows": [{"center": -600, "width": 1500}], "input_shape": [16, 16],
                       "context_slices": 1},
        "model": {"family": "cnn2d", "base_filters": 4, "dropout": 0.0},
        "fit": {"epochs": 2, "batch_size": 8, "warmup_epochs": 0.0, "precision": "float32", "strategy": "default"},
    })
    rng = np.random.default_rng(0)
    x, y = rng.random((16, 16, 16, 3), dtype=np.float32), np.arange(16) % 2
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    fit(cfg, Split.from_arrays(x, y), Split.from_arrays(x, y), cfg.run_dir)
    err = capsys.readouterr().err
    assert "epochs: 100%" in err and "2/2" in err, err[-2000:]
