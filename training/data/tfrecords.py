"""TFRecord shards grouped by patient, and the matching parser.

A patient's samples always land in one shard: the shard is a stable hash of the patient ID
(sha1, not Python's salted ``hash``), so shards can be written in one streaming pass in any
case order, and a split can read only the shards that hold its patients.

Record features:
  ``image``      float32 raw bytes (little-endian), exactly the ``preprocess`` output
  ``shape``      int64 list, the image shape ((rows, cols, ch) or (z, y, x, ch))
  ``label``      int64 0/1
  ``patient_id`` bytes; ``case_id`` bytes (series UID / file stem)
  ``position``   int64: slice index (2D) or first slice of the window (3D), in preprocessed slices
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from training.tfenv import tf

log = logging.getLogger(__name__)

SHARD_GLOB = "shard-*.tfrecord"


def shard_of(patient_id: str, n_shards: int) -> int:
    """The shard that holds every sample of ``patient_id`` (stable across runs and machines)."""
    digest = hashlib.sha1(patient_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n_shards


def shard_name(i: int, n_shards: int) -> str:
    return f"shard-{i:05d}-of-{n_shards:05d}.tfrecord"


def encode_example(image: npt.NDArray[np.float32], label: int, patient_id: str, case_id: str, position: int) -> bytes:
    img = np.ascontiguousarray(image, dtype="<f4")
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[img.tobytes()])),
        "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=list(img.shape))),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "patient_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[patient_id.encode("utf-8")])),
        "case_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[case_id.encode("utf-8")])),
        "position": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(position)])),
    }
    return bytes(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


class PatientShardWriter:
    """``n_shards`` open TFRecord writers; each sample goes to its patient's shard."""

    def __init__(self, out_dir: Path, n_shards: int, compression: str = "") -> None:
        if n_shards < 1:
            raise ValueError("n_shards must be >= 1")
        self.out_dir = out_dir
        self.n_shards = n_shards
        self.compression = compression
        out_dir.mkdir(parents=True, exist_ok=True)
        self.paths = [out_dir / shard_name(i, n_shards) for i in range(n_shards)]
        options = tf.io.TFRecordOptions(compression_type=compression or None)
        self._writers = [tf.io.TFRecordWriter(str(p), options=options) for p in self.paths]
        self.counts = [0] * n_shards

    def write(self, image: npt.NDArray[np.float32], label: int, patient_id: str, case_id: str, position: int) -> int:
        i = shard_of(patient_id, self.n_shards)
        self._writers[i].write(encode_example(image, label, patient_id, case_id, position))
        self.counts[i] += 1
        return i

    def close(self) -> None:
        for w in self._writers:
            w.close()

    def __enter__(self) -> PatientShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "shape": tf.io.VarLenFeature(tf.int64),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "patient_id": tf.io.FixedLenFeature([], tf.string),
    "case_id": tf.io.FixedLenFeature([], tf.string),
    "position": tf.io.FixedLenFeature([], tf.int64),
}


def parse_example(serialized: Any, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """Graph-mode parser: a dict with ``image`` (float32 of ``image_shape``), ``label`` and IDs."""
    ex = tf.io.parse_single_example(serialized, _FEATURES)
    image = tf.reshape(tf.io.decode_raw(ex["image"], tf.float32, little_endian=True), image_shape)
    return {
        "image": image,
        "label": tf.cast(ex["label"], tf.int32),
        "patient_id": ex["patient_id"],
        "case_id": ex["case_id"],
        "position": ex["position"],
    }


def read_examples(paths: list[Path], image_shape: tuple[int, ...], compression: str = "") -> list[dict[str, Any]]:
    """Eagerly read every record (tests and small tools; the pipeline streams instead)."""
    ds = tf.data.TFRecordDataset([str(p) for p in paths], compression_type=compression or None)
    out: list[dict[str, Any]] = []
    for rec in ds:
        ex = parse_example(rec, image_shape)
        out.append(
            {
                "image": ex["image"].numpy(),
                "label": int(ex["label"]),
                "patient_id": ex["patient_id"].numpy().decode(),
                "case_id": ex["case_id"].numpy().decode(),
                "position": int(ex["position"]),
            }
        )
    return out
