"""`medclf-train convert`: cases -> preprocessed samples -> patient-grouped TFRecord shards.

Samples are made by the node's ``medclf_node.preprocess`` (``slices_2d`` / ``volume_3d``), the
same code that runs at inference, so a record's pixels equal what the node would feed the
model for that slice or window.

* 2D / 2.5D: one sample per slice (every n-th negative slice with ``negative_slice_stride``),
  labelled by the case's per-slice labels (mapped to resampled slices when
  ``resample_z``).  Neighbouring slices or several HU windows become channels, as the spec says.
* 3D: the volume is resampled once, then windows of the spec's depth slide along z with a
  configurable stride, plus extra jittered windows centred on each positive candidate.  A
  window is positive when a positive candidate's centre lies inside it.

A ``dataset.json`` summary (patients, samples, class balance, shard contents, the spec) is
written next to the shards; ``training.data.pipeline`` reads it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from medclf_node.preprocess import PreprocessSpec, output_length, resample, slices_2d, volume_3d
from training.data.config import ConvertConfig, SampleSection
from training.data.readers import Case

log = logging.getLogger(__name__)

SUMMARY_FILENAME = "dataset.json"
SUMMARY_SCHEMA = "medclf-dataset/1"


class SkipCase(Exception):
    """This case cannot give labelled samples (the reason is the message)."""


@dataclass(frozen=True)
class Sample:
    image: npt.NDArray[np.float32]
    label: int
    position: int


def image_shape(spec: PreprocessSpec) -> tuple[int, ...]:
    """Shape of one sample's image for ``spec``."""
    return (*spec.input_shape, spec.channels)


def _slice_labels_2d(case: Case, spec: PreprocessSpec) -> npt.NDArray[np.uint8]:
    n = case.shape[0]
    if case.slice_labels is not None:
        labels = np.asarray(case.slice_labels, dtype=np.uint8)
    elif case.label == 0:
        labels = np.zeros(n, dtype=np.uint8)
    elif case.label is None:
        raise SkipCase("no labels")
    else:
        raise SkipCase("positive case without per-slice labels cannot give 2D samples")
    if spec.target_spacing is None or not spec.resample_z:
        return labels
    s_in, s_out = case.spacing[0], spec.target_spacing[0]
    pos = np.minimum(np.arange(output_length(n, s_in, s_out)) * (s_out / s_in), n - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(np.ceil(pos).astype(int), n - 1)
    return np.maximum(labels[lo], labels[hi])


def samples_2d(case: Case, spec: PreprocessSpec, cfg: SampleSection) -> Iterator[Sample]:
    """Slice samples of one case (see module doc)."""
    labels = _slice_labels_2d(case, spec)
    neg = np.flatnonzero(labels == 0)
    keep = np.sort(np.concatenate([np.flatnonzero(labels == 1), neg[:: cfg.negative_slice_stride]]))
    for b in range(0, len(keep), cfg.batch_slices):
        idx = keep[b : b + cfg.batch_slices]
        images = slices_2d(case.hu, case.spacing, spec, indices=idx)
        for k, img in zip(idx, images, strict=True):
            yield Sample(img, int(labels[k]), int(k))


def _window_starts(n: int, depth: int, stride: int) -> list[int]:
    if n <= depth:
        return [0]
    starts = list(range(0, n - depth + 1, stride))
    if starts[-1] != n - depth:
        starts.append(n - depth)
    return starts


def samples_3d(case: Case, spec: PreprocessSpec, cfg: SampleSection, rng: np.random.Generator) -> Iterator[Sample]:
    """Sub-volume samples of one case (see module doc)."""
    src_sp = case.spacing
    if spec.target_spacing is not None:
        vol = resample(case.hu, src_sp, spec.target_spacing)
        sp = tuple(float(v) for v in spec.target_spacing)
    else:
        vol, sp = case.hu, src_sp
    window_spec = spec.model_copy(update={"target_spacing": None})
    n, depth = vol.shape[0], spec.input_shape[0]
    scale = src_sp[0] / sp[0]  # input slice index -> resampled slice index
    cand_z = [c.center_zyx[0] * scale for c in case.candidates if c.label == 1]
    pos_z = list(cand_z)
    if not pos_z and case.slice_labels is not None and case.slice_labels.any():
        pos_z = [float(k) * scale for k in np.flatnonzero(case.slice_labels)]
    if not pos_z and case.label is None:
        raise SkipCase("no labels")
    if not pos_z and case.label == 1 and n > depth:
        raise SkipCase("positive case without candidate positions cannot label sub-volume windows")
    pz = np.asarray(pos_z, dtype=float)

    def label_of(start: int) -> int:
        if n <= depth:
            return int(bool(pz.size) or case.label == 1)
        return int(bool(np.any((pz >= start - 0.5) & (pz < start + depth - 0.5))))

    starts = _window_starts(n, depth, cfg.window_stride or max(1, depth // 2))
    extra: list[int] = []
    if n > depth:
        for z in cand_z:
            for _ in range(cfg.positive_windows_per_candidate):
                j = int(rng.integers(-cfg.positive_jitter, cfg.positive_jitter + 1)) if cfg.positive_jitter else 0
                extra.append(int(np.clip(round(z - depth / 2) + j, 0, n - depth)))
    for s in starts + extra:
        yield Sample(volume_3d(vol[s : s + depth], sp, window_spec), label_of(s), s)


def case_samples(case: Case, spec: PreprocessSpec, cfg: SampleSection, rng: np.random.Generator) -> Iterator[Sample]:
    if spec.mode == "3d":
        return samples_3d(case, spec, cfg, rng)
    return samples_2d(case, spec, cfg)


def convert(
    cases: Iterable[Case], out_dir: Path, cfg: ConvertConfig, *, total: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Write shards + ``dataset.json`` for ``cases``; returns the summary.

    ``progress``: a tqdm bar on stderr; None shows it only when stderr is a terminal (quiet in logs
    and CI).  Each patient's entry records the ``sources`` (paths) of its cases, so splits that
    follow the layout of a download (the LUNA16 ``subsetN`` folds) can be made from the summary.
    """
    from training.data.tfrecords import PatientShardWriter  # TensorFlow only when writing

    spec = cfg.preprocess
    conv = cfg.convert
    rng = np.random.default_rng(conv.seed)
    patients: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, str]] = []
    shard_pos = [0] * conv.shards
    out_dir.mkdir(parents=True, exist_ok=True)
    with PatientShardWriter(out_dir, conv.shards, conv.compression) as writer:
        bar = tqdm(cases, total=total, unit="case", disable=None if progress is None else not progress,
                   desc="convert")
        for case in bar:
            try:
                samples = list(case_samples(case, spec, conv.samples, rng))
            except SkipCase as exc:
                if not conv.samples.skip_unlabelled:
                    raise
                log.warning("skip %s (%s): %s", case.case_id, case.source, exc)
                skipped.append({"case_id": case.case_id, "patient_id": case.patient_id, "reason": str(exc)})
                continue
            info = patients.setdefault(
                case.patient_id,
                {"shard": None, "label": 0, "samples": 0, "positives": 0, "cases": [], "sources": []},
            )
            for s in samples:
                shard = writer.write(s.image, s.label, case.patient_id, case.case_id, s.position)
                shard_pos[shard] += s.label
                info["shard"] = shard
            info["samples"] += len(samples)
            info["positives"] += sum(s.label for s in samples)
            info["label"] = max(int(info["label"]), int(case.label or 0), int(any(s.label for s in samples)))
            info["cases"].append(case.case_id)
            info["sources"].append(str(case.source))
            bar.set_postfix(patients=len(patients), samples=sum(writer.counts))
        shard_counts = list(writer.counts)
        shard_paths = [p.name for p in writer.paths]
    n_samples = sum(shard_counts)
    n_pos = sum(shard_pos)
    shards = [
        {
            "file": shard_paths[i],
            "samples": shard_counts[i],
            "positives": shard_pos[i],
            "patients": sorted(p for p, v in patients.items() if v["shard"] == i),
        }
        for i in range(conv.shards)
    ]
    summary: dict[str, Any] = {
        "schema": SUMMARY_SCHEMA,
        "preprocess": spec.model_dump(mode="json"),
        "image_shape": list(image_shape(spec)),
        "compression": conv.compression,
        "config": conv.model_dump(mode="json"),
        "totals": {
            "patients": len(patients),
            "positive_patients": sum(1 for v in patients.values() if v["label"]),
            "cases": sum(len(v["cases"]) for v in patients.values()),
            "samples": n_samples,
            "positives": n_pos,
            "negatives": n_samples - n_pos,
            "positive_fraction": (n_pos / n_samples) if n_samples else math.nan,
            "skipped_cases": len(skipped),
        },
        "shards": shards,
        "patients": dict(sorted(patients.items())),
        "skipped": skipped,
    }
    path = out_dir / SUMMARY_FILENAME
    path.write_text(json.dumps(summary, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    log.info(
        "wrote %d samples (%d positive) of %d patients into %d shards in %s",
        n_samples,
        n_pos,
        len(patients),
        conv.shards,
        out_dir,
    )
    return summary


def load_summary(tfrecord_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((Path(tfrecord_dir) / SUMMARY_FILENAME).read_text(encoding="utf-8"))
    if data.get("schema") != SUMMARY_SCHEMA:
        raise ValueError(f"{tfrecord_dir}: not a medclf dataset summary (schema {data.get('schema')!r})")
    return data
