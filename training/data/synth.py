"""`medclf-train synth`: many phantoms -> DICOM series folders with ground-truth sidecars.

Layout (one study per patient, one CT series per study)::

    out/<patient_id>/CT/CT0001.dcm ...     the series
    out/<patient_id>/truth.json            labels (training.data.truth)
    out/synth_index.json                   one line per case: patient, label, UIDs, spacing

Spacing varies per phantom (pixel spacing and slice thickness jitter around the value that
makes ``shape`` cover a chest), so models do not learn one grid.  UIDs derive from the seed,
so running the same command twice produces byte-identical files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian

from medclf_node.synthetic.dicom_writer import default_origin, derived_uid, write_ct_series
from medclf_node.synthetic.phantoms import Phantom, default_spacing, make_phantom
from training.data.readers import Candidate, Case
from training.data.truth import TRUTH_FILENAME, truth_for_phantom, write_truth

log = logging.getLogger(__name__)

SERIES_DIRNAME = "CT"
INDEX_FILENAME = "synth_index.json"


@dataclass(frozen=True)
class SynthCase:
    """What was written for one phantom."""

    patient_id: str
    seed: int
    label: int
    n_nodules: int
    series_dir: str
    truth_path: str
    study_instance_uid: str
    series_instance_uid: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]


def case_spacing(seed: int, shape: tuple[int, int, int], jitter: float) -> tuple[float, float, float]:
    """Per-case spacing: the chest-covering default, each of (slice, pixel) scaled by 1 +- jitter."""
    base = default_spacing(shape)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5BAC]))
    fz, fxy = (1.0 + rng.uniform(-jitter, jitter, size=2)).tolist()
    return (round(base[0] * fz, 3), round(base[1] * fxy, 4), round(base[2] * fxy, 4))


def iter_synthesize(
    out_dir: Path,
    count: int,
    *,
    seed: int = 0,
    shape: tuple[int, int, int] = (64, 128, 128),
    spacing_jitter: float = 0.15,
    positive_fraction: float | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Iterator[SynthCase]:
    """Write ``count`` cases (seeds ``seed .. seed+count-1``), yielding each as it is done.

    ``positive_fraction`` None lets each seed decide (about half positive); otherwise case ``i``
    is positive for the first ``round(count * fraction)`` of a seeded permutation.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    positives: set[int] | None = None
    if positive_fraction is not None:
        perm = np.random.default_rng(seed).permutation(count)
        positives = {int(i) for i in perm[: int(round(count * positive_fraction))]}
    for i in range(count):
        case_seed = seed + i
        nodules: int | None = None
        if positives is not None:
            nodules = int(np.random.default_rng(case_seed).integers(1, 4)) if i in positives else 0
        sp = case_spacing(case_seed, shape, spacing_jitter)
        ph = make_phantom(case_seed, shape=shape, spacing=sp, nodules=nodules)
        case_dir = out_dir / ph.patient_id
        series_dir = case_dir / SERIES_DIRNAME
        origin = default_origin(ph.shape, ph.spacing)
        uid_seed = f"medclf-synth/{case_seed}"
        study_uid, series_uid = derived_uid(uid_seed, "study"), derived_uid(uid_seed, "series-1")
        write_ct_series(
            ph.hu,
            ph.spacing,
            series_dir,
            patient_id=ph.patient_id,
            study_uid=study_uid,
            series_uid=series_uid,
            transfer_syntax=transfer_syntax,
            origin=origin,
            uid_seed=uid_seed,
            accession_number=f"SYN{case_seed:07d}",
        )
        truth = truth_for_phantom(ph, origin=origin, study_instance_uid=study_uid, series_instance_uid=series_uid)
        truth_path = write_truth(truth, case_dir / TRUTH_FILENAME)
        yield SynthCase(
            patient_id=ph.patient_id,
            seed=case_seed,
            label=ph.label,
            n_nodules=len(ph.nodules),
            series_dir=str(series_dir.relative_to(out_dir)),
            truth_path=str(truth_path.relative_to(out_dir)),
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            spacing=ph.spacing,
            shape=ph.shape,
        )


def write_index(out_dir: Path, cases: list[SynthCase]) -> Path:
    path = out_dir / INDEX_FILENAME
    path.write_text(json.dumps([asdict(c) for c in cases], indent=1) + "\n", encoding="utf-8")
    return path


def phantom_case(ph: Phantom) -> Case:
    """An in-memory :class:`Case` for a phantom (no DICOM round trip; HU not rounded)."""
    return Case(
        hu=ph.hu,
        spacing=ph.spacing,
        patient_id=ph.patient_id,
        case_id=ph.patient_id,
        source=f"phantom:{ph.seed}",
        label=ph.label,
        slice_labels=ph.slice_labels,
        candidates=tuple(
            Candidate((float(z), float(y), float(x)), n.radius_mm, 1) for n in ph.nodules for z, y, x in [n.center_zyx]
        ),
    )
