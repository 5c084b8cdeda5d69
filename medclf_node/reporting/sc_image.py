"""An image model's result as a Secondary Capture key image: the key 2D image itself (colour
photographs stay in colour), its heat map where the model looked (positive results only, on the
absolute scale of :mod:`.sc`), and a banner with the grade or the findings and the disclaimer.

The key image is the one the series summary came from (the worst grade, the most probable
finding).  The SC joins the source study as a new series with deterministic UIDs.
"""

from __future__ import annotations

import logging
import math

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from medclf_node.domain import Image2D, ImageModelResult, ImageOutcome, NodeIdentity
from medclf_node.reporting.demographics import carried, shorten
from medclf_node.reporting.sc import (
    HEAT_ALPHA,
    HEAT_FLOOR,
    MIN_WIDTH,
    SC_SERIES_NUMBER,
    _fit_heatmap,
    _font,
    _source_reference,
    colormap,
    render_banner,
)
from medclf_node.reporting.sr import DISCLAIMER, fit_bytes, format_probability
from medclf_node.reporting.uids import result_uids

log = logging.getLogger(__name__)

UInt8Array = npt.NDArray[np.uint8]
LOSSY_JPEG = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})


def p_text(p: float) -> str:
    """"p = 0.998", or "p > 0.999" / "p < 0.001" at the ends."""
    text = format_probability(p)
    return f"p {text}" if text[0] in "<>" else f"p = {text}"


def outcome_line(result: ImageModelResult, outcome: ImageOutcome) -> str:
    """The conclusion in one line: the class (grade) with its probability, or each finding."""
    if result.kind == "multiclass":
        c = outcome.predicted_class
        return f"{result.concept.meaning}: {c.code.meaning}  {p_text(c.probability)}"
    return "; ".join(
        f"{f.code.meaning}: {'PRESENT' if f.present else 'absent'} {p_text(f.probability)}"
        f" (thr {format_probability(f.threshold)})" for f in outcome.findings
    )


def image_banner_lines(result: ImageModelResult) -> tuple[str, ...]:
    """Banner text: the series conclusion (with the image count), the disclaimer, the model."""
    n = len(result.images)
    scope = f"series of {n} images, key image {result.key_image + 1}" if n > 1 else "one image"
    model = f"model {result.model_name} {result.model_version}; {scope}"
    return (outcome_line(result, result.summary), DISCLAIMER, model)


def _rgb(image: Image2D) -> UInt8Array:
    px = np.clip(np.rint(np.asarray(image.pixels, np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(px, 3, axis=2) if px.shape[2] == 1 else px


def overlay_rgb(rgb: UInt8Array, heatmap: npt.NDArray[np.float32] | None) -> UInt8Array:
    """``rgb`` with the heat map blended in where it is hot (absolute scale, as :func:`.sc.overlay_heatmap`)."""
    if heatmap is None:
        return rgb
    h = _fit_heatmap(heatmap, (rgb.shape[0], rgb.shape[1]))
    alpha = (HEAT_ALPHA * np.clip((h - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0))[..., None]
    out = (1.0 - alpha) * rgb.astype(np.float64) + alpha * colormap(h).astype(np.float64)
    return np.asarray(np.clip(np.rint(out), 0, 255), dtype=np.uint8)


def render_image_key(image: Image2D, result: ImageModelResult) -> UInt8Array:
    """Banner on top, the (enlarged when small) key image with its heat map, a footer legend."""
    key = result.images[result.key_image]
    heat = key.heatmap if result.summary.positive else None
    rgb = overlay_rgb(_rgb(image), heat)
    scale = max(1, math.ceil(MIN_WIDTH / rgb.shape[1]))
    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    width = rgb.shape[1]
    banner = render_banner(image_banner_lines(result), width, result.summary.positive)
    font_size = max(10, width // 48)
    footer_h = int(math.ceil(font_size * 1.6))
    canvas = np.zeros((banner.shape[0] + rgb.shape[0] + footer_h, width, 3), np.uint8)
    canvas[: banner.shape[0]] = banner
    canvas[banner.shape[0] : banner.shape[0] + rgb.shape[0]] = rgb
    img = Image.fromarray(canvas)
    legend = (f"heat = drop in the score when the region is hidden; shown from {HEAT_FLOOR:g}" if heat is not None
              else "no heat map" + (": negative result" if not result.summary.positive else ""))
    ImageDraw.Draw(img).text((4, banner.shape[0] + rgb.shape[0] + 2), legend, fill=(200, 200, 200),
                             font=_font(font_size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def build_image_sc(
    key_source: Dataset,
    image: Image2D,
    result: ImageModelResult,
    identity: NodeIdentity,
    *,
    series_number: int = SC_SERIES_NUMBER,
    generation: int = 0,
) -> hd.sc.SCImage:
    """The SC key image of an image model's result; ``key_source``/``image`` are the key image's
    header and decoded pixels (``result.images[result.key_image]``)."""
    src = carried(key_source)
    pixels = render_image_key(image, result)
    uids = result_uids(str(key_source.SeriesInstanceUID), result.model_name, result.model_version, "sc",
                       generation=generation)
    orientation = key_source.get("PatientOrientation")
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=key_source.StudyInstanceUID,
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=identity.manufacturer,
        patient_id=src.get("PatientID"),
        patient_name=src.get("PatientName"),
        patient_birth_date=src.get("PatientBirthDate"),
        patient_sex=src.get("PatientSex") or None,
        accession_number=src.get("AccessionNumber"),
        study_id=src.get("StudyID"),
        study_date=src.get("StudyDate"),
        study_time=src.get("StudyTime"),
        referring_physician_name=src.get("ReferringPhysicianName"),
        patient_orientation=("L", "F"),  # replaced below: the source's own, or empty (unknown)
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=shorten(f"{DISCLAIMER} key image ({result.model_name})", 64),
        manufacturer_model_name=identity.manufacturer,
        software_versions=identity.software_version,
        institution_name=identity.institution_name,
        specific_character_set="ISO_IR 192",
    )
    # a photograph has no patient axes the node could know; the banner sits above it, so the
    # source's row/column directions still hold for the picture
    sc.PatientOrientation = (list(orientation) if orientation is not None and len(orientation) == 2
                             else "")  # type: ignore[assignment]
    if src.get("BodyPartExamined"):
        sc.BodyPartExamined = src.BodyPartExamined
    lat = src.get("Laterality") or key_source.get("ImageLaterality")
    if lat in ("R", "L"):
        sc.Laterality = lat
    elif not src.get("BodyPartExamined"):
        sc.Laterality = ""  # 2C on a paired body part: with none known, present and empty
    sc.StationName = identity.device_name[:16]
    sc.SourceImageSequence = [_source_reference(key_source, None)]
    sc.DerivationDescription = fit_bytes(
        f"Key image {result.key_image + 1} of {len(result.images)}"
        + (f" with heat map of model {result.model_name} {result.model_version} (drop in the score when the "
           f"region is hidden, absolute scale from {HEAT_FLOOR:g})" if result.summary.positive
           and result.images[result.key_image].heatmap is not None else "")
        + f"; {DISCLAIMER}",
        1024,
    )
    sc.ImageComments = fit_bytes(" | ".join(image_banner_lines(result)), 10240)
    sc.BurnedInAnnotation = "NO"
    ts = str(getattr(getattr(key_source, "file_meta", None), "TransferSyntaxUID", "") or "")
    if key_source.get("LossyImageCompression") == "01" or ts in LOSSY_JPEG:
        sc.LossyImageCompression = "01"  # derived from lossy pixels stays lossy (PS3.3 C.7.6.1.1.5)
        sc.LossyImageCompressionMethod = key_source.get("LossyImageCompressionMethod") or "ISO_10918_1"
    else:
        sc.LossyImageCompression = "00"
    log.debug("built image SC %s for series %s (model %s)", uids.sop_instance_uid, key_source.SeriesInstanceUID,
              result.model_name)
    return sc


__all__ = ["build_image_sc", "image_banner_lines", "outcome_line", "render_image_key"]
