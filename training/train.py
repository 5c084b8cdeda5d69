"""Fit loop: precision policy, distribution strategy, class weights, LR schedule, callbacks.

Data arrives as :class:`Split` objects (an unbatched, deterministic ``tf.data`` dataset of
``(x, y)`` plus the labels and series ids in the same order) so this module does not care whether
the examples come from TFRecords or from memory.

Distributed training (``[fit] strategy``, default ``auto``): with ``TF_CONFIG`` set, every worker
runs the same command and MultiWorkerMirroredStrategy trains in lockstep; with several GPUs (or
logical CPU devices) MirroredStrategy splits each batch over them.  The strategy must exist before
any TensorFlow op runs, so ``medclf-train train|cv|pipeline`` create it first
(:func:`strategy_from_env`, cached; :func:`fit` reuses it).  ``fit.batch_size`` is the global
batch: global = per-replica * replicas.  Two workers on one machine (run each in its own shell)::

    export CLUSTER='{"worker": ["127.0.0.1:12345", "127.0.0.1:12346"]}'
    TF_CONFIG='{"cluster": '"$CLUSTER"', "task": {"type": "worker", "index": 0}}' medclf-train train --config exp.toml
    TF_CONFIG='{"cluster": '"$CLUSTER"', "task": {"type": "worker", "index": 1}}' medclf-train train --config exp.toml

Worker 0 (or the ``chief`` task when the cluster has one) writes the run directory; the others
write nothing there.  All workers read the same TFRecords and config (shared or copied file system).
Run ``synth``/``convert``/``split`` once beforehand, not on every worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from training.modeling.factory import build_model
from training.precision import choose_policy, default_policy
from training.progress import fit_progress
from training.schedules import WarmupCosine
from training.tfenv import gpu_available, keras, tf
from training.train_config import FitSection, TrainConfig

log = logging.getLogger(__name__)

WEIGHTS_FILE = "best.weights.h5"
CONFIG_FILE = "train_config.json"
HISTORY_FILE = "history.csv"
DONE_FILE = "fit_result.json"  # written last: its presence means the run finished (resumable pipelines)
CV_ROW_FILE = "cv_row.json"  # a fold's cross-validation row, written after its fit_result.json


@dataclass(frozen=True)
class Split:
    """One data split: ``dataset`` yields unbatched ``(x, y)`` in the order of ``labels``/``series_ids``."""

    dataset: tf.data.Dataset
    labels: npt.NDArray[np.int64]
    series_ids: npt.NDArray[np.str_]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_arrays(
        cls, x: npt.NDArray[np.float32], y: npt.ArrayLike, series_ids: npt.ArrayLike | None = None
    ) -> Split:
        """An in-memory split (tests, small experiments)."""
        labels = np.asarray(y, dtype=np.int64).reshape(-1)
        ids = np.asarray(series_ids if series_ids is not None else np.arange(len(labels)).astype(str))
        ds = tf.data.Dataset.from_tensor_slices((x.astype(np.float32), labels.astype(np.float32)))
        return cls(ds, labels, ids.astype(str))

    @classmethod
    def from_tfrecords(cls, tfrecord_dir: Path, patients: Sequence[str]) -> Split:
        """The samples of ``patients`` from ``convert``'s shards, in shard order; series id = case id."""
        from training.data.convert import load_summary
        from training.data.pipeline import describe
        from training.data.tfrecords import parse_example

        info = describe(tfrecord_dir, patients)
        wanted = tf.constant(list(info.patients))
        summary = load_summary(tfrecord_dir)
        raw = tf.data.TFRecordDataset([str(f) for f in info.files], compression_type=summary.get("compression") or None)
        parsed = raw.map(lambda r: parse_example(r, info.image_shape)).filter(
            lambda ex: tf.reduce_any(tf.equal(ex["patient_id"], wanted))
        )
        meta = list(parsed.map(lambda ex: (ex["label"], ex["case_id"])).as_numpy_iterator())
        labels = np.array([int(m[0]) for m in meta], dtype=np.int64)
        ids = np.array([m[1].decode("utf-8") for m in meta], dtype=str)
        ds = parsed.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.float32)))
        return cls(ds, labels, ids)


@dataclass
class TrainResult:
    """What a fit produced."""

    run_dir: Path
    best_val_auc: float
    epochs_run: int
    history: dict[str, list[float]] = field(default_factory=dict)

    @property
    def weights_path(self) -> Path:
        return self.run_dir / WEIGHTS_FILE


# --- environment ---------------------------------------------------------------------------


def resolve_precision(name: str) -> str:
    """'auto' -> mixed_float16 on GPU, mixed_bfloat16 on CPU; anything else is returned unchanged.

    What 'auto' *asks for*; :func:`training.precision.choose_policy` decides what a fit actually uses.
    """
    if name != "auto":
        return name
    return default_policy(gpu_available())


def fit_precision(cfg: TrainConfig) -> str:
    """The policy ``fit`` trains with: the config's, probed on this machine (float32 when 'auto' cannot run)."""
    return choose_policy(cfg.fit.precision, cfg.model, cfg.preprocess, gpu=gpu_available())


@contextlib.contextmanager
def precision_policy(name: str) -> Iterator[str]:
    """Set the global Keras dtype policy for model building inside the block, then restore it."""
    resolved = resolve_precision(name)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(resolved)
    try:
        yield resolved
    finally:
        keras.mixed_precision.set_global_policy(previous)


_STRATEGIES: dict[str, tf.distribute.Strategy] = {}


def _strategy_kind(name: str) -> str:
    """'auto' -> 'multi_worker' with TF_CONFIG, 'mirrored' with several GPUs (or configured logical CPUs)."""
    if name != "auto":
        return name
    if os.environ.get("TF_CONFIG"):
        return "multi_worker"
    return "mirrored" if len(_replica_devices()) > 1 else "default"


def _replica_devices() -> list[str]:
    """The devices MirroredStrategy should use: every GPU, else every logical CPU device."""
    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def strategy_from_env(name: str = "auto") -> tf.distribute.Strategy:
    """The process's strategy of kind ``name``, created on first use and then reused.

    auto: MultiWorkerMirrored when TF_CONFIG is set, Mirrored over all GPUs when there are several
    (or over several logical CPU devices when they were configured), else the default strategy.
    It is cached because MultiWorkerMirroredStrategy can be created only once per process and only
    before any TensorFlow op ran (collectives are configured at startup): commands that train call
    this first, before reading any data, and :func:`fit` then gets the same object.
    """
    kind = _strategy_kind(name)
    if kind in _STRATEGIES:
        return _STRATEGIES[kind]
    strategy: tf.distribute.Strategy
    if kind == "multi_worker":
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as exc:
            raise RuntimeError(
                f"{exc}: create the strategy first, before any TensorFlow op (data loading, model building), "
                "with training.train.strategy_from_env(cfg.fit.strategy); `medclf-train train/cv/pipeline` do"
            ) from exc
    elif kind == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=_replica_devices())
    else:
        strategy = tf.distribute.get_strategy()
    _STRATEGIES[kind] = strategy
    log.info("strategy %s: %d replicas in sync", _strategy_name(strategy), strategy.num_replicas_in_sync)
    return strategy


def _strategy_name(strategy: tf.distribute.Strategy) -> str:
    """The public class name (tf.distribute.MultiWorkerMirroredStrategy's own type is CollectiveAllReduceStrategy)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    return "MirroredStrategy" if isinstance(strategy, tf.distribute.MirroredStrategy) else "default"


def _is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """True on the worker that writes run outputs (no TF_CONFIG, the chief, or worker 0 without chief).

    With a multi-worker strategy its own answer (``should_checkpoint``, from the cluster resolver) wins,
    so Keras' ModelCheckpoint and this function agree on who the chief is.
    """
    if strategy is not None and strategy.extended._in_multi_worker_mode():
        return bool(strategy.extended.should_checkpoint)
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = tf_config.get("task", {})
    kind, index = task.get("type", "chief"), task.get("index", 0)
    has_chief = "chief" in tf_config.get("cluster", {})
    return bool(kind == "chief" or (kind == "worker" and index == 0 and not has_chief))


def _distributable(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Shard by DATA across workers: every worker reads all shards and keeps its share of each batch.

    FILE sharding (the AUTO choice for TFRecords) hands whole shard files to workers; our shards are
    patient-grouped and few, so workers would see unequal data or none.  No effect on one worker.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def _eval_batch_size(n: int, batch_size: int, replicas: int) -> int:
    """A validation batch size near ``batch_size`` whose last batch still gives every replica an example.

    The strategy splits each batch over the replicas; a last batch smaller than the replica count
    hands some replica an empty batch, and oneDNN's Conv kernels reject empty inputs ("input depth must
    be evenly divisible by filter depth: 3 vs 8").  Dropping or padding examples would change the
    validation AUC; the batch size changes nothing but speed.
    """
    if replicas <= 1:
        return batch_size
    if n < replicas:
        raise ValueError(f"the validation split has {n} examples, fewer than the {replicas} replicas")
    for b in range(max(batch_size, replicas), n + 1):
        if n % b == 0 or n % b >= replicas:
            return b
    return n


def _barrier(strategy: tf.distribute.Strategy) -> None:
    """Wait for every worker (an all-reduce): the chief's outputs are complete when fit returns anywhere."""
    if strategy.extended._in_multi_worker_mode():
        strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)


# --- pieces --------------------------------------------------------------------------------


def class_weights(labels: npt.ArrayLike) -> dict[int, float]:
    """Balanced weights n / (2 * n_c) for classes 0 and 1 (both 1.0 when a class is absent: nothing to balance)."""
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    counts = {c: int(np.sum(y == c)) for c in (0, 1)}
    if not all(counts.values()):
        log.warning("class weights: the training split has only one class (%s); using 1.0", counts)
        return {0: 1.0, 1: 1.0}
    return {c: float(len(y) / (2.0 * n_c)) for c, n_c in counts.items()}


def make_schedule(fit: FitSection, steps_per_epoch: int) -> WarmupCosine:
    """Warmup + cosine (with restarts when ``restart_epochs`` > 0) in optimizer steps."""
    total = max(1, fit.epochs * steps_per_epoch)
    warmup = min(total, int(round(fit.warmup_epochs * steps_per_epoch)))
    return WarmupCosine(
        peak=fit.learning_rate,
        total_steps=total,
        warmup_steps=warmup,
        alpha=fit.min_lr_ratio,
        restart_steps=int(round(fit.restart_epochs * steps_per_epoch)),
        t_mul=fit.restart_t_mul,
        m_mul=fit.restart_m_mul,
    )


def compile_model(model: keras.Model, fit: FitSection, schedule: Any) -> None:
    """AdamW + binary cross-entropy; AUC/PR-AUC unweighted and class-weighted."""
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=fit.weight_decay)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.AUC(name="auc"), keras.metrics.AUC(curve="PR", name="pr_auc")],
        weighted_metrics=[
            keras.metrics.AUC(name="weighted_auc"),
            keras.metrics.BinaryAccuracy(name="weighted_accuracy"),
        ],
    )


def batched(split: Split, batch_size: int, *, shuffle: int = 0, seed: int = 0) -> tf.data.Dataset:
    """Batch (and optionally shuffle/repeat) a split for fitting or prediction."""
    ds = split.dataset
    if shuffle:
        ds = ds.shuffle(min(shuffle, max(1, len(split))), seed=seed, reshuffle_each_iteration=True).repeat()
    return ds.batch(batch_size, drop_remainder=bool(shuffle)).prefetch(tf.data.AUTOTUNE)


def predict_split(model: keras.Model, split: Split, batch_size: int = 64) -> npt.NDArray[np.float32]:
    """P(positive) for every example of ``split``, in order."""
    xs = split.dataset.map(lambda x, y: x).batch(batch_size)
    return np.asarray(model.predict(xs, verbose=0), np.float32).reshape(-1)


def save_config(cfg: TrainConfig, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    path.write_text(cfg.model_dump_json(indent=2), encoding="utf-8")
    return path


def load_run_config(run_dir: Path) -> TrainConfig:
    """The training config saved with a run (what export/evaluate rebuild the model from)."""
    return TrainConfig.model_validate_json((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))


def load_trained_model(run_dir: Path) -> keras.Model:
    """Rebuild the run's architecture in float32 and load its best weights (export wants fp32 graphs)."""
    cfg = load_run_config(run_dir)
    with precision_policy("float32"):
        model = build_model(cfg.model, cfg.preprocess)
    model.load_weights(str(Path(run_dir) / WEIGHTS_FILE))
    return model


# --- the fit -------------------------------------------------------------------------------


def fit(
    cfg: TrainConfig, train: Split, val: Split, run_dir: Path, train_ds: tf.data.Dataset | None = None
) -> TrainResult:
    """Train ``cfg.model`` on ``train``, checkpoint on best val AUC, write logs under ``run_dir``.

    ``train_ds``: an already batched, repeating training dataset (e.g. the data pipeline's, with
    augmentation and balancing) used instead of shuffling ``train``; ``train`` still supplies
    the labels for class weights and the epoch length.

    Distributed (``fit.strategy``, see :func:`strategy_from_env`): ``fit.batch_size`` is the GLOBAL
    batch, so each of the R replicas gets batch_size / R examples per step (global = per-replica * R;
    raise batch_size with R to keep the per-replica batch) and ``steps_per_epoch`` counts global steps.
    Datasets are sharded by DATA across workers (:func:`_distributable`).  Every worker runs the
    checkpoint save (Keras writes the non-chief's into a ``workertemp_N`` folder and deletes it); only
    the chief writes the config, history.csv, TensorBoard logs, the weights and fit_result.json.
    """
    fitc = cfg.fit
    strategy = strategy_from_env(fitc.strategy)
    chief = _is_chief(strategy)
    keras.utils.set_random_seed(fitc.seed)
    if chief:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
    steps = fitc.steps_per_epoch or max(1, len(train) // fitc.batch_size)
    replicas = strategy.num_replicas_in_sync
    if fitc.batch_size < replicas:
        raise ValueError(f"fit.batch_size {fitc.batch_size} (the global batch) is smaller than the {replicas} replicas")
    if fitc.batch_size % replicas:
        log.warning("fit.batch_size %d is not a multiple of %d replicas: replicas get unequal batches",
                    fitc.batch_size, replicas)
    with precision_policy(fit_precision(cfg)) as policy, strategy.scope():
        model = build_model(cfg.model, cfg.preprocess)
        compile_model(model, fitc, make_schedule(fitc, steps))
    log.info("fit %s: policy %s, strategy %s, %d replicas (global batch %d, %d per replica), %d steps/epoch%s",
             model.name, policy, _strategy_name(strategy), replicas, fitc.batch_size,
             fitc.batch_size // replicas, steps, "" if chief else ", non-chief worker: no run outputs")
    weights = class_weights(train.labels) if fitc.class_weights else None
    callbacks: list[keras.callbacks.Callback] = [
        # on every worker: the save is a collective step; Keras redirects and deletes a non-chief's file
        keras.callbacks.ModelCheckpoint(
            str(run_dir / WEIGHTS_FILE), monitor="val_auc", mode="max", save_best_only=True,
            save_weights_only=True,
        ),
        keras.callbacks.EarlyStopping(
            monitor="val_auc", mode="max", patience=fitc.early_stopping_patience, restore_best_weights=True
        ),
    ]
    if chief:
        callbacks += [
            keras.callbacks.CSVLogger(str(run_dir / HISTORY_FILE)),
            keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard"), write_graph=False, profile_batch=0),
        ]
    bars, verbose = fit_progress(None if chief else False)  # tqdm on a terminal; one line per epoch in logs
    callbacks += bars
    if train_ds is None:
        train_ds = batched(train, fitc.batch_size, shuffle=cfg.data.shuffle_buffer, seed=fitc.seed)
    hist = model.fit(
        _distributable(train_ds),
        validation_data=_distributable(batched(val, _eval_batch_size(len(val), fitc.batch_size, replicas))),
        epochs=fitc.epochs,
        steps_per_epoch=steps,
        class_weight=weights,
        callbacks=callbacks,
        verbose=verbose,
    )
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    best = max(history.get("val_auc", [float("nan")]))
    result = TrainResult(run_dir, best, len(history.get("loss", [])), history)
    if chief:
        (run_dir / DONE_FILE).write_text(
            json.dumps({"best_val_auc": best, "epochs": result.epochs_run, "policy": policy,
                        "strategy": _strategy_name(strategy), "replicas": replicas}),
            encoding="utf-8",
        )
    _barrier(strategy)
    log.info("fit done: %d epochs, best val AUC %.4f", result.epochs_run, best)
    return result


# --- cross-validation ----------------------------------------------------------------------


def series_level(
    cfg: TrainConfig, split: Split, scores: npt.NDArray[np.float32]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """(labels, scores) per series (node aggregation) for 2D models, per example for 3D models."""
    from training.evaluate import aggregate_series

    if cfg.preprocess.mode == "3d":
        return np.asarray(split.labels, np.int64), np.asarray(scores, np.float64)
    _, s, y = aggregate_series(split.series_ids, scores, split.labels, cfg.evaluate.aggregation)
    return np.asarray(y, np.int64), np.asarray(s, np.float64)


def split_auc(cfg: TrainConfig, split: Split, scores: npt.NDArray[np.float32]) -> float:
    """AUC at series level (node aggregation) for 2D models, per example for 3D models."""
    from training.evaluate import roc_auc

    return roc_auc(*series_level(cfg, split, scores))


def cross_validate(
    cfg: TrainConfig,
    fold_data: Callable[[int], tuple[Split, Split, tf.data.Dataset | None]],
    folds: int,
    *,
    resume: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Fit one model per fold, score its validation fold; per-fold results and mean +- sd (ddof=1).

    ``fold_data(k)`` returns (train, validation, optional batched training dataset) for fold ``k``.
    Each fold is written to ``cfg.run_dir / "fold-k"`` and its result row (with the fold's series
    labels and scores) to ``fold-k/cv_row.json``; the summary goes to ``cfg.run_dir / "cv.json"``:
    per fold the AUC with its bootstrap 95 % CI, mean +- sd, the pooled AUC, and ``warnings`` for
    folds under 30 series (a mean +- sd over folds that small says little).

    ``resume``: a fold is finished when its ``fit_result.json`` and ``cv_row.json`` exist and its saved
    config equals ``cfg``; finished folds are not refitted (an interrupted run continues at the first
    unfinished fold).  Any other fold directory is partial or stale and is removed before the fold is
    fitted again from scratch.  Reproducible: the seeds are reset to ``fit.seed`` before each fold's
    data is built, so fold k gives the same result whether folds 0..k-1 ran in this process or not
    (tf.data shuffles take the global seed as well as their own).  ``progress``: a tqdm bar over the
    folds on stderr; None shows it only when stderr is a terminal.
    """
    import shutil

    from tqdm import tqdm

    from training.evaluate import cv_summary, roc_auc

    def finished(run: Path) -> dict[str, Any] | None:
        row_file, cfg_file = run / CV_ROW_FILE, run / CONFIG_FILE
        if not ((run / DONE_FILE).is_file() and row_file.is_file() and cfg_file.is_file()):
            return None
        if TrainConfig.model_validate_json(cfg_file.read_text(encoding="utf-8")) != cfg:
            log.info("fold %s: its saved config differs from this one; fitted again", run.name)
            return None
        row: dict[str, Any] = json.loads(row_file.read_text(encoding="utf-8"))
        return row

    chief = _is_chief()
    rows = []
    bar = tqdm(range(folds), desc="cv", unit="fold", disable=None if progress is None else not progress)
    for k in bar:
        run = cfg.run_dir / f"fold-{k}"
        done = finished(run) if resume else None
        if done is not None:
            log.info("fold %d: finished earlier (%s), not refitted", k, run / CV_ROW_FILE)
            rows.append(done)
            continue
        if chief and run.exists():
            log.info("fold %d: removing the earlier (partial or stale) %s", k, run)
            shutil.rmtree(run)
        keras.utils.set_random_seed(cfg.fit.seed)  # before the data: fold k must not depend on folds < k
        train, val, train_ds = fold_data(k)
        res = fit(cfg, train, val, run, train_ds)
        model = load_trained_model(res.run_dir)
        y_series, s_series = series_level(cfg, val, predict_split(model, val))
        rows.append({"fold": k, "val_auc": roc_auc(y_series, s_series), "best_epoch_val_auc": res.best_val_auc,
                     "epochs": res.epochs_run, "n_train": len(train), "n_val": len(val),
                     "n_val_series": len(y_series), "series_labels": y_series.tolist(),
                     "series_scores": s_series.tolist()})
        if chief:
            (run / CV_ROW_FILE).write_text(json.dumps(rows[-1], indent=1), encoding="utf-8")
        keras.backend.clear_session()
        bar.set_postfix(val_auc=f"{rows[-1]['val_auc']:.3f}")
        log.info("fold %d: validation AUC %.4f", k, rows[-1]["val_auc"])
    evidence = cv_summary([(r["series_labels"], r["series_scores"]) for r in rows if "series_labels" in r],
                          n_boot=cfg.evaluate.bootstrap, seed=cfg.fit.seed)
    by_fold = {r["fold"]: r for r in evidence["folds"]}
    for k, row in enumerate(r for r in rows if "series_labels" in r):
        row["val_auc_ci95"] = by_fold[k]["auc_ci95"]
    aucs = np.array([r["val_auc"] for r in rows], dtype=np.float64)
    summary = {"folds": [{k: v for k, v in r.items() if k not in ("series_labels", "series_scores")} for r in rows],
               "val_auc_mean": float(np.nanmean(aucs)),
               "val_auc_sd": float(np.nanstd(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
               "val_auc_pooled": evidence.get("pooled"),
               "warnings": evidence["warnings"],
               "level": "series" if cfg.preprocess.mode != "3d" else "volume"}
    if chief:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "cv.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    log.info("cv: validation AUC %.4f +- %.4f over %d folds", summary["val_auc_mean"], summary["val_auc_sd"], folds)
    return summary
