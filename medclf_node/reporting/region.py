"""Where a finding lies, in the pixels of one source image: the SR's image region.

Viewers draw a TID 1500 measurement only where its NUM carries a SCOORD INFERRED FROM a
source image (OHIF shows a black viewport otherwise).  The model localises the finding in
the node's canonical volume: the heat-map peak on the key slice, or without a heat map the
key slice's centre (for a 3D model, the centre of the window it scored).  The canonical
array may be flipped or transposed against the source images (prone, feet-first, coronal,
sagittal acquisitions), so the point goes voxel -> patient LPS (the volume's affine) -> the
plane of the source image nearest to it (its ImagePositionPatient, ImageOrientationPatient
and PixelSpacing).  Without an affine the canonical slice is taken to be the source image
(head-first supine axial, where the two are identical).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from medclf_node.domain import ModelResult

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ImagePoint:
    """A point in one source image, in SCOORD image coordinates.

    ``column``/``row`` follow PS3.3 C.18.6.1.1: (0, 0) is the top-left corner of the
    top-left pixel, so the centre of pixel (r, c) is (c + 0.5, r + 0.5).
    ``distance_mm`` is how far the located point lies from the image plane (None when the
    geometry was not available and the canonical slice was taken as the image).
    """

    source: Dataset
    frame_number: int | None
    column: float
    row: float
    distance_mm: float | None = None


@dataclass(frozen=True)
class _Plane:
    origin: F64  # centre of the first transmitted pixel, LPS mm
    row_dir: F64  # direction of increasing column index
    col_dir: F64  # direction of increasing row index
    spacing: tuple[float, float]  # (between rows, between columns) mm

    @property
    def normal(self) -> F64:
        return np.asarray(np.cross(self.row_dir, self.col_dir), dtype=np.float64)


def canonical_location(result: ModelResult, slice_shape: tuple[int, int]) -> tuple[float, float]:
    """(row, column) of the finding in the canonical key slice: heat-map peak, else the centre.

    A heat map of another shape than the slice (a coarse map) is scaled onto it.
    """
    rows, cols = slice_shape
    heat = result.heatmap
    if heat is not None:
        h = np.asarray(heat, dtype=np.float32)
        if h.ndim == 2 and h.size and np.isfinite(h).all() and float(h.max()) > 0.0:
            r, c = np.unravel_index(int(np.argmax(h)), h.shape)
            return ((r + 0.5) * rows / h.shape[0] - 0.5, (c + 0.5) * cols / h.shape[1] - 0.5)
        log.debug("heat map of %s is empty or malformed; the finding is placed at the slice centre",
                  result.model_name)
    return ((rows - 1) / 2.0, (cols - 1) / 2.0)


def _item(seq: Any, index: int = 0) -> Dataset | None:
    try:
        return seq[index] if seq is not None and len(seq) > index else None
    except (TypeError, IndexError):
        return None


def _frame_attrs(ds: Dataset, frame_number: int) -> tuple[Any, Any, Any]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of one frame of a multi-frame image."""
    per = _item(ds.get("PerFrameFunctionalGroupsSequence"), frame_number - 1)
    shared = _item(ds.get("SharedFunctionalGroupsSequence"))

    def find(seq_kw: str, attr: str) -> Any:
        for group in (per, shared):
            inner = _item(group.get(seq_kw)) if group is not None else None
            if inner is not None and attr in inner:
                return inner.get(attr)
        return None

    return (find("PlanePositionSequence", "ImagePositionPatient"),
            find("PlaneOrientationSequence", "ImageOrientationPatient"),
            find("PixelMeasuresSequence", "PixelSpacing"))


def image_plane(ds: Dataset, frame_number: int | None = None) -> _Plane | None:
    """The plane of ``ds`` (or of its frame ``frame_number``), or None when its geometry is absent."""
    if frame_number is not None and "PerFrameFunctionalGroupsSequence" in ds:
        ipp, iop, ps = _frame_attrs(ds, frame_number)
    elif int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return None  # a multi-frame image without per-frame geometry: frames cannot be told apart
    else:
        ipp, iop, ps = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing")
    try:
        origin = np.asarray([float(v) for v in ipp], dtype=np.float64)
        o = np.asarray([float(v) for v in iop], dtype=np.float64)
        spacing = (float(ps[0]), float(ps[1]))
    except (TypeError, ValueError, IndexError):
        return None
    if origin.shape != (3,) or o.shape != (6,) or min(spacing) <= 0:
        return None
    row_dir, col_dir = o[:3], o[3:]
    if not (np.isclose(np.linalg.norm(row_dir), 1, atol=1e-2) and np.isclose(np.linalg.norm(col_dir), 1, atol=1e-2)):
        return None
    return _Plane(origin, row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir), spacing)


def _to_pixels(plane: _Plane, point: F64) -> tuple[float, float, float]:
    """(row index, column index, signed distance mm) of the LPS ``point`` projected onto ``plane``."""
    d = point - plane.origin
    return (float(d @ plane.col_dir) / plane.spacing[0], float(d @ plane.row_dir) / plane.spacing[1],
            float(d @ plane.normal))


def _clipped(ds: Dataset, row: float, col: float) -> tuple[float, float]:
    """SCOORD (column, row) of pixel indices (row, col), kept inside the image."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    x, y = col + 0.5, row + 0.5
    if rows > 0 and cols > 0:
        cx, cy = min(max(x, 0.0), float(cols)), min(max(y, 0.0), float(rows))
        if (cx, cy) != (x, y):
            log.warning("finding at (%.1f, %.1f) lies outside image %s (%d x %d); clipped to its edge",
                        x, y, ds.get("SOPInstanceUID"), cols, rows)
        x, y = cx, cy
    return x, y


def locate_finding(
    sources: Sequence[Dataset],
    key_source: Dataset,
    key_frame_number: int | None,
    result: ModelResult,
    *,
    affine: npt.ArrayLike | None = None,
    slice_shape: tuple[int, int] | None = None,
) -> ImagePoint:
    """The finding of ``result`` as a point in a source image (see the module docstring).

    ``affine`` maps canonical (slice, row, column, 1) to LPS mm (``Volume.affine``) and
    ``slice_shape`` is the canonical slice's (rows, columns) (``Volume.shape[1:]``; the heat
    map's shape when omitted).  With the affine, the image is the source whose plane lies
    nearest to the point (the key source on a tie): for axial acquisitions that is the key
    slice, for coronal/sagittal ones the image that actually contains the point.
    """
    if slice_shape is None:
        if result.heatmap is not None and np.ndim(result.heatmap) == 2:
            slice_shape = (int(np.shape(result.heatmap)[0]), int(np.shape(result.heatmap)[1]))
        else:
            slice_shape = (int(key_source.get("Rows", 1) or 1), int(key_source.get("Columns", 1) or 1))
    r, c = canonical_location(result, slice_shape)
    if affine is not None:
        a = np.asarray(affine, dtype=np.float64)
        lps = (a @ np.array([float(result.key_slice_index), r, c, 1.0]))[:3]
        best: tuple[float, int, Dataset, int | None, _Plane] | None = None
        key_plane = image_plane(key_source, key_frame_number)
        if key_plane is not None:
            best = (round(abs(_to_pixels(key_plane, lps)[2]), 3), 0, key_source, key_frame_number, key_plane)
        for ds in sources:
            if ds is key_source:
                continue
            plane = image_plane(ds)
            if plane is None:
                continue
            cand = (round(abs(_to_pixels(plane, lps)[2]), 3), 1, ds, None, plane)
            if best is None or cand[:2] < best[:2]:
                best = cand
        if best is not None:
            dist, _, ds, frame, plane = best
            row, col, _ = _to_pixels(plane, lps)
            x, y = _clipped(ds, row, col)
            log.debug("finding of %s at LPS %s -> image %s (%.1f, %.1f), %.2f mm from its plane",
                      result.model_name, np.round(lps, 1).tolist(), ds.get("SOPInstanceUID"), x, y, dist)
            return ImagePoint(ds, frame, x, y, dist)
        log.debug("no source geometry for %s; the canonical slice is taken as the key image", result.model_name)
    rows = int(key_source.get("Rows", 0) or 0) or slice_shape[0]
    cols = int(key_source.get("Columns", 0) or 0) or slice_shape[1]
    x, y = _clipped(key_source, (r + 0.5) * rows / slice_shape[0] - 0.5, (c + 0.5) * cols / slice_shape[1] - 0.5)
    return ImagePoint(key_source, key_frame_number, x, y, None)
