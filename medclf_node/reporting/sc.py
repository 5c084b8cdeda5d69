"""The classification result as a Secondary Capture key image, for viewers that cannot show SR.

One RGB picture says it all at a glance: the key slice in a lung window, the model's heat map
blended over it in colour where the model looked (positive results only, on an absolute scale:
the drop in probability when a region is hidden), and a banner with the finding, the
probability at the precision it has and "AI result — not for primary diagnosis". Orientation
letters frame the slice; a footer gives slice number, position, a scale bar and the heat legend.
The image joins the source study as a new series with deterministic UIDs, like the SR.
numpy and Pillow only (no matplotlib).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from medclf_node.domain import ModelResult, NodeIdentity, Volume
from medclf_node.reporting.demographics import carried, shorten
from medclf_node.reporting.sr import DISCLAIMER, fit_bytes, format_probability
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


def sc_series_description(result: ModelResult) -> str:
    """The key image series' description (LO): disclaimer, kind and model, shortened at a word
    boundary to 64 bytes (a long model name is dropped whole, never cut to "(nodule-2p5d-i")."""
    return shorten(f"{DISCLAIMER} key image ({result.model_name})", 64)


_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}


def orientation_marks(orientation: tuple[str, str]) -> dict[str, str]:
    """Letters for the image's left, right, top and bottom edges from (row, column) directions.

    PatientOrientation names where the rows run (left to right) and the columns (top to
    bottom): ("L", "P") puts the patient's left on the right edge ("L"), right on the left ("R"),
    anterior at the top ("A") and posterior at the bottom ("P").
    """
    row, col = orientation
    flip = lambda s: "".join(_OPPOSITE.get(c, c) for c in s)  # noqa: E731
    return {"left": flip(row), "right": row, "top": flip(col), "bottom": col}


@dataclass(frozen=True)
class SliceInfo:
    """Where the displayed slice is: its number in the series and position (mm), and pixel size."""

    number: int | None = None  # 1-based slice number in the evaluated volume
    instance_number: int | None = None  # the source image's InstanceNumber
    position_mm: float | None = None  # patient z (LPS, + toward the head) of the slice
    pixel_spacing: tuple[float, float] | None = None  # (row, column) spacing in mm


def _plane_geometry(source: Dataset, frame_number: int | None) -> tuple[list[float] | None, list[float] | None,
                                                                         list[float] | None]:
    """(ImageOrientationPatient, ImagePositionPatient, PixelSpacing) of the key image or frame."""
    iop, ipp, spacing = source.get("ImageOrientationPatient"), source.get("ImagePositionPatient"), \
        source.get("PixelSpacing")
    if frame_number is not None and "PerFrameFunctionalGroupsSequence" in source:
        groups = [source.PerFrameFunctionalGroupsSequence[frame_number - 1]]
        groups += list(source.get("SharedFunctionalGroupsSequence", []))
        for g in groups:
            if iop is None and "PlaneOrientationSequence" in g:
                iop = g.PlaneOrientationSequence[0].get("ImageOrientationPatient")
            if ipp is None and "PlanePositionSequence" in g:
                ipp = g.PlanePositionSequence[0].get("ImagePositionPatient")
            if spacing is None and "PixelMeasuresSequence" in g:
                spacing = g.PixelMeasuresSequence[0].get("PixelSpacing")

    def floats(v: object, n: int) -> list[float] | None:
        try:
            out = [float(x) for x in v]  # type: ignore[attr-defined]
        except (TypeError, ValueError):
            return None
        return out if len(out) == n and all(math.isfinite(x) for x in out) else None

    return floats(iop, 6), floats(ipp, 3), floats(spacing, 2)


def slice_info_from_source(source: Dataset, key_index: int, frame_number: int | None = None) -> SliceInfo:
    """:class:`SliceInfo` of canonical slice ``key_index`` whose source image is ``source``.

    Position and pixel spacing are only taken from an axial source image (the canonical slice
    *is* that image, turned or flipped); a coronal or sagittal source's image is not the slice.
    """
    iop, ipp, spacing = _plane_geometry(source, frame_number)
    inst = source.get("InstanceNumber")
    try:
        instance = int(inst) if inst not in (None, "") else None
    except (TypeError, ValueError):
        instance = None
    axial = iop is not None and abs(float(np.cross(iop[:3], iop[3:])[2])) > 0.9
    pixel_spacing = None
    if axial and iop is not None and spacing is not None and min(spacing) > 0:
        # the canonical slice's rows run along patient x; a source whose rows run along y is transposed
        pixel_spacing = (spacing[1], spacing[0]) if abs(iop[1]) > abs(iop[0]) else (spacing[0], spacing[1])
    return SliceInfo(
        number=key_index + 1,
        instance_number=instance,
        position_mm=ipp[2] if axial and ipp is not None else None,
        pixel_spacing=pixel_spacing,
    )


def slice_info_from_volume(volume: Volume, key_index: int) -> SliceInfo:
    """:class:`SliceInfo` of canonical slice ``key_index`` from the volume's own geometry.

    Exact for any acquisition plane (the canonical slice is what the key image shows): the
    position is the patient z of the slice's first voxel, the spacing the volume's in-plane one.
    """
    z = float((np.asarray(volume.affine, dtype=np.float64) @ np.array([key_index, 0.0, 0.0, 1.0]))[2])
    return SliceInfo(number=key_index + 1, position_mm=z,
                     pixel_spacing=(float(volume.spacing[1]), float(volume.spacing[2])))


def heat_shown(result: ModelResult) -> bool:
    """The overlay is drawn only for a positive result: below threshold there is nothing to point at."""
    return result.heatmap is not None and result.probability >= result.threshold


def overlay_heatmap(grey: UInt8Array, heatmap: FloatArray | None) -> UInt8Array:
    """RGB image: ``grey`` with the heat map blended in where it is hot, on an absolute scale.

    Heat is the drop in probability when the region is hidden (0..1, see
    :mod:`medclf_node.inference.predict`); its colour and opacity come from that value itself,
    never from the map's own maximum, so a weak map stays faint.
    """
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float64)
    if heatmap is not None:
        h = _fit_heatmap(heatmap, (grey.shape[0], grey.shape[1]))
        alpha = HEAT_ALPHA * np.clip((h - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0)
        rgb = (1.0 - alpha[..., None]) * rgb + alpha[..., None] * colormap(h).astype(np.float64)
    return np.asarray(np.clip(np.rint(rgb), 0, 255), dtype=np.uint8)


def banner_lines(result: ModelResult) -> tuple[str, str, str]:
    """The banner text: finding, probability and threshold; the disclaimer; the model."""
    present = result.probability >= result.threshold
    return (
        f"{result.finding.meaning}: {'PRESENT' if present else 'ABSENT'}  p = {format_probability(result.probability)}"
        f" (threshold {format_probability(result.threshold)})",
        DISCLAIMER,
        f"model {result.model_name} {result.model_version}",
    )


def heat_legend(result: ModelResult) -> str:
    """What the colours mean, or why there are none."""
    if result.heatmap is None:
        return "no heat map"
    if not heat_shown(result):
        return "no heat map: p below threshold"
    return f"heat = drop in p when the region is hidden; shown from {HEAT_FLOOR:g}"


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _font_fitting(lines: tuple[str, ...], width: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font, as large as fits ``width`` (about 1/24 of the width at most)."""
    size = max(10, width // 24)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while True:
        font = _font(size)
        widest = max(probe.textlength(t, font=font) for t in lines)
        if widest <= width * 0.96 or size <= 8 or not isinstance(font, ImageFont.FreeTypeFont):
            return font
        size -= 1


def _font_size(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    return int(font.size) if isinstance(font, ImageFont.FreeTypeFont) else 11


def render_banner(lines: tuple[str, ...], width: int, positive: bool) -> UInt8Array:
    """A dark strip with the text lines; the first line is red when present, green when absent."""
    font = _font_fitting(lines, width)
    size = _font_size(font)
    pad = max(4, int(size * 0.4))
    line_h = int(math.ceil(size * 1.25))
    img = Image.new("RGB", (width, pad * 2 + line_h * len(lines)), (24, 24, 24))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        text = line.replace("\u2014", "-")  # Pillow's default font has no em dash glyph
        colour = (255, 255, 255) if i else ((255, 80, 80) if positive else (120, 220, 120))
        draw.text((pad, pad + i * line_h), text, fill=colour, font=font)
    return np.asarray(img, dtype=np.uint8)


@dataclass(frozen=True)
class Layout:
    """Where the key slice sits in the SC picture: banner on top, a frame for the orientation
    letters around the slice, a footer with slice position, scale bar and heat legend."""

    scale: int  # integer enlargement of the key slice
    margin: int  # frame width (the orientation letters live here)
    banner_rows: int
    footer_rows: int
    font_size: int

    def image_box(self, rows: int, cols: int) -> tuple[slice, slice]:
        """(row slice, column slice) of the enlarged key slice in the picture."""
        top = self.banner_rows + self.margin
        return slice(top, top + rows * self.scale), slice(self.margin, self.margin + cols * self.scale)


def key_image_layout(key_shape: tuple[int, int], result: ModelResult) -> Layout:
    """The :class:`Layout` for a key slice of ``key_shape`` (rows, cols); depends on shape only
    (and on the banner text through its line count)."""
    scale = max(1, math.ceil(MIN_WIDTH / key_shape[1]))
    width = key_shape[1] * scale
    font_size = max(10, width // 36)
    margin = int(math.ceil(font_size * 1.6))
    full = width + 2 * margin
    banner = render_banner(banner_lines(result), full, True).shape[0]
    footer = int(math.ceil(font_size * 1.35)) * 2 + max(4, font_size // 2)
    return Layout(scale, margin, banner, footer, font_size)


def _nice_bar_mm(mm_per_px: float, max_px: float) -> float | None:
    """The longest of 1/2/5 x 10^k mm whose bar fits ``max_px`` pixels."""
    best = None
    for mm in (1, 2, 5, 10, 20, 50, 100, 200, 500):
        if mm / mm_per_px <= max_px:
            best = float(mm)
    return best


def _annotate(canvas: Image.Image, layout: Layout, key_shape: tuple[int, int], result: ModelResult,
              orientation: tuple[str, str] | None, info: SliceInfo | None) -> None:
    """Orientation letters in the frame; footer: slice number/position, scale bar, heat legend."""
    draw = ImageDraw.Draw(canvas)
    font = _font(layout.font_size)
    rows, cols = key_shape
    ys, xs = layout.image_box(rows, cols)
    white, grey = (255, 255, 255), (200, 200, 200)
    if orientation is not None:
        marks = orientation_marks(orientation)
        cy, cx = (ys.start + ys.stop) / 2, (xs.start + xs.stop) / 2
        m = layout.margin
        for side, (x, y) in {"left": (m / 2, cy), "right": (xs.stop + m / 2, cy),
                             "top": (cx, ys.start - m / 2), "bottom": (cx, ys.stop + m / 2)}.items():
            draw.text((x, y), marks[side], fill=white, font=font, anchor="mm")
    line_h = int(math.ceil(layout.font_size * 1.35))
    y0 = ys.stop + layout.margin + max(2, layout.font_size // 4)
    x0 = layout.margin
    parts = []
    if info is not None:
        if info.number is not None:
            parts.append(f"slice {info.number}")
        if info.instance_number is not None:
            parts.append(f"image {info.instance_number}")
        if info.position_mm is not None:
            parts.append(f"z {info.position_mm:.1f} mm")
    draw.text((x0, y0), ", ".join(parts), fill=white, font=font)
    if info is not None and info.pixel_spacing is not None:
        mm_per_px = info.pixel_spacing[1] / layout.scale
        bar_mm = _nice_bar_mm(mm_per_px, (xs.stop - xs.start) * 0.3)
        if bar_mm is not None:
            bar_px = int(round(bar_mm / mm_per_px))
            label = f"{bar_mm:g} mm"
            tw = draw.textlength(label, font=font)
            right = xs.stop
            bx0 = int(right - tw - layout.font_size // 2 - bar_px)
            yb = y0 + line_h // 2
            draw.rectangle((bx0, yb - 1, bx0 + bar_px - 1, yb + 1), fill=white)
            tick = layout.font_size // 3
            for tx in (bx0, bx0 + bar_px - 2):  # end ticks inside the bar: it is exactly bar_px long
                draw.rectangle((tx, yb - tick, tx + 1, yb + tick), fill=white)
            draw.text((right - tw, y0), label, fill=white, font=font)
    legend = heat_legend(result)
    y1 = y0 + line_h
    draw.text((x0, y1), legend, fill=grey, font=font)
    if heat_shown(result):  # the colour scale, from the floor to 1 (absolute)
        lx0 = int(x0 + draw.textlength(legend, font=font) + layout.font_size)
        lx1 = int(xs.stop)
        if lx1 - lx0 > 3 * layout.font_size:
            label_w = int(draw.textlength("1", font=font)) + 4
            bar = np.linspace(HEAT_FLOOR, 1.0, max(1, lx1 - lx0 - label_w))
            colours = colormap(bar)
            h = max(4, layout.font_size // 2)
            top = y1 + (line_h - h) // 2
            for i, c in enumerate(colours):
                draw.line((lx0 + i, top, lx0 + i, top + h), fill=tuple(int(v) for v in c))
            draw.text((lx1 - label_w + 4, y1), "1", fill=grey, font=font)


def render_key_image(
    key_hu: npt.NDArray[np.floating],
    result: ModelResult,
    *,
    orientation: tuple[str, str] | None = None,
    info: SliceInfo | None = None,
) -> UInt8Array:
    """The full SC picture: banner, the windowed key slice (heat-mapped when positive) in a frame
    with orientation letters, and a footer with slice number/position, scale bar and heat legend.

    The slice's own pixels carry nothing but grey and heat: every mark sits outside it.
    """
    hu = np.asarray(key_hu, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"key_hu must be a 2D slice, got shape {hu.shape}")
    key_shape = (int(hu.shape[0]), int(hu.shape[1]))
    layout = key_image_layout(key_shape, result)
    rgb = overlay_heatmap(apply_window(hu, *LUNG_WINDOW), result.heatmap if heat_shown(result) else None)
    if layout.scale > 1:
        rgb = np.repeat(np.repeat(rgb, layout.scale, axis=0), layout.scale, axis=1)
    ys, xs = layout.image_box(*key_shape)
    width = rgb.shape[1] + 2 * layout.margin
    height = ys.stop + layout.margin + layout.footer_rows
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    present = result.probability >= result.threshold
    canvas[: layout.banner_rows] = render_banner(banner_lines(result), width, present)
    canvas[ys, xs] = rgb
    img = Image.fromarray(canvas)
    _annotate(img, layout, key_shape, result, orientation, info)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


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
    slice_info: SliceInfo | None = None,
) -> hd.sc.SCImage:
    """Build the Secondary Capture key image for one model's result on one series.

    ``key_source`` is the header of the key slice's source instance (patient, study and
    series are taken from it); ``key_hu`` its pixels in HU. BodyPartExamined is copied when
    the source has it and is not required. ``key_frame_number`` (1-based) is for a
    multi-frame source. ``orientation``: the PatientOrientation of ``key_hu`` when it is a slice
    of the reoriented volume (:func:`slice_orientation`); default: the source image's own.
    ``generation``: the series' result generation the UIDs derive from (see :mod:`.uids`).
    ``slice_info``: slice number, position and pixel spacing printed on the image; default from
    the key source (:func:`slice_info_from_source`). Patient and study values pass through
    :func:`~medclf_node.reporting.demographics.carried`, so bad demographics never cost the image.
    """
    src = carried(key_source)
    orient = orientation or patient_orientation(key_source)
    info = slice_info or slice_info_from_source(key_source, result.key_slice_index, key_frame_number)
    pixels = render_key_image(key_hu, result, orientation=orient, info=info)
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
        patient_id=src.get("PatientID"),
        patient_name=src.get("PatientName"),
        patient_birth_date=src.get("PatientBirthDate"),
        patient_sex=src.get("PatientSex") or None,
        accession_number=src.get("AccessionNumber"),
        study_id=src.get("StudyID"),
        study_date=src.get("StudyDate"),
        study_time=src.get("StudyTime"),
        referring_physician_name=src.get("ReferringPhysicianName"),
        patient_orientation=orient,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=sc_series_description(result),
        manufacturer_model_name=identity.manufacturer,
        software_versions=identity.software_version,
        institution_name=identity.institution_name,
        specific_character_set="ISO_IR 192",
    )
    if src.get("BodyPartExamined"):
        sc.BodyPartExamined = src.BodyPartExamined
    if src.get("Laterality") in ("R", "L"):
        sc.Laterality = src.Laterality
    elif not src.get("BodyPartExamined"):
        # General Series Laterality is 2C on a paired body part; with no body part known it
        # is "actually unknown", which DICOM spells as present and empty.
        sc.Laterality = ""
    sc.StationName = identity.device_name[:16]
    sc.SourceImageSequence = [_source_reference(key_source, key_frame_number)]
    sc.DerivationDescription = fit_bytes(
        f"Lung window C{LUNG_WINDOW[0]:g} W{LUNG_WINDOW[1]:g}"
        + (f" with heat map of model {result.model_name} {result.model_version} (drop in probability when "
           f"the region is hidden, absolute scale from {HEAT_FLOOR:g})" if heat_shown(result) else "")
        + f"; {DISCLAIMER}",
        1024,
    )
    sc.ImageComments = fit_bytes(" | ".join((*banner_lines(result), heat_legend(result))), 10240)
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
