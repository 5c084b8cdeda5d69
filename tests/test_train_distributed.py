"""Distributed training for real: two MultiWorkerMirrored workers on loopback, Mirrored over logical CPUs.

Every TensorFlow run is a subprocess (a strategy, TF_CONFIG and logical devices are process-wide and
must be set before TensorFlow starts), bounded by a timeout.  The two workers go through the real
``medclf-train train`` on TFRecords; the Mirrored run goes through :func:`training.train.fit` with a
validation split whose last batch is smaller than the replica count (an empty replica batch used to
crash oneDNN's Conv kernels).  Outputs must exist once, written by the chief alone.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port
from tiny_experiment import CONVERT_SAMPLES, PREPROCESS_25D

pytestmark = pytest.mark.slow

WORKER_TIMEOUT_S = 300
RUN_FILES = {"train_config.json", "history.csv", "best.weights.h5", "fit_result.json"}

EXPERIMENT = """
name = "dist"
output_dir = "runs"
cv_folds = 2
""" + PREPROCESS_25D + CONVERT_SAMPLES + """
[data]
tfrecord_dir = "tfr"

[model]
family = "cnn2d"
base_filters = 4

[fit]
epochs = 2
batch_size = 8
steps_per_epoch = 3
precision = "float32"
"""

# fit() on in-memory data with two logical CPU devices (configured before TensorFlow initialises)
MIRRORED_WORKER = """
import json, os, sys
from pathlib import Path
from training.tfenv import tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
from training.train import Split, fit, strategy_from_env
from training.train_config import parse_train_config

def split(n, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = (rng.normal(size=(n, 16, 16, 3)) * 0.2 + 0.3).astype(np.float32)
    x[y == 1, 5:11, 5:11, :] += 0.8
    return Split.from_arrays(x, y)

cfg = parse_train_config({"name": "m", "output_dir": sys.argv[1],
    "preprocess": {"mode": "2.5d", "windows": [{"center": -600, "width": 1500}], "input_shape": [16, 16],
                   "context_slices": 1},
    "model": {"family": "cnn2d", "base_filters": 4, "dropout": 0.0},
    "fit": {"epochs": 2, "batch_size": 8, "steps_per_epoch": 3, "precision": "float32", "strategy": "mirrored"}})
res = fit(cfg, split(32, 1), split(17, 2), Path(sys.argv[1]) / "run")  # 17 = 2 * 8 + 1: last batch of 1
print("RESULT " + json.dumps({"pid": os.getpid(), "replicas": strategy_from_env("mirrored").num_replicas_in_sync,
                               "epochs": res.epochs_run, "best_val_auc": res.best_val_auc}))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update({"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **extra})
    return env


def _cli(*argv: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "training.cli", *argv], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted, split 6-patient phantom data set and its experiment file (built in subprocesses)."""
    d = tmp_path_factory.mktemp("dist")
    cfg = d / "exp.toml"
    cfg.write_text(EXPERIMENT, encoding="utf-8")
    _cli("synth", str(d / "dicom"), "-n", "6", "--positive-fraction", "0.5", "--shape", "12x40x40", cwd=d)
    _cli("convert", str(d / "dicom"), str(d / "tfr"), "--config", str(cfg), "--no-progress", cwd=d)
    _cli("split", str(d / "tfr"), "-k", "2", "--test-fraction", "0.2", cwd=d)
    return cfg


def _tensorboard_writers(run: Path) -> set[int]:
    """PIDs of the processes that wrote TensorBoard event files (events.out.tfevents.<t>.<host>.<pid>.<n>.v2)."""
    return {int(f.name.split(".")[-3]) for f in (run / "tensorboard").rglob("events.out.tfevents.*")}


def _check_run(run: Path, epochs: int, writer_pid: int) -> dict[str, object]:
    """The run directory holds the chief's outputs exactly once and nothing else."""
    assert {p.name for p in run.iterdir()} == RUN_FILES | {"tensorboard"}
    assert not [p for p in run.parent.rglob("*") if "workertemp" in p.name or "worker-tmp" in p.name]
    assert len(list(csv.DictReader((run / "history.csv").open()))) == epochs
    events = sorted(p.relative_to(run / "tensorboard").parent.as_posix()
                    for p in (run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events == ["train", "validation"], events
    assert _tensorboard_writers(run) == {writer_pid}
    result: dict[str, object] = json.loads((run / "fit_result.json").read_text())
    assert result["epochs"] == epochs
    return result


def test_two_workers_train_through_the_cli(experiment: Path) -> None:
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in (0, 1):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "training.cli", "train", "--config", str(experiment), "--fold", "0"],
            cwd=experiment.parent, env=_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        ))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=WORKER_TIMEOUT_S))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for index, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"worker {index}:\n{err[-4000:]}"
    assert "non-chief worker: no run outputs" in outs[1][1] and "non-chief" not in outs[0][1]
    assert "2 replicas" in outs[0][1]
    for out, _ in outs:  # both report the same, all-reduced result
        assert json.loads(out.strip().splitlines()[-1])["epochs"] == 2
    run = experiment.parent / "runs" / "dist" / "fold-0"
    result = _check_run(run, epochs=2, writer_pid=procs[0].pid)
    assert result["replicas"] == 2 and result["strategy"] == "MultiWorkerMirroredStrategy"


def test_mirrored_over_two_logical_cpus(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", MIRRORED_WORKER, str(tmp_path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    reported = json.loads(line.removeprefix("RESULT "))
    assert reported["replicas"] == 2 and reported["epochs"] == 2
    result = _check_run(tmp_path / "run", epochs=2, writer_pid=reported["pid"])
    assert result["replicas"] == 2 and result["strategy"] == "MirroredStrategy"


@pytest.mark.parametrize(("n", "batch", "replicas", "expected"), [
    (54, 8, 2, 8),   # last batch 6: every replica gets 3
    (17, 8, 2, 9),   # last batch of 1 would leave a replica empty -> 9 (17 = 9 + 8)
    (16, 8, 4, 8),   # no partial batch
    (10, 1, 4, 5),   # batch smaller than the replicas is raised to a divisor
    (5, 8, 1, 8),    # one replica: unchanged
])
def test_validation_batch_never_leaves_a_replica_empty(n: int, batch: int, replicas: int, expected: int) -> None:
    from training.train import _eval_batch_size  # importing TensorFlow creates no strategy or device

    b = _eval_batch_size(n, batch, replicas)
    assert b == expected and (n % b == 0 or n % b >= replicas)
