"""The classification result as a TID 1500 Measurement Report (Comprehensive 3D SR).

The SR joins the source study as a new series: viewers and PACS file it next to the images.
It states who concluded what: the node is the device observer, and one measurement group per
finding holds the model's TID 4019 algorithm identification (name, version, operating
threshold), the coded Present/Absent evaluation, the probability and the key slice. The
probability NUM carries the finding's image region: a SCOORD POINT INFERRED FROM the key image
(:mod:`.region`), and nothing else, because that is what viewers draw (OHIF skips a NUM whose
content is not a SCOORD, and shows a black viewport). Every evaluated instance is listed as
evidence, so the report says exactly which images it is about.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from medclf_node.domain import Code, ModelResult, NodeIdentity, SliceRef, Volume
from medclf_node.reporting.demographics import carried, shorten
from medclf_node.reporting.region import ImagePoint, locate_finding
from medclf_node.reporting.uids import ResultVersion, derive_uid, device_uid, result_uids

log = logging.getLogger(__name__)

DISCLAIMER = "AI result \u2014 not for primary diagnosis"

# SNOMED CT "Present (qualifier value)" / "Absent (qualifier value)". pydicom's code dictionary
# maps "Absent" to 272519000, which SNOMED names "Absence findings" (a grouper); 2667000 is the
# qualifier itself, as in HL7 value sets for present/absent.
PRESENT = hd.sr.CodedConcept(value="52101004", scheme_designator="SCT", meaning="Present")
ABSENT = hd.sr.CodedConcept(value="2667000", scheme_designator="SCT", meaning="Absent")
PROBABILITY = hd.sr.CodedConcept(*codes.DCM.Probability)
PROBABILITY_UNIT = hd.sr.CodedConcept(value="{probability}", scheme_designator="UCUM", meaning="probability")
COMMENT = hd.sr.CodedConcept(value="121106", scheme_designator="DCM", meaning="Comment")
# CID 100 "Quantitative Diagnostic Imaging Procedures"
CT_PROCEDURE = hd.sr.CodedConcept(*codes.LN.CTUnspecifiedBodyRegion)

SR_SERIES_NUMBER = 9901


def coded(code: Code) -> hd.sr.CodedConcept:
    """Our plain :class:`Code` as a highdicom concept."""
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def fit_bytes(text: str, limit: int = 64) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (VR length limits count bytes, and "—" is 3)."""
    data = text.encode("utf-8")[:limit]
    return data.decode("utf-8", errors="ignore")


def format_probability(p: float) -> str:
    """A probability with the precision a model's output has: three decimals, bounded at the ends.

    0.996 stays "0.996" (two decimals printed it as "1.00", which reads as certainty); values
    that round to 0 or 1 at three decimals are "< 0.001" / "> 0.999", never "0.000" / "1.000".
    """
    v = float(p)
    if v != v:  # NaN
        return "n/a"
    if v >= 0.9995:
        return "> 0.999"
    if v < 0.0005:
        return "< 0.001"
    return f"{v:.3f}"


def series_description(result: ModelResult, kind: str = "") -> str:
    """A result series' description (LO, at most 64 bytes), carrying the disclaimer; shortened at a
    word boundary (a model name that does not fit is dropped whole, never cut mid-word)."""
    return shorten(f"{DISCLAIMER}{kind} ({result.model_name})", 64)


def find_key_source(sources: Sequence[Dataset], result: ModelResult, key_ref: SliceRef | None) -> Dataset:
    """The source dataset of the key slice: the one ``key_ref`` names, else by slice index."""
    if key_ref is not None:
        for ds in sources:
            if ds.SOPInstanceUID == key_ref.sop_instance_uid:
                return ds
        raise ValueError(f"key SOP instance {key_ref.sop_instance_uid} is not among the evaluated sources")
    if not 0 <= result.key_slice_index < len(sources):
        raise ValueError(
            f"key_slice_index {result.key_slice_index} is outside the {len(sources)} evaluated sources; "
            "pass key_ref (Volume.slice_refs[key_slice_index]) when the volume was resampled"
        )
    return sources[result.key_slice_index]


# Type 2 patient/study attributes highdicom reads from the first evidence item without a default.
_TYPE2_HEADER = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)


def _evidence(sources: Sequence[Dataset]) -> list[Dataset]:
    """The sources as highdicom evidence; a first item missing Type 2 attributes gets them empty.

    Real scanners omit Type 2 attributes now and then; the SR must still be written.
    The caller's dataset is left untouched (the first item becomes a new Dataset sharing its
    elements; ``Dataset.copy()`` would share the element dict itself).
    """
    head = carried(sources[0])  # patient/study values valid for the SR (bad demographics never cost it)
    missing = [kw for kw in _TYPE2_HEADER if kw not in head]
    if missing:
        head = Dataset(dict(head.items()))
        for kw in missing:
            setattr(head, kw, None)
        log.debug("source %s lacks %s; written empty", head.SOPInstanceUID, ", ".join(missing))
    return [head, *sources[1:]]


def _observation_context(identity: NodeIdentity) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(identity.ae_title, identity.device_name),
        name=identity.device_name,
        manufacturer_name=identity.manufacturer,
        model_name=identity.manufacturer,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=device,
        )
    )


def _measurement_group(
    result: ModelResult,
    identity: NodeIdentity,
    source_series_uid: str,
    point: ImagePoint,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One TID 1501 group; TID 4019 sits in the group, the NUM holds only its image region."""
    finding = coded(result.finding)
    present = result.probability >= result.threshold
    if present != result.positive:
        log.warning(
            "model %s: positive=%s disagrees with probability %.4f vs threshold %.4f; "
            "the SR follows probability >= threshold",
            result.model_name, result.positive, result.probability, result.threshold,
        )
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.model_name,
        version=result.model_version,
        parameters=[f"operating threshold={result.threshold:.6g}"],
        manufacturer=identity.manufacturer,
    )
    frames = [point.frame_number] if point.frame_number is not None else None
    key_ref = hd.sr.SourceImageForMeasurementGroup.from_source_image(point.source, frames)
    region = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([[point.column, point.row]], dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion.from_source_image(point.source, frames),
    )
    tracking = hd.sr.TrackingIdentifier(
        uid=derive_uid(source_series_uid, result.model_name, result.model_version, "finding",
                       result.finding.scheme, result.finding.value),
        identifier=f"{result.finding.meaning} ({result.model_name})"[:64],
    )
    probability = hd.sr.Measurement(
        name=PROBABILITY,
        value=float(result.probability),
        unit=PROBABILITY_UNIT,
        referenced_coordinates=[region],
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=finding,
        algorithm_id=algorithm,
        measurements=[probability],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=finding, value=PRESENT if present else ABSENT)
        ],
        source_images=[key_ref],
    )
    # The coded evaluation in words, as a Comment (TID 1501 is extensible): OHIF labels a
    # measurement with its NUMs and its Comments only, so without it the viewer would show a
    # probability without saying of what. The probability is repeated here at the precision it has:
    # OHIF prints the NUM at two decimals (0.996 as "1.00", which reads as certainty).
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=COMMENT,
        value=f"{result.finding.meaning}: {'present' if present else 'absent'} "
              f"(AI result, p = {format_probability(result.probability)})",
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    ))
    return group


def build_sr(
    sources: Sequence[Dataset],
    result: ModelResult,
    identity: NodeIdentity,
    *,
    key_ref: SliceRef | None = None,
    series_number: int = SR_SERIES_NUMBER,
    version: ResultVersion | None = None,
    volume: Volume | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the SR for one model's result on one series.

    ``sources`` are the headers of every evaluated instance (pixel data not needed), in
    slice order; the key slice is ``sources[result.key_slice_index]`` unless ``key_ref``
    names it (pass ``Volume.slice_refs[key_slice_index]``: needed when the volume was
    resampled or the source is multi-frame, where it also gives the frame number).
    ``volume`` (the evaluated :class:`Volume`) gives the affine and slice shape that map the
    finding from the canonical key slice into source-image pixels; without it the canonical
    slice is taken to be the key source image (true only for head-first supine axial series).
    Series and SOP Instance UIDs are deterministic (see :mod:`.uids`); ``version`` (default: the
    first) gives the generation they derive from and the SR it replaces (Predecessor Documents).
    """
    if not sources:
        raise ValueError("build_sr needs at least one source instance as evidence")
    study_uids = {str(ds.StudyInstanceUID) for ds in sources}
    if len(study_uids) != 1:
        raise ValueError(f"sources span {len(study_uids)} studies; one series' instances are expected")
    source_series_uid = str(sources[0].SeriesInstanceUID)
    key_source = find_key_source(sources, result, key_ref)
    key_frame_number = key_ref.frame_number if key_ref is not None else None
    point = locate_finding(
        sources, key_source, key_frame_number, result,
        affine=volume.affine if volume is not None else None,
        slice_shape=(volume.shape[1], volume.shape[2]) if volume is not None else None,
    )
    version = version or ResultVersion()
    uids = result_uids(source_series_uid, result.model_name, result.model_version, "sr",
                       generation=version.generation)
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(identity),
        procedure_reported=CT_PROCEDURE,
        imaging_measurements=[
            _measurement_group(result, identity, source_series_uid, point)
        ],
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
        series_description=series_description(result),
        manufacturer_model_name=identity.manufacturer,
        software_versions=identity.software_version,
        specific_character_set="ISO_IR 192",
        previous_versions=version.predecessor_datasets() or None,
    )
    sr.StationName = identity.device_name[:16]
    log.debug("built SR %s for series %s (model %s %s)", uids.sop_instance_uid, source_series_uid,
              result.model_name, result.model_version)
    return sr
