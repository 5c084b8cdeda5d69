"""The classification result as a Secondary Capture key image, for viewers that cannot show SR.

One RGB picture says it all at a glance: the key slice in a lung window, the model's heat map
blended over it in colour where the model looked, and a banner with the finding, the
probability and "AI result — not for primary diagnosis". The image joins the source study as
a new series with deterministic UIDs, like the SR. numpy and Pillow only (no matplotlib).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from medclf_node.domain import ModelResult, NodeIdentity
from medclf_node.reporting.sr import DISCLAIMER, fit_bytes, series_description
from medclf_node.reporting.uids import result_uids

log = logging.getLogger(__name__)

LUNG_WINDOW = (-600.0, 1500.0)  # (center, width) in HU
SC_SERIES_NUMBER = 9902
MIN_WIDTH = 512  # smaller key slices are enlarged so the banner text stays readable
HEAT_FLOOR = 0.2  # heat below this leaves the grey image untouched
HEAT_ALPHA = 0.5  # opacity of the hottest overlay pixels

UInt8Array = npt.NDArray[np.uint8]
FloatArray = npt.NDArray[np.float32]

# A jet-like colour map: (position, R, G, B) anchors, linearly interpolated.
_CMAP_ANCHORS = np.array(
    [
        (0.000, 0, 0, 143),
        (0.125, 0, 0, 255),
        (0.375, 0, 255, 255),
        (0.625, 255, 255, 0),
        (0.875, 255, 0, 0),
        (1.000, 128, 0, 0),
    ],
    dtype=np.float64,
)


def apply_window(hu: npt.NDArray[np.floating], center: float, width: float) -> UInt8Array:
    """HU -> 0..255 grey with a linear window (values outside saturate)."""
    lo = center - width / 2.0
    scaled = (np.nan_to_num(np.asarray(hu, dtype=np.float64), nan=lo) - lo) / width
    return np.asarray(np.clip(np.rint(scaled * 255.0), 0, 255), dtype=np.uint8)


def colormap(values: npt.NDArray[np.floating]) -> UInt8Array:
    """Map values in [0, 1] to RGB (..., 3) uint8 with the jet-like anchor table."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    pos = _CMAP_ANCHORS[:, 0]
    channels = [np.interp(v, pos, _CMAP_ANCHORS[:, c]) for c in (1, 2, 3)]
    return np.asarray(np.rint(np.stack(channels, axis=-1)), dtype=np.uint8)


def _fit_heatmap(heatmap: FloatArray, shape: tuple[int, int]) -> npt.NDArray[np.float64]:
    """The heat map at the key slice's size (bilinear when the model's map is coarser)."""
    h = np.asarray(heatmap, dtype=np.float32)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be 2D (rows, columns), got shape {h.shape}")
    if h.shape != shape:
        img = Image.fromarray(h, mode="F").resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
        h = np.asarray(img, dtype=np.float32)
    return np.clip(np.nan_to_num(h.astype(np.float64)), 0.0, 1.0)


def overlay_heatmap(grey: UInt8Array, heatmap: FloatArray | None) -> UInt8Array:
    """RGB image: ``grey`` with the colour-mapped heat map blended in where it is hot."""
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float64)
    if heatmap is not None:
        h = _fit_heatmap(heatmap, (grey.shape[0], grey.shape[1]))
        alpha = HEAT_ALPHA * np.clip((h - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0)
        rgb = (1.0 - alpha[..., None]) * rgb + alpha[..., None] * colormap(h).astype(np.float64)
    return np.asarray(np.clip(np.rint(rgb), 0, 255), dtype=np.uint8)


def banner_lines(result: ModelResult) -> tuple[str, str, str]:
    """The banner text: finding and probability, the disclaimer, the model."""
    present = result.probability >= result.threshold
    return (
        f"{result.finding.meaning}: {'PRESENT' if present else 'ABSENT'} p={result.probability:.2f}",
        DISCLAIMER,
        f"model {result.model_name} {result.model_version}, threshold {result.threshold:.2f}",
    )


def _font_fitting(lines: tuple[str, ...], width: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font, as large as fits ``width`` (about 1/24 of the width at most)."""
    size = max(10, width // 24)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while True:
        font = ImageFont.load_default(size=size)
        widest = max(probe.textlength(t, font=font) for t in lines)
        if widest <= width * 0.96 or size <= 8 or not isinstance(font, ImageFont.FreeTypeFont):
            return font
        size -= 1


def render_banner(lines: tuple[str, ...], width: int, positive: bool) -> UInt8Array:
    """A dark strip with the text lines; the first line is red when present, green when absent."""
    font = _font_fitting(lines, width)
    size = font.size if isinstance(font, ImageFont.FreeTypeFont) else 11
    pad = max(4, int(size * 0.4))
    line_h = int(math.ceil(size * 1.25))
    img = Image.new("RGB", (width, pad * 2 + line_h * len(lines)), (24, 24, 24))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        text = line.replace("\u2014", "-")  # Pillow's default font has no em dash glyph
        colour = (255, 255, 255) if i else ((255, 80, 80) if positive else (120, 220, 120))
        draw.text((pad, pad + i * line_h), text, fill=colour, font=font)
    return np.asarray(img, dtype=np.uint8)


def render_key_image(key_hu: npt.NDArray[np.floating], result: ModelResult) -> UInt8Array:
    """The full SC picture: banner on top of the windowed, heat-mapped key slice."""
    hu = np.asarray(key_hu, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"key_hu must be a 2D slice, got shape {hu.shape}")
    rgb = overlay_heatmap(apply_window(hu, *LUNG_WINDOW), result.heatmap)
    scale = max(1, math.ceil(MIN_WIDTH / rgb.shape[1]))
    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    present = result.probability >= result.threshold
    banner = render_banner(banner_lines(result), rgb.shape[1], present)
    return np.ascontiguousarray(np.concatenate([banner, rgb], axis=0))


def _orientation_letters(vector: npt.NDArray[np.float64]) -> str:
    """DICOM patient-orientation letters of a direction in LPS (e.g. (1,0,0) -> 'L')."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(vector))
    out = ""
    for axis in order:
        if abs(vector[axis]) > 0.25:
            out += letters[axis][0 if vector[axis] > 0 else 1]
    return out or "L"


def patient_orientation(source: Dataset) -> tuple[str, str]:
    """(row direction, column direction) letters from ImageOrientationPatient; axial if absent."""
    iop = source.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return ("L", "P")
    v = np.asarray([float(x) for x in iop], dtype=np.float64)
    return (_orientation_letters(v[:3]), _orientation_letters(v[3:]))


def slice_orientation(affine: npt.NDArray[np.floating]) -> tuple[str, str]:
    """(row direction, column direction) letters of an axial slice ``volume.array[k]``.

    The key image shows a slice of the node's volume, not the source image: along a row the
    column index grows (``affine[:3, 2]``), down a column the row index (``affine[:3, 1]``).
    For the canonical volume that is ("L", "P") whatever the patient position or plane.
    """
    a = np.asarray(affine, dtype=np.float64)
    return (_orientation_letters(a[:3, 2] / np.linalg.norm(a[:3, 2])),
            _orientation_letters(a[:3, 1] / np.linalg.norm(a[:3, 1])))


def _source_reference(source: Dataset, frame_number: int | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame_number is not None:
        item.ReferencedFrameNumber = frame_number
    purpose = Dataset()
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


def build_sc(
    key_source: Dataset,
    key_hu: npt.NDArray[np.floating],
    result: ModelResult,
    identity: NodeIdentity,
    *,
    key_frame_number: int | None = None,
    orientation: tuple[str, str] | None = None,
    series_number: int = SC_SERIES_NUMBER,
    generation: int = 0,
) -> hd.sc.SCImage:
    """Build the Secondary Capture key image for one model's result on one series.

    ``key_source`` is the header of the key slice's source instance (patient, study and
    series are taken from it); ``key_hu`` its pixels in HU. BodyPartExamined is copied when
    the source has it and is not required. ``key_frame_number`` (1-based) is for a
    multi-frame source. ``orientation``: the PatientOrientation of ``key_hu`` when it is a slice
    of the reoriented volume (:func:`slice_orientation`); default: the source image's own.
    ``generation``: the series' result generation the UIDs derive from (see :mod:`.uids`).
    """
    pixels = render_key_image(key_hu, result)
    uids = result_uids(str(key_source.SeriesInstanceUID), result.model_name, result.model_version, "sc",
                       generation=generation)
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
        patient_id=key_source.get("PatientID"),
        patient_name=key_source.get("PatientName"),
        patient_birth_date=key_source.get("PatientBirthDate"),
        patient_sex=key_source.get("PatientSex") or None,
        accession_number=key_source.get("AccessionNumber"),
        study_id=key_source.get("StudyID"),
        study_date=key_source.get("StudyDate"),
        study_time=key_source.get("StudyTime"),
        referring_physician_name=key_source.get("ReferringPhysicianName"),
        patient_orientation=orientation or patient_orientation(key_source),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description(result, " key image"),
        manufacturer_model_name=identity.manufacturer,
        software_versions=identity.software_version,
        institution_name=identity.institution_name,
        specific_character_set="ISO_IR 192",
    )
    if key_source.get("BodyPartExamined"):
        sc.BodyPartExamined = key_source.BodyPartExamined
    if key_source.get("Laterality"):
        sc.Laterality = key_source.Laterality
    elif not key_source.get("BodyPartExamined"):
        # General Series Laterality is 2C on a paired body part; with no body part known it
        # is "actually unknown", which DICOM spells as present and empty.
        sc.Laterality = ""
    sc.StationName = identity.device_name[:16]
    sc.SourceImageSequence = [_source_reference(key_source, key_frame_number)]
    sc.DerivationDescription = fit_bytes(
        f"Lung window C{LUNG_WINDOW[0]:g} W{LUNG_WINDOW[1]:g} with heat map of model "
        f"{result.model_name} {result.model_version}; {DISCLAIMER}",
        1024,
    )
    sc.ImageComments = fit_bytes(" | ".join(banner_lines(result)), 10240)
    sc.BurnedInAnnotation = "NO"  # the banner holds the result, no patient identification
    sc.LossyImageCompression = "00"
    log.debug("built SC %s for series %s (model %s)", uids.sop_instance_uid,
              key_source.SeriesInstanceUID, result.model_name)
    return sc


def sc_to_png(ds: Dataset, path: Path | str) -> Path:
    """Write an RGB (or grey) 8-bit SC's pixels as PNG, for the demo and for eyeballing."""
    out = Path(path)
    Image.fromarray(np.asarray(ds.pixel_array, dtype=np.uint8)).save(out, format="PNG")
    return out
