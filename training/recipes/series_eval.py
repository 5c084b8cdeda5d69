"""Held-out series for the recipe's evaluation, and per-slice scores the way the node computes them.

The node (``medclf_node.inference.predict``) resamples a volume, builds every 2.5D input with
``medclf_node.preprocess.slices_2d``, runs the runtime and aggregates the per-slice scores.
:func:`slice_scores` does the same up to the aggregation, so the recipe can try aggregations and
thresholds on validation without re-running the model; the recipe then checks that the node's
``predict_series`` gives the same series probability on every test series.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from medclf_node.domain import Volume
from medclf_node.inference.manifest import OutputSpec
from medclf_node.inference.predict import SLICE_CHUNK, output_to_probability
from medclf_node.inference.runtime import Runtime
from medclf_node.preprocess import PreprocessSpec, slices_2d
from training.recipes.phantom_sets import SplitPlan, model_slice_labels, parallel_map, phantom_for

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class EvalSeries:
    """One held-out series: HU stored as int16 (as a CT's pixel data is), labels on the model grid."""

    patient_id: str
    seed: int
    label: int
    hu: npt.NDArray[np.int16]
    spacing: tuple[float, float, float]
    slice_labels: npt.NDArray[np.uint8]
    ambiguous: npt.NDArray[np.bool_]

    def volume(self) -> Volume:
        """The series as the node's ingest would hand it over (geometry beyond spacing is not used)."""
        aff = np.diag([self.spacing[0], self.spacing[1], self.spacing[2], 1.0])
        return Volume(
            array=self.hu.astype(np.float32),
            spacing=self.spacing,
            affine=aff,
            slice_refs=(),
            study_instance_uid=f"2.25.{self.seed + 1}",
            series_instance_uid=f"2.25.{self.seed + 2}",
        )


def _one(args: tuple[SplitPlan, int, PreprocessSpec]) -> EvalSeries:
    plan, seed, spec = args
    ph = phantom_for(plan, seed)
    labels, ambiguous = model_slice_labels(ph, spec)
    hu = np.rint(ph.hu).astype(np.int16)
    return EvalSeries(ph.patient_id, seed, ph.label, hu, ph.spacing, labels, ambiguous)


def build_eval_series(plan: SplitPlan, spec: PreprocessSpec, workers: int = 1) -> list[EvalSeries]:
    """Render every phantom of ``plan`` (deterministic under its seeds)."""
    out = list(parallel_map(_one, [(plan, s, spec) for s in plan.seeds()], workers))
    log.info("eval split %s: %d series, %d positive", plan.name, len(out), sum(s.label for s in out))
    return out


def slice_scores(runtime: Runtime, spec: PreprocessSpec, output: OutputSpec, series: EvalSeries) -> F32:
    """P(positive) for every model slice of ``series`` (model grid, before aggregation)."""
    vol = series.volume()
    x_all = slices_2d(vol.array, vol.spacing, spec)
    out = np.empty(len(x_all), np.float32)
    for start in range(0, len(x_all), SLICE_CHUNK):
        stop = min(len(x_all), start + SLICE_CHUNK)
        out[start:stop] = output_to_probability(runtime.predict(x_all[start:stop]), output)
    return out
