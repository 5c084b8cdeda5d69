"""Resumable, reproducible cross-validation: `pipeline` continues at the first unfinished fold, and
the same config + seed + data give the same fold results (whatever ran before in the process)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import pytest

from training.cli import main

EXPERIMENT = """
name = "resume-tiny"
output_dir = "{out}"
cv_folds = 3

[preprocess]
mode = "2.5d"
input_shape = [32, 32]
context_slices = 1
target_spacing = [6.0, 9.0, 9.0]
resample_z = true
windows = [{{center = -600, width = 1500}}]

[convert]
shards = 2
[convert.samples]
negative_slice_stride = 2

[data]
tfrecord_dir = "{work}/tfr"
shuffle_buffer = 64

[model]
family = "cnn2d"
base_filters = 4

[fit]
epochs = 2
batch_size = 8
steps_per_epoch = 3
precision = "float32"

[evaluate]
bootstrap = 20

[export]
modes = ["fp32"]
default = "fp32"
representative_samples = 8
parity_samples = 8

[pipeline]
work_dir = "{work}"
synth_count = 9
synth_positive_fraction = 0.5
synth_shape = [12, 40, 40]
test_fraction = 0.12
fold = 0
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantoms -> TFRecords -> a 3-fold split, made once by the pipeline's own data steps."""
    work = tmp_path_factory.mktemp("resume-data")
    dicom, tfr = work / "dicom", work / "tfr"
    cfg = _experiment(work, work / "unused")
    assert main(["synth", str(dicom), "-n", "9", "--positive-fraction", "0.5", "--shape", "12x40x40"]) == 0
    assert main(["convert", str(dicom), str(tfr), "--config", str(cfg), "--no-progress"]) == 0
    assert main(["split", str(tfr), "-k", "3", "--test-fraction", "0.12", "--seed", "1234"]) == 0
    return work


def _experiment(work: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "experiment.toml"
    path.write_text(EXPERIMENT.format(out=out / "runs", work=work))
    return path


def _weights_digest(path: Path) -> str:
    """A digest of every array in a Keras weights file (the file bytes carry timestamps)."""
    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                h.update(name.encode())
                h.update(obj[()].tobytes())
        f.visititems(visit)
    return h.hexdigest()


def _fold_results(runs: Path, folds: int = 3) -> list[tuple[Any, ...]]:
    """(validation AUC, best epoch AUC, epochs, weights digest) of each fold, from cv.json and the runs."""
    rows = json.loads((runs / "resume-tiny" / "cv.json").read_text())["folds"]
    assert [r["fold"] for r in rows] == list(range(folds))
    return [(r["val_auc"], r["best_epoch_val_auc"], r["epochs"],
             _weights_digest(runs / "resume-tiny" / f"fold-{r['fold']}" / "best.weights.h5")) for r in rows]


def _recording_fit(monkeypatch: pytest.MonkeyPatch, interrupt_at: str | None = None) -> list[str]:
    """Wrap training.train.fit: record the run dirs it fits; raise KeyboardInterrupt in ``interrupt_at``."""
    import training.train as train

    real: Callable[..., Any] = train.fit
    calls: list[str] = []

    def fit(cfg: Any, tr: Any, val: Any, run_dir: Path, train_ds: Any = None) -> Any:
        calls.append(run_dir.name)
        if run_dir.name == interrupt_at:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "half-written.tmp").write_text("interrupted mid-fold")
            raise KeyboardInterrupt
        return real(cfg, tr, val, run_dir, train_ds)

    monkeypatch.setattr(train, "fit", fit)
    return calls


def test_pipeline_resumes_at_first_unfinished_fold(work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _experiment(work, tmp_path / "piped")
    runs = tmp_path / "piped" / "runs" / "resume-tiny"

    calls = _recording_fit(monkeypatch, interrupt_at="fold-2")
    assert main(["pipeline", "--config", str(cfg)]) == 130  # Ctrl-C inside fold 2
    assert calls == ["fold-0", "fold-1", "fold-2"]
    assert (runs / "fold-1" / "fit_result.json").is_file() and not (runs / "cv.json").exists()
    stamps = {k: (runs / f"fold-{k}" / "best.weights.h5").stat().st_mtime_ns for k in (0, 1)}

    monkeypatch.undo()
    calls = _recording_fit(monkeypatch)
    assert main(["pipeline", "--config", str(cfg)]) == 0
    assert calls == ["fold-2"]  # folds 0 and 1 kept; the final model is fold 0 of the CV, also kept
    assert stamps == {k: (runs / f"fold-{k}" / "best.weights.h5").stat().st_mtime_ns for k in (0, 1)}
    assert not (runs / "fold-2" / "half-written.tmp").exists()  # the partial fold restarted cleanly
    assert [r["fold"] for r in json.loads((runs / "cv.json").read_text())["folds"]] == [0, 1, 2]
    assert (tmp_path / "piped" / "work").exists() is False  # data steps used the shared work dir
    assert (work / "model" / "resume-tiny" / "manifest.json").is_file()

    # the interrupted-and-resumed folds equal an uninterrupted run of the same config, seed and data
    monkeypatch.undo()
    assert main(["cv", "--config", str(_experiment(work, tmp_path / "straight")), "--no-progress"]) == 0
    assert _fold_results(runs.parent) == _fold_results(tmp_path / "straight" / "runs")


def test_same_config_seed_and_data_give_the_same_folds(work: Path, tmp_path: Path) -> None:
    from training.tfenv import tf

    tf.random.set_seed(None)  # as in a fresh process: nothing has seeded TensorFlow yet
    assert main(["cv", "--config", str(_experiment(work, tmp_path / "a")), "--no-progress"]) == 0
    assert main(["cv", "--config", str(_experiment(work, tmp_path / "b")), "--no-progress"]) == 0
    assert _fold_results(tmp_path / "a" / "runs") == _fold_results(tmp_path / "b" / "runs")

