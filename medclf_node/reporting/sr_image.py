"""An image model's result on a series of 2D images as a TID 1500 Measurement Report.

Same frame as :mod:`.sr` (Comprehensive 3D SR in the source study, the node as device observer,
TID 4019 algorithm identification, every evaluated image as evidence), with groups per task kind:

* multiclass: per image one TID 1501 group whose coded qualitative evaluation is the predicted
  class (concept name: the manifest's ``labels.finding``, e.g. "Diabetic retinopathy"), with every
  class probability as a numeric measurement (concept name: the class code, unit {probability});
* multilabel and binary: per image one group per finding (finding code, Present/Absent, the
  probability, the finding's threshold among the algorithm parameters);
* then the series summary the same way (tracking identifier "... summary"), citing every image:
  the worst grade (ordinal) / most probable positive class, or per finding the highest
  probability (present when any image has it).

Each group's source image is its own image; the key image's headline NUM carries the heat-map
peak as a SCOORD POINT (what viewers draw) when there is a heat map.  A Comment repeats each
group's conclusion in words with the probability at the precision it has.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from medclf_node.domain import FindingScore, ImageModelResult, ImageOutcome, NodeIdentity
from medclf_node.reporting.demographics import shorten
from medclf_node.reporting.sr import (
    ABSENT,
    COMMENT,
    DISCLAIMER,
    PRESENT,
    PROBABILITY,
    PROBABILITY_UNIT,
    SR_SERIES_NUMBER,
    _evidence,
    _observation_context,
    coded,
    format_probability,
)
from medclf_node.reporting.uids import ResultVersion, derive_uid, result_uids

log = logging.getLogger(__name__)

# LOINC 18748-4 "Diagnostic imaging report" (the CT code of the volume SR does not fit photographs)
IMAGING_PROCEDURE = hd.sr.CodedConcept(value="18748-4", scheme_designator="LN", meaning="Diagnostic imaging report")


def heat_point(heatmap: npt.NDArray[np.float32] | None) -> tuple[float, float] | None:
    """(column, row) SCOORD image coordinates of the heat map's peak (pixel centre), or None."""
    if heatmap is None or float(np.max(heatmap)) <= 0.0:
        return None
    r, c = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return (float(c) + 0.5, float(r) + 0.5)


def _algorithm(result: ImageModelResult, identity: NodeIdentity, extra: Sequence[str]) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=result.model_name, version=result.model_version, parameters=list(extra) or None,
        manufacturer=identity.manufacturer,
    )


def _comment(text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=COMMENT, value=text[:1024],
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _region(source: Dataset, point: tuple[float, float] | None) -> list[hd.sr.CoordinatesForMeasurement] | None:
    if point is None:
        return None
    return [hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([point], dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )]


def _tracking(result: ImageModelResult, scope: str, what: str, label: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=derive_uid(scope, result.model_name, result.model_version, "image-finding", what),
        identifier=shorten(label, 64),
    )


def _multiclass_group(result: ImageModelResult, identity: NodeIdentity, outcome: ImageOutcome,
                      sources: Sequence[Dataset], scope: str, label: str,
                      point: tuple[float, float] | None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    predicted = outcome.predicted_class
    k = outcome.predicted
    params = [f"task=multiclass{' ordinal' if result.ordinal else ''}"]
    measurements = [
        hd.sr.Measurement(name=coded(c.code), value=float(c.probability), unit=PROBABILITY_UNIT,
                          referenced_coordinates=_region(sources[0], point) if i == k else None)
        for i, c in enumerate(outcome.classes)
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(result, scope, "class", f"{result.concept.meaning} {label}"),
        finding_type=coded(result.concept),
        algorithm_id=_algorithm(result, identity, params),
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=coded(result.concept), value=coded(predicted.code))],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources],
    )
    group[0].ContentSequence.append(_comment(
        f"{result.concept.meaning}: {predicted.code.meaning} "
        f"(AI result, p = {format_probability(predicted.probability)}"
        f"{', ' + label if label else ''})"))
    return group


def _finding_group(result: ImageModelResult, identity: NodeIdentity, finding: FindingScore,
                   sources: Sequence[Dataset], scope: str, label: str,
                   point: tuple[float, float] | None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    code = finding.code
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(result, scope, f"{code.scheme}:{code.value}", f"{code.meaning} {label}"),
        finding_type=coded(code),
        algorithm_id=_algorithm(result, identity, [f"operating threshold={finding.threshold:.6g}"]),
        measurements=[hd.sr.Measurement(name=PROBABILITY, value=float(finding.probability), unit=PROBABILITY_UNIT,
                                        referenced_coordinates=_region(sources[0], point))],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=coded(code),
                                                             value=PRESENT if finding.present else ABSENT)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources],
    )
    group[0].ContentSequence.append(_comment(
        f"{code.meaning}: {'present' if finding.present else 'absent'} (AI result, p = "
        f"{format_probability(finding.probability)}, threshold {finding.threshold:.3g}"
        f"{', ' + label if label else ''})"))
    return group


def _groups(result: ImageModelResult, identity: NodeIdentity, outcome: ImageOutcome, sources: Sequence[Dataset],
            scope: str, label: str, point: tuple[float, float] | None
            ) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    if result.kind == "multiclass":
        return [_multiclass_group(result, identity, outcome, sources, scope, label, point)]
    found = outcome.findings
    hot = max(range(len(found)), key=lambda j: (found[j].present, found[j].probability))
    return [_finding_group(result, identity, f, sources, scope, label, point if j == hot else None)
            for j, f in enumerate(outcome.findings)]


def image_sr_description(result: ImageModelResult) -> str:
    return shorten(f"{DISCLAIMER} ({result.model_name})", 64)


def build_image_sr(
    sources: Sequence[Dataset],
    result: ImageModelResult,
    identity: NodeIdentity,
    *,
    series_number: int = SR_SERIES_NUMBER,
    version: ResultVersion | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR for one image model's result on one series.

    ``sources[i]`` is the header of ``result.images[i]`` (pixel data not needed).  UIDs derive from
    the series, model and ``version`` as for volume results (:mod:`.uids`).
    """
    if len(sources) != len(result.images) or not sources:
        raise ValueError(f"{len(sources)} source header(s) for {len(result.images)} image result(s)")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    for outcome in result.images:
        assert outcome.ref is not None
        if outcome.ref.sop_instance_uid not in by_uid:
            raise ValueError(f"image {outcome.ref.sop_instance_uid} is not among the sources")
    if len({str(ds.StudyInstanceUID) for ds in sources}) != 1:
        raise ValueError("sources span several studies; one series' images are expected")
    series_uid = str(sources[0].SeriesInstanceUID)
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    several = len(result.images) > 1
    for i, outcome in enumerate(result.images):
        assert outcome.ref is not None
        ds = by_uid[outcome.ref.sop_instance_uid]
        lat = str(ds.get("ImageLaterality") or ds.get("Laterality") or "").strip()
        label = f"image {i + 1}" + (f" ({lat})" if lat else "")
        groups += _groups(result, identity, outcome, [ds], f"{series_uid}/{outcome.ref.sop_instance_uid}", label,
                          heat_point(outcome.heatmap))
    if several:
        rule = "worst grade" if result.kind == "multiclass" and result.ordinal else (
            "most probable class" if result.kind == "multiclass" else "any image")
        key_ds = by_uid[result.images[result.key_image].ref.sop_instance_uid]  # type: ignore[union-attr]
        ordered = [key_ds, *[ds for ds in sources if ds is not key_ds]]
        groups += _groups(result, identity, result.summary, ordered, f"{series_uid}/summary",
                          f"series summary, {rule}", None)
    version = version or ResultVersion()
    uids = result_uids(series_uid, result.model_name, result.model_version, "sr", generation=version.generation)
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(identity),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=_evidence(sources),
        content=report[0],
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=identity.manufacturer,
        institution_name=identity.institution_name,
        is_complete=True,
        is_final=False,
        series_description=image_sr_description(result),
        manufacturer_model_name=identity.manufacturer,
        software_versions=identity.software_version,
        specific_character_set="ISO_IR 192",
        previous_versions=version.predecessor_datasets() or None,
    )
    sr.StationName = identity.device_name[:16]
    log.debug("built image SR %s for series %s (model %s, %d image(s))", uids.sop_instance_uid, series_uid,
              result.model_name, len(result.images))
    return sr


__all__ = ["build_image_sr", "heat_point"]
