"""Ground-truth sidecar files for synthetic (and other labelled) CT series.

A series folder carries no labels, so each synthesized series gets a JSON sidecar with the
series label, nodule centres (voxel and patient LPS mm) and radii, and per-slice labels.
Readers validate it on load, so a hand-edited sidecar with a typo fails loudly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medclf_node.synthetic.dicom_writer import voxel_to_lps
from medclf_node.synthetic.phantoms import SLICE_LABEL_MIN_SECTION, Phantom

log = logging.getLogger(__name__)

TRUTH_SCHEMA = "medclf-truth/1"
TRUTH_FILENAME = "truth.json"


class NoduleTruth(BaseModel):
    """One nodule: centre voxel (slice, row, column), centre in patient LPS mm, radius."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    center_zyx: tuple[int, int, int]
    center_lps_mm: tuple[float, float, float]
    radius_mm: float = Field(gt=0)
    kind: Literal["solid", "ground_glass", "unknown"] = "unknown"
    hu: float | None = None


class SeriesTruth(BaseModel):
    """Labels of one series; ``slice_labels`` is indexed like the (canonical) volume: slice 0 most superior."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_id: str = Field(TRUTH_SCHEMA, alias="schema")
    patient_id: str
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    label: int = Field(ge=0, le=1)
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin_lps_mm: tuple[float, float, float]
    nodules: tuple[NoduleTruth, ...] = ()
    slice_labels: tuple[int, ...]
    slice_label_rule: str = (
        f"slice positive when its cross-section of a nodule has radius >= {SLICE_LABEL_MIN_SECTION} x nodule radius"
    )
    seed: int | None = None

    @model_validator(mode="after")
    def _check(self) -> SeriesTruth:
        if self.schema_id != TRUTH_SCHEMA:
            raise ValueError(f"unknown truth schema {self.schema_id!r}, expected {TRUTH_SCHEMA!r}")
        if len(self.slice_labels) != self.shape[0]:
            raise ValueError(f"{len(self.slice_labels)} slice labels for {self.shape[0]} slices")
        if self.nodules and self.label == 0:
            raise ValueError("label is 0 but nodules are listed")
        return self


def truth_for_phantom(
    phantom: Phantom,
    *,
    origin: Sequence[float],
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> SeriesTruth:
    """The sidecar content for a phantom written with ``origin`` (LPS of voxel 0,0,0)."""
    org = (float(origin[0]), float(origin[1]), float(origin[2]))
    return SeriesTruth(
        patient_id=phantom.patient_id,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        label=phantom.label,
        shape=phantom.shape,
        spacing=phantom.spacing,
        origin_lps_mm=org,
        nodules=tuple(
            NoduleTruth(
                center_zyx=n.center_zyx,
                center_lps_mm=voxel_to_lps(n.center_zyx, phantom.spacing, org),
                radius_mm=n.radius_mm,
                kind=n.kind,
                hu=n.hu,
            )
            for n in phantom.nodules
        ),
        slice_labels=tuple(int(v) for v in phantom.slice_labels),
        seed=phantom.seed,
    )


def write_truth(truth: SeriesTruth, path: Path | str) -> Path:
    """Write the sidecar atomically (a half-written label file is worse than none)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(truth.model_dump(mode="json", by_alias=True), indent=1) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p


def read_truth(path: Path | str) -> SeriesTruth:
    return SeriesTruth.model_validate_json(Path(path).read_text(encoding="utf-8"))
