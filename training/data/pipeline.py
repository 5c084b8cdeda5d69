"""tf.data input pipelines over the patient-grouped shards written by ``convert``.

read only the shards that hold the wanted patients -> keep only those patients' records ->
parse -> cache (optional) -> shuffle/repeat (training) -> class-balanced sampling (optional)
-> augment with a per-sample stateless seed -> batch -> prefetch(AUTOTUNE).

Deterministic under ``seed``: shard order, shuffling and sampling are seeded, parallel maps
keep order, and each sample's augmentation is keyed by (seed, running sample number), so two
runs with the same seed produce the same batches.  :func:`split_datasets` runs the leakage
check before it builds anything, so every training start is checked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.data.augment import AugmentConfig, augment
from training.data.convert import load_summary
from training.data.splits import Splits, assert_no_leakage
from training.tfenv import tf

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE


@dataclass(frozen=True)
class DatasetInfo:
    """What a pipeline reads: shard files, patients, sample counts (from ``dataset.json``)."""

    files: tuple[Path, ...]
    patients: tuple[str, ...]
    samples: int
    positives: int
    image_shape: tuple[int, ...]


def describe(tfrecord_dir: Path, patients: Iterable[str] | None = None) -> DatasetInfo:
    """The shards and counts for ``patients`` (all patients when None).  Unknown IDs are an error."""
    summary = load_summary(tfrecord_dir)
    known: dict[str, Any] = summary["patients"]
    wanted = sorted(known) if patients is None else sorted(set(patients))
    missing = [p for p in wanted if p not in known]
    if missing:
        raise KeyError(f"{len(missing)} patient(s) not in {tfrecord_dir}: {missing[:10]}")
    shard_ids = sorted({int(known[p]["shard"]) for p in wanted if known[p]["shard"] is not None})
    files = tuple(Path(tfrecord_dir) / summary["shards"][i]["file"] for i in shard_ids)
    return DatasetInfo(
        files=files,
        patients=tuple(wanted),
        samples=sum(int(known[p]["samples"]) for p in wanted),
        positives=sum(int(known[p]["positives"]) for p in wanted),
        image_shape=tuple(int(v) for v in summary["image_shape"]),
    )


def _parser(image_shape: tuple[int, ...]) -> Any:
    from training.data.tfrecords import parse_example

    def parse(rec: Any) -> dict[str, Any]:
        return parse_example(rec, image_shape)

    return parse


def make_dataset(
    tfrecord_dir: Path,
    *,
    patients: Iterable[str] | None = None,
    batch_size: int = 32,
    training: bool = False,
    augment_cfg: AugmentConfig | None = None,
    balance: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 1024,
    cache: bool | str = False,
    drop_remainder: bool | None = None,
    label_dtype: Any = tf.float32,
) -> tuple[Any, DatasetInfo]:
    """A batched ``(image, label)`` dataset of ``patients``' samples and its :class:`DatasetInfo`.

    ``training`` shuffles, repeats forever (use ``steps_per_epoch``), augments when
    ``augment_cfg`` is given and, with ``balance``, draws positives and negatives 50/50.
    ``cache``: True caches parsed records in memory, a string caches to that file prefix.
    """
    info = describe(tfrecord_dir, patients)
    summary = load_summary(tfrecord_dir)
    compression = summary.get("compression") or None
    files = [str(p) for p in info.files]
    ds = tf.data.TFRecordDataset(files, compression_type=compression, num_parallel_reads=None)
    ds = ds.map(_parser(info.image_shape), num_parallel_calls=AUTOTUNE, deterministic=True)
    if patients is not None:
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(list(info.patients), tf.string), tf.ones([len(info.patients)], tf.int32)
            ),
            default_value=0,
        )
        ds = ds.filter(lambda ex: table.lookup(ex["patient_id"]) > 0)
    ds = ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], label_dtype)))
    if cache is True:
        ds = ds.cache()
    elif isinstance(cache, str) and cache:
        ds = ds.cache(cache)
    if training:
        if balance:
            if info.positives == 0 or info.positives == info.samples:
                raise ValueError("balanced sampling needs both classes; this selection has only one")
            pos = ds.filter(lambda x, y: y > 0).shuffle(shuffle_buffer, seed=seed).repeat()
            neg = ds.filter(lambda x, y: y <= 0).shuffle(shuffle_buffer, seed=seed + 1).repeat()
            ds = tf.data.Dataset.sample_from_datasets([pos, neg], weights=[0.5, 0.5], seed=seed)
        else:
            ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
        if augment_cfg is not None:
            cfg = augment_cfg
            counter = tf.data.Dataset.counter()
            ds = tf.data.Dataset.zip((ds, counter))

            def aug(pair: Any, n: Any) -> Any:
                image, label = pair
                return augment(image, tf.stack([tf.constant(seed, tf.int64), n]), cfg), label

            ds = ds.map(aug, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=training if drop_remainder is None else drop_remainder)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(AUTOTUNE), info


def split_datasets(
    tfrecord_dir: Path,
    splits: Splits,
    fold: int | None,
    *,
    batch_size: int = 32,
    augment_cfg: AugmentConfig | None = None,
    balance: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 1024,
    cache: bool = False,
) -> tuple[Any, Any, DatasetInfo, DatasetInfo]:
    """(train, validation) datasets for ``fold``; ``fold=None`` trains on all development
    patients and validates on the test set (the final model).  Runs the leakage check first.
    """
    if fold is None:
        train_p, val_p = splits.development(), splits.test
        assert_no_leakage(train=train_p, test=val_p)
    else:
        train_p, val_p = splits.fold(fold)  # checks train/val/test
    train, train_info = make_dataset(
        tfrecord_dir,
        patients=train_p,
        batch_size=batch_size,
        training=True,
        augment_cfg=augment_cfg,
        balance=balance,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        cache=cache,
    )
    val, val_info = make_dataset(tfrecord_dir, patients=val_p, batch_size=batch_size, training=False, cache=cache)
    assert_no_leakage(train=train_info.patients, validation=val_info.patients)
    log.info(
        "fold %s: train %d patients / %d samples, validation %d patients / %d samples",
        "final" if fold is None else fold,
        len(train_info.patients),
        train_info.samples,
        len(val_info.patients),
        val_info.samples,
    )
    return train, val, train_info, val_info
