"""From the spooled instances of one series to a :class:`~medclf_node.domain.Volume` in HU.

The assembly either builds the correct volume or refuses with a :class:`VolumeError` that
carries a machine-readable ``code`` and a sentence for a human.  Steps:

1. **Headers once, without pixels** (:mod:`~medclf_node.ingest.volume_headers`): geometry,
   rescale, pixel format and the byte offset of native pixel data.  Enhanced multi-frame
   objects give one header per frame from the per-frame / shared functional groups.
2. **Plan the geometry** (no pixels touched): one orientation for all slices, one
   in-plane grid, positions projected on the slice normal; duplicates and several
   acquisitions resolved (see :func:`_resolve_duplicates`); spacing measured from all
   positions; gaps / uneven spacing and gantry tilt either refused or resampled, as the
   :class:`~medclf_node.config.VolumeSection` policy says.
3. **Pixels once**, straight into one preallocated float32 array in sorted order: native
   little/big-endian data is read with ``readinto`` at the known offset (no pydicom decode);
   compressed transfer syntaxes are decoded by pydicom's pixel handlers (pylibjpeg,
   pyjpegls).  Rescale slope/intercept are applied per slice while copying.

4. **Canonical orientation** (:func:`canonical_reorientation`): the pixels land in one array
   orientation whatever the patient position or acquisition plane, the one the NIfTI and
   LUNA16 readers of ``training.data.readers`` produce and the shipped models were trained on.

Conventions: ``array[k, r, c]`` with the slice index running toward the feet (slice 0 most
superior), rows toward posterior and columns toward the patient's left, i.e. the index axes
point to (I, P, L) in patient coordinates (``highdicom.Volume.to_patient_orientation("FPL")``,
checked in the tests); ``affine`` maps (k, r, c, 1) to patient LPS mm.  The geometry is first
planned in the acquisition frame (slice index along ``-normal``, ``normal = row_cosine x
column_cosine``: the ``highdicom.get_volume_from_series`` frame) and the index axes are then
permuted and reversed onto the canonical ones, the affine changed with them, so every voxel
keeps its exact patient position.  A head-first supine axial series (IOP 1,0,0 / 0,1,0) is
already canonical and passes through unchanged (byte for byte the array of earlier releases);
head-first prone turns 180 degrees in-plane, feet-first flips z and left-right, coronal and
sagittal stacks are transposed.  Oblique orientations go to the *nearest* patient axes (the
same rule as nibabel's ``io_orientation`` for NIfTI): a permutation and flips, no resampling,
the affine stays exact, a note gives the worst angle.

Slice references: ``slice_refs[k]`` is the source image of canonical slice ``k`` for axial
acquisitions (any patient position).  For a coronal or sagittal acquisition an axial slice cuts
every source image along a line, so no single source image *is* the slice; ``slice_refs[k]``
then names the middle source image of the stack (it intersects every axial slice through the
centre of the field of view) for every ``k``: a real instance of the series, which the SR's key
image reference and the SC's Source Image Sequence point to.  Such a volume's references no
longer list every source image (see :func:`_canonical_refs`).

HU decisions:
  * Rescale Slope/Intercept are the Modality LUT and give HU.  MONOCHROME1 only changes how
    values are *displayed* (the presentation stage after the modality LUT), so it is not
    inverted: HU are the same as for the MONOCHROME2 encoding of the same data.
  * Rescale absent (CT requires it; some exporters drop it): signed pixels are taken as HU
    already (slope 1, intercept 0); unsigned pixels as the usual CT storage with air near 0
    (slope 1, intercept -1024).  Either assumption is written into ``Volume.notes``.
  * A Modality LUT Sequence is applied through pydicom.

Geometry decisions (tolerances below): slices within 0.01 mm along the normal share a
position (duplicates, see :func:`_resolve_duplicates`); a step deviating from the median by
more than ``spacing_tolerance`` is irregular (``gap`` when the steps are whole multiples of
the median, i.e. missing slices, else ``uneven_spacing``); resampling puts a regular grid from
the first to the last slice at about the median spacing, linear along the normal, and each
output slice references its nearest source.  Gantry tilt shows as slice positions moving
in-plane (more than 0.1 pixel); resampling shifts every slice onto slice 0's in-plane grid
(linear, -1024 HU shifted in) so the volume is orthogonal.

highdicom 0.28 ``get_volume_from_series`` was evaluated first and is the reference in the
tests (identical array and affine on regular series, after its ``to_patient_orientation("FPL")``
for other than head-first supine axial ones).  It is not the engine here because it
needs full datasets with pixels (no headers-then-pixels into one float32 buffer), refuses
gaps, uneven spacing and tilt with one generic message and does not resample, cannot pick
one of several overlapping acquisitions, applies the MONOCHROME1 presentation inversion to
what should be HU, leaves a missing rescale unhandled, and reads single-frame series only.
"""

from __future__ import annotations

import logging
import math
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.pixels import apply_modality_lut, iter_pixels
from scipy import ndimage

from medclf_node.config import LimitsSection, VolumeSection
from medclf_node.domain import SliceRef, Volume
from medclf_node.ingest import codec_headers
from medclf_node.ingest.volume_headers import ERROR_CODES, SliceHeader, VolumeError, read_slice_headers
from medclf_node.redact import scrub

log = logging.getLogger(__name__)

PAD_HU = -1024.0  # fill for voxels a tilt correction shifts in from outside the field of view

# Tolerances (millimetres unless stated).
POSITION_ATOL_MM = 0.01  # two slices closer than this along the normal share a position
ORIENTATION_ATOL = 1e-3  # direction-cosine difference still counted as the same orientation
TILT_FRACTION = 0.1  # in-plane offset above this fraction of a pixel counts as gantry tilt

#: LPS unit vector each canonical index axis (slice, row, column) runs toward: feet, posterior, left.
CANONICAL_DIRECTIONS = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
CANONICAL_AXCODES = ("I", "P", "L")  # the same, as patient direction letters (nibabel axcodes)
_OPPOSITE = {"I": "S", "P": "A", "L": "R"}
OBLIQUE_NOTE_DEG = 1.0  # index axes further than this from a patient axis are noted as oblique

# ----------------------------------------------------------------------------------------
# canonical orientation
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reorientation:
    """Permutation and reversals from an array's acquisition axes to the canonical (I, P, L) axes.

    ``canonical = acquired.transpose(perm)`` with canonical axis ``j`` reversed where
    ``flip[j]``: canonical axis ``j`` is acquisition axis ``perm[j]``.  Pure index bookkeeping,
    shared by the node and the training readers so both orient every source alike.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    max_angle_deg: float  # worst angle between an acquisition axis and its patient axis

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    def _flips(self) -> tuple[slice, ...]:
        return tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)

    def shape(self, acq_shape: Sequence[int]) -> tuple[int, int, int]:
        """Canonical array shape for an acquisition-ordered shape."""
        return (int(acq_shape[self.perm[0]]), int(acq_shape[self.perm[1]]), int(acq_shape[self.perm[2]]))

    def apply(self, acquired: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """The canonical view of an acquisition-ordered array (no copy)."""
        return acquired.transpose(self.perm)[self._flips()]

    def acquisition_view(self, canonical: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """A view of a canonical-layout buffer indexed like the acquisition, to write pixels into."""
        if self.is_identity:
            return canonical
        inverse = tuple(int(i) for i in np.argsort(self.perm))
        return canonical[self._flips()].transpose(inverse)

    def index(self, acq_index: Sequence[float], acq_shape: Sequence[int]) -> tuple[float, float, float]:
        """Canonical (slice, row, column) of a (possibly fractional) acquisition index."""
        out = [
            (acq_shape[a] - 1 - acq_index[a]) if f else acq_index[a]
            for a, f in zip(self.perm, self.flip, strict=True)
        ]
        return (float(out[0]), float(out[1]), float(out[2]))

    def affine(self, acq_affine: npt.NDArray[np.float64], acq_shape: Sequence[int]) -> npt.NDArray[np.float64]:
        """The affine of the canonical array: same voxels, same patient positions."""
        out = np.eye(4, dtype=np.float64)
        origin = acq_affine[:3, 3].astype(np.float64).copy()
        for j, (a, f) in enumerate(zip(self.perm, self.flip, strict=True)):
            column = acq_affine[:3, a]
            out[:3, j] = -column if f else column
            if f:
                origin += (acq_shape[a] - 1) * column
        out[:3, 3] = origin
        return out

    def acquisition_codes(self) -> str:
        """Patient direction letters of the acquisition axes (e.g. 'IAR' for head-first prone)."""
        codes = [""] * 3
        for j, (a, f) in enumerate(zip(self.perm, self.flip, strict=True)):
            codes[a] = _OPPOSITE[CANONICAL_AXCODES[j]] if f else CANONICAL_AXCODES[j]
        return "".join(codes)


def canonical_reorientation(directions: npt.ArrayLike) -> Reorientation:
    """Which acquisition axis becomes which canonical axis, and which run backwards.

    ``directions`` is 3x3 with one column per acquisition index axis, its direction in patient
    LPS (any length: an affine's 3x3 part will do).  Each canonical axis takes the acquisition
    axis most nearly parallel to it (greedy on the largest |cosine|, so an oblique frame goes
    to its nearest patient axes, as nibabel's ``io_orientation`` does).
    """
    d = np.asarray(directions, dtype=np.float64).reshape(3, 3)
    norms = np.linalg.norm(d, axis=0)
    if np.any(norms <= 0) or abs(float(np.linalg.det(d / norms))) < 1e-3:
        raise ValueError(f"index axes {d.T.round(4).tolist()} do not span 3-D space")
    cosines = CANONICAL_DIRECTIONS @ (d / norms)  # [canonical axis, acquisition axis]
    left = np.abs(cosines)
    perm = [0, 0, 0]
    for _ in range(3):
        j, a = np.unravel_index(int(np.argmax(left)), left.shape)
        perm[int(j)] = int(a)
        left[j, :] = -1.0
        left[:, a] = -1.0
    chosen = np.array([cosines[j, perm[j]] for j in range(3)])
    angle = float(np.degrees(np.arccos(np.clip(np.abs(chosen).min(), 0.0, 1.0))))
    return Reorientation(
        perm=(perm[0], perm[1], perm[2]),
        flip=(bool(chosen[0] < 0), bool(chosen[1] < 0), bool(chosen[2] < 0)),
        max_angle_deg=angle,
    )


# ----------------------------------------------------------------------------------------
# geometry plan
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    slices: tuple[SliceHeader, ...]  # source slices in output order (along -normal)
    dist: npt.NDArray[np.float64]  # their distances along the normal (decreasing)
    shifts: npt.NDArray[np.float64] | None  # per-slice in-plane (row, col) pixel shift for tilt
    z_grid: npt.NDArray[np.float64] | None  # output distances when resampling along the normal
    spacing: tuple[float, float, float]
    affine: npt.NDArray[np.float64]
    notes: tuple[str, ...]


def _check_common(headers: Sequence[SliceHeader]) -> None:
    series = {h.series_instance_uid for h in headers}
    if len(series) > 1:
        raise VolumeError("mixed_series", f"the instances belong to {len(series)} different series")
    missing = [h for h in headers if not h.has_pixels]
    if missing:
        raise VolumeError("no_pixels", f"{len(missing)} instance(s) carry no pixel data, e.g. {missing[0].path.name}")
    odd = [h for h in headers if h.samples_per_pixel != 1 or not h.photometric.startswith("MONOCHROME")]
    if odd:
        raise VolumeError(
            "unsupported_pixels",
            f"{odd[0].path.name} has {odd[0].samples_per_pixel} samples per pixel "
            f"({odd[0].photometric}); only greyscale (MONOCHROME1/2) images form a volume",
        )
    no_geo = [h for h in headers if h.position is None or h.orientation is None or h.pixel_spacing is None]
    if no_geo:
        raise VolumeError(
            "missing_geometry",
            f"{no_geo[0].path.name} lacks Image Position/Orientation (Patient) or Pixel Spacing",
        )
    grids = {(h.rows, h.columns) for h in headers}
    if len(grids) > 1:
        raise VolumeError("mixed_geometry", f"the images have different sizes: {sorted(grids)}")
    ps = np.array([h.pixel_spacing for h in headers], dtype=np.float64)
    if np.any(ps <= 0) or np.any(np.abs(ps - ps[0]) > 1e-4 * ps[0]):
        raise VolumeError(
            "mixed_geometry", f"pixel spacing differs between images ({ps.min(axis=0)} .. {ps.max(axis=0)} mm)"
        )
    fors = {h.frame_of_reference_uid for h in headers}
    if len(fors) > 1:
        raise VolumeError("mixed_geometry", "the images do not share one Frame of Reference")


def _orientation(headers: Sequence[SliceHeader]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The common (row cosine, column cosine), or refuse."""
    iops = np.array([h.orientation for h in headers], dtype=np.float64)
    row, col = iops[0, :3], iops[0, 3:]
    if (
        abs(np.linalg.norm(row) - 1) > 1e-2
        or abs(np.linalg.norm(col) - 1) > 1e-2
        or abs(float(row @ col)) > 1e-2
    ):
        raise VolumeError("missing_geometry", f"Image Orientation (Patient) {iops[0]} is not orthonormal")
    dev = np.abs(iops - iops[0]).max(axis=1)
    bad = int(np.argmax(dev))
    if dev[bad] > ORIENTATION_ATOL:
        raise VolumeError(
            "orientation_mismatch",
            f"{headers[bad].path.name} has orientation {iops[bad].round(4).tolist()} but "
            f"{headers[0].path.name} has {iops[0].round(4).tolist()}; the slices do not form one stack",
        )
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    return row, col / np.linalg.norm(col)


def _position_groups(dist: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Group id per slice: slices closer than POSITION_ATOL_MM along the normal (chained) share one."""
    order = np.argsort(dist, kind="stable")
    new_group = np.diff(dist[order]) >= POSITION_ATOL_MM
    ids_sorted = np.concatenate([[0], np.cumsum(new_group)]).astype(np.int64)
    keys = np.empty_like(ids_sorted)
    keys[order] = ids_sorted
    return keys


def _resolve_duplicates(
    headers: list[SliceHeader], dist: npt.NDArray[np.float64]
) -> tuple[list[SliceHeader], list[str]]:
    """Keep one image per position.

    * Positions repeated across several acquisitions: the acquisition with the most images
      is kept whole and the others dropped (ties: the lowest Acquisition Number).  Mixing
      images of two acquisitions would stack different moments (contrast phases, breath
      holds).  Acquisitions that do not overlap are combined as one stack.
    * Positions repeated within the kept images: the image with the lowest
      (InstanceNumber, SOPInstanceUID, frame) is kept, so the result never depends on
      arrival order.
    """
    notes: list[str] = []
    keys = _position_groups(dist)
    if len(set(keys.tolist())) == len(keys):
        acqs = {h.acquisition_number for h in headers}
        if len(acqs) > 1:
            notes.append(f"combined {len(acqs)} non-overlapping acquisitions into one stack")
        return headers, notes
    acq_counts = Counter(h.acquisition_number for h in headers)
    if len(acq_counts) > 1:
        best = sorted(acq_counts.items(), key=lambda kv: (-kv[1], kv[0] if kv[0] is not None else 2**31))[0][0]
        kept_idx = [i for i, h in enumerate(headers) if h.acquisition_number == best]
        dropped = sorted(str(a) for a in acq_counts if a != best)
        notes.append(
            f"positions repeat across acquisitions: kept acquisition {best} ({len(kept_idx)} images), "
            f"dropped acquisition(s) {', '.join(dropped)}"
        )
        log.info("volume: %s", notes[-1])
        headers = [headers[i] for i in kept_idx]
        keys = keys[kept_idx]
    chosen: dict[int, SliceHeader] = {}
    for h, k in zip(headers, keys.tolist(), strict=True):
        if k not in chosen or h.order_key < chosen[k].order_key:
            chosen[k] = h
    if len(chosen) < len(headers):
        notes.append(f"dropped {len(headers) - len(chosen)} image(s) duplicating another image's position")
        log.info("volume: %s", notes[-1])
        keep = {id(h) for h in chosen.values()}
        headers = [h for h in headers if id(h) in keep]
    return headers, notes


def _single_slice_spacing(h: SliceHeader) -> float:
    for v in (h.spacing_between_slices, h.slice_thickness):
        if v is not None and v > 0:
            return float(v)
    return 1.0


def _plan(headers: Sequence[SliceHeader], policy: VolumeSection) -> _Plan:
    if not headers:
        raise VolumeError("no_slices", "the series holds no images")
    _check_common(headers)
    row, col = _orientation(headers)
    normal = np.cross(row, col)
    pos_all = np.array([h.position for h in headers], dtype=np.float64)
    kept, notes = _resolve_duplicates(list(headers), pos_all @ normal)
    if len(kept) < policy.min_slices:
        raise VolumeError(
            "too_few_slices", f"{len(kept)} distinct slice position(s); at least {policy.min_slices} needed"
        )
    pos = np.array([h.position for h in kept], dtype=np.float64)
    dist = pos @ normal
    order = np.argsort(-dist, kind="stable")
    kept = [kept[i] for i in order]
    pos, dist = pos[order], dist[order]
    assert kept[0].pixel_spacing is not None  # checked in _check_common
    ps_r, ps_c = kept[0].pixel_spacing

    # Gantry tilt: positions wander in-plane from slice to slice (a sheared stack).
    rel = pos - pos[0]
    inplane = np.stack([rel @ col / ps_r, rel @ row / ps_c], axis=1)  # (row, col) pixels
    shifts: npt.NDArray[np.float64] | None = None
    if len(kept) > 1 and float(np.abs(inplane).max()) > TILT_FRACTION:
        per_slice = np.abs(np.diff(inplane, axis=0)).max(axis=0) * np.array([ps_r, ps_c])
        msg = (
            f"slice positions move in-plane by up to {float(np.abs(inplane).max()):.2f} pixels "
            f"({float(per_slice.max()):.3f} mm per slice): a gantry-tilted (sheared) stack"
        )
        if policy.gantry_tilt == "refuse":
            raise VolumeError("tilt", msg + "; volume.gantry_tilt is 'refuse'")
        shifts = inplane
        notes.append(msg + "; resampled onto an orthogonal grid")
        log.info("volume: %s", notes[-1])

    # Spacing along the normal, measured from all positions.
    z_grid: npt.NDArray[np.float64] | None = None
    if len(kept) == 1:
        dz = _single_slice_spacing(kept[0])
        notes.append(f"single slice: slice spacing {dz:g} mm taken from the header")
    else:
        gaps = -np.diff(dist)
        med = float(np.median(gaps))
        dz = med
        dev = np.abs(gaps - med) > policy.spacing_tolerance * med
        if dev.any():
            ratio = gaps / med
            missing = dev & (np.abs(ratio - np.round(ratio)) <= policy.spacing_tolerance) & (np.round(ratio) >= 2)
            code = "gap" if missing.any() and np.all(missing[dev]) else "uneven_spacing"
            worst = int(np.argmax(np.abs(gaps - med)))
            msg = (
                f"slice spacing is {'not regular' if code == 'uneven_spacing' else 'interrupted'}: "
                f"{gaps[worst]:.3f} mm between slices at {dist[worst]:.2f} and {dist[worst + 1]:.2f} mm "
                f"along the normal, median spacing {med:.3f} mm ({int(dev.sum())} irregular step(s))"
            )
            if policy.uneven_spacing == "refuse":
                raise VolumeError(code, msg + "; volume.uneven_spacing is 'refuse'")
            if float(gaps.max()) > policy.max_gap_slices * med:
                raise VolumeError(
                    "gap",
                    msg + f"; a gap wider than volume.max_gap_slices={policy.max_gap_slices:g} spacings "
                    "is not interpolated",
                )
            span = float(dist[0] - dist[-1])
            n_out = max(2, math.floor(span / med + 0.5) + 1)
            dz = span / (n_out - 1)
            z_grid = dist[0] - np.arange(n_out, dtype=np.float64) * dz
            notes.append(msg + f"; resampled onto a regular {dz:.3f} mm grid of {n_out} slices")
            log.info("volume: %s", notes[-1])

    affine = np.eye(4, dtype=np.float64)
    affine[:3, 0] = -normal * dz
    affine[:3, 1] = col * ps_r
    affine[:3, 2] = row * ps_c
    affine[:3, 3] = pos[0]
    return _Plan(
        slices=tuple(kept),
        dist=dist,
        shifts=shifts,
        z_grid=z_grid,
        spacing=(float(dz), float(ps_r), float(ps_c)),
        affine=affine,
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------------------
# pixels
# ----------------------------------------------------------------------------------------


def _native_dtype(h: SliceHeader) -> np.dtype[Any] | None:
    """numpy dtype for reading native pixels directly, or None when pydicom must decode."""
    if h.pixel_offset is None or h.has_modality_lut or h.bits_allocated not in (8, 16, 32):
        return None
    if h.transfer_syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
        order = "<"
    elif h.transfer_syntax == "1.2.840.10008.1.2.2":
        order = ">"
    else:
        return None  # deflate and anything unusual: let pydicom handle it
    kind = "i" if h.pixel_representation == 1 else "u"
    return np.dtype(f"{order}{kind}{h.bits_allocated // 8}")


def _fix_bits(buf: npt.NDArray[Any], h: SliceHeader) -> npt.NDArray[Any]:
    """Drop bits above BitsStored (unsigned) or sign-extend from BitsStored (signed)."""
    spare = h.bits_allocated - h.bits_stored
    if spare <= 0:
        return buf
    if h.pixel_representation == 1:
        buf <<= spare
        buf >>= spare  # arithmetic shift on a signed type: sign extension
    else:
        buf &= (1 << h.bits_stored) - 1
    return buf


def _store(dst: npt.NDArray[np.float32], stored: npt.NDArray[Any], h: SliceHeader) -> None:
    """dst = stored * slope + intercept, computed in float32 into ``dst`` (no extra volume copy)."""
    if h.slope == 1.0:
        np.add(stored, np.float32(h.intercept), out=dst, casting="unsafe")
    else:
        np.multiply(stored, np.float32(h.slope), out=dst, casting="unsafe")
        dst += np.float32(h.intercept)


def _read_native(dst: npt.NDArray[np.float32], h: SliceHeader, dtype: np.dtype[Any], buf: npt.NDArray[Any]) -> None:
    n_bytes = h.rows * h.columns * dtype.itemsize
    assert h.pixel_offset is not None  # _native_dtype only accepts headers with an offset
    offset = h.pixel_offset + (h.frame_index or 0) * n_bytes
    with open(h.path, "rb") as f:
        f.seek(offset)
        got = f.readinto(buf.data.cast("B"))
    if got != n_bytes:
        raise VolumeError(
            "decode_failed", f"{h.path.name}: pixel data truncated ({got} of {n_bytes} bytes)"
        )
    _store(dst, _fix_bits(buf, h), h)


def _read_decoded(
    dst_rows: Sequence[tuple[npt.NDArray[np.float32], SliceHeader]], path: Path
) -> None:
    """Decode the needed frames of one file through pydicom's pixel handlers."""
    _check_codec_headers(dst_rows, path)
    try:
        first = dst_rows[0][1]
        if first.has_modality_lut:
            ds = pydicom.dcmread(path, force=True)
            arr = ds.pixel_array
            frames = arr if first.number_of_frames > 1 else arr[None]
            for dst, h in dst_rows:
                dst[...] = apply_modality_lut(frames[h.frame_index or 0], ds)
            return
        wanted = {h.frame_index or 0: dst for dst, h in dst_rows}
        by_frame = {h.frame_index or 0: h for _, h in dst_rows}
        indices = sorted(wanted) if first.number_of_frames > 1 else None
        for i, frame in zip(indices or [0], iter_pixels(path, indices=indices), strict=True):
            _store(wanted[i], frame, by_frame[i])
    except VolumeError:
        raise
    except Exception as exc:  # any decoder failure: refuse the series, never crash the worker
        raise VolumeError("decode_failed", f"cannot decode the pixels of {path.name}: {exc}") from exc


def _check_codec_headers(dst_rows: Sequence[tuple[npt.NDArray[np.float32], SliceHeader]], path: Path) -> None:
    """Refuse ('codec_mismatch') a JPEG / JPEG-LS / JPEG 2000 frame whose own header disagrees with
    the DICOM header, before a decoder allocates what the codestream claims (a decompression bomb)."""
    first = dst_rows[0][1]
    if first.transfer_syntax not in codec_headers.CHECKED:
        return
    wanted = [h.frame_index or 0 for _, h in dst_rows]
    try:
        frames = list(codec_headers.encapsulated_frames(path, wanted, first.number_of_frames))
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: the decoder would not get further
        raise VolumeError("decode_failed", f"cannot split the frames of {path.name}: {type(exc).__name__}") from exc
    if len(frames) != len(set(wanted)):
        raise VolumeError("decode_failed", f"{path.name}: {len(frames)} of {len(set(wanted))} frames found")
    for index, frame in frames:
        try:
            geometry = codec_headers.frame_geometry(frame, first.transfer_syntax)
        except (codec_headers.CodecHeaderError, struct.error) as exc:
            raise VolumeError("decode_failed", f"{path.name} frame {index + 1}: no readable codec header "
                              f"({scrub(str(exc))}); not decoded") from exc
        why = codec_headers.disagreement(geometry, first.rows, first.columns, first.samples_per_pixel,
                                         first.bits_allocated)
        if why is not None:
            log.warning("volume: %s frame %d refused before decoding: codec header says %s", path.name, index + 1, why)
            raise VolumeError("codec_mismatch", f"{path.name} frame {index + 1}: codec header says {why}; not decoded")


def _load_pixels(
    slices: Sequence[SliceHeader], out: npt.NDArray[np.float32] | None = None
) -> npt.NDArray[np.float32]:
    """HU of ``slices`` in order, into ``out`` (any strided view, e.g. of the canonical buffer)."""
    rows, cols = slices[0].rows, slices[0].columns
    vol = np.empty((len(slices), rows, cols), dtype=np.float32) if out is None else out
    buffers: dict[np.dtype[Any], npt.NDArray[Any]] = {}
    decode: dict[Path, list[tuple[npt.NDArray[np.float32], SliceHeader]]] = {}
    for k, h in enumerate(slices):
        dtype = _native_dtype(h)
        if dtype is None:
            decode.setdefault(h.path, []).append((vol[k], h))
            continue
        buf = buffers.get(dtype)
        if buf is None:
            buf = buffers[dtype] = np.empty((rows, cols), dtype=dtype)
        try:
            _read_native(vol[k], h, dtype, buf)
        except OSError as exc:
            raise VolumeError("decode_failed", f"cannot read the pixels of {h.path.name}: {exc}") from exc
    for path, items in decode.items():
        _read_decoded(items, path)
    return vol


def _apply_tilt(vol: npt.NDArray[np.float32], shifts: npt.NDArray[np.float64]) -> None:
    """Shift each slice in-plane so all share slice 0's grid (in place)."""
    for k in range(vol.shape[0]):
        if np.abs(shifts[k]).max() > 1e-6:
            vol[k] = ndimage.shift(vol[k], shifts[k], order=1, mode="constant", cval=PAD_HU)


def _resample_z(
    vol: npt.NDArray[np.float32],
    dist: npt.NDArray[np.float64],
    grid: npt.NDArray[np.float64],
    out: npt.NDArray[np.float32],
) -> npt.NDArray[np.intp]:
    """Linear interpolation along the normal onto ``grid`` (decreasing) into ``out``; returns nearest sources."""
    n = len(dist)
    below = np.searchsorted(dist[::-1], grid, side="right")  # sources with dist <= t
    hi = np.clip(n - below, 0, n - 1)  # nearest source at or below t (decreasing order)
    lo = np.clip(hi - 1, 0, n - 1)  # the one above it
    nearest = np.empty(len(grid), dtype=np.intp)
    for i, t in enumerate(grid):
        a, b = int(lo[i]), int(hi[i])
        if a == b or dist[a] == dist[b]:
            out[i] = vol[b]
            nearest[i] = b
            continue
        w = np.float32(min(max((dist[a] - t) / (dist[a] - dist[b]), 0.0), 1.0))  # 0 at a, 1 at b
        np.subtract(vol[b], vol[a], out=out[i])
        out[i] *= w
        out[i] += vol[a]
        nearest[i] = a if w < 0.5 else b
    return nearest


def check_size(headers: Sequence[SliceHeader], limits: LimitsSection) -> None:
    """Refuse ('too_large') before any pixel is decoded or any buffer allocated.

    A crafted header (Rows = Columns = 65535, thousands of frames) would otherwise make
    the float32 volume buffer, or a codec's output, exhaust memory.
    """
    for h in headers:
        if h.rows * h.columns > limits.max_frame_pixels:
            raise VolumeError("too_large", f"{h.path.name}: {h.rows} x {h.columns} pixels per frame exceed "
                              f"limits.max_frame_pixels = {limits.max_frame_pixels}")
    total = sum(h.rows * h.columns for h in headers)
    if total > limits.max_series_voxels:
        raise VolumeError("too_large", f"{len(headers)} frames, {total} voxels in all, exceed "
                          f"limits.max_series_voxels = {limits.max_series_voxels}")


def _canonical_refs(
    refs: Sequence[SliceRef], ro: Reorientation, n_slices: int
) -> tuple[tuple[SliceRef, ...], str | None]:
    """Source reference per canonical slice, and a note when they cannot be one per slice.

    Axial acquisitions (the acquisition slice axis stays the slice axis): the refs follow the
    slices.  Coronal/sagittal acquisitions: every axial slice cuts every source image, so
    each slice names the middle source image -- a real instance that intersects the slice
    through the centre of the field of view (deterministic: the stack is sorted).
    """
    if ro.perm[0] == 0:
        return tuple(refs[::-1] if ro.flip[0] else refs), None
    middle = refs[(len(refs) - 1) // 2]
    plane = "coronal" if ro.perm[1] == 0 else "sagittal"
    note = (
        f"{plane} acquisition reoriented to axial slices: each slice cuts all {len(refs)} source "
        f"images, so its source reference is the middle one ({middle.sop_instance_uid})"
    )
    return (middle,) * n_slices, note


def _orientation_notes(ro: Reorientation) -> list[str]:
    notes: list[str] = []
    if not ro.is_identity:
        notes.append(
            f"reoriented from acquisition axes {ro.acquisition_codes()} to the canonical "
            f"{''.join(CANONICAL_AXCODES)} (slice toward the feet, rows posterior, columns to the left)"
        )
    if ro.max_angle_deg > OBLIQUE_NOTE_DEG:
        notes.append(
            f"oblique orientation: index axes up to {ro.max_angle_deg:.1f} deg from the patient axes were "
            "taken to the nearest ones (no resampling; the affine stays exact)"
        )
    return notes


def _fill(plan: _Plan, target: npt.NDArray[np.float32]) -> list[SliceRef]:
    """Pixels of the plan into ``target`` (acquisition order); the source ref of each slice."""
    refs = [h.ref for h in plan.slices]
    if plan.z_grid is None:
        _load_pixels(plan.slices, target)
        if plan.shifts is not None:
            _apply_tilt(target, plan.shifts)
        return refs
    src = _load_pixels(plan.slices)
    if plan.shifts is not None:
        _apply_tilt(src, plan.shifts)
    nearest = _resample_z(src, plan.dist, plan.z_grid, target)
    return [refs[int(i)] for i in nearest]


def _pixel_notes(slices: Sequence[SliceHeader]) -> list[str]:
    notes: list[str] = []
    assumed = {(h.slope, h.intercept) for h in slices if h.rescale_assumed}
    for slope, intercept in sorted(assumed):
        notes.append(
            f"Rescale Slope/Intercept absent: assumed {slope:g}/{intercept:g} "
            f"({'signed pixels taken as HU' if intercept == 0 else 'unsigned pixels, CT convention'})"
        )
    if any(h.photometric == "MONOCHROME1" for h in slices):
        notes.append("MONOCHROME1: HU from the rescale, not inverted (inversion is display-only)")
    return notes


def assemble_volume(
    paths: Sequence[Path],
    policy: VolumeSection,
    *,
    headers: Sequence[SliceHeader] | None = None,
    limits: LimitsSection | None = None,
) -> Volume:
    """Build the HU volume of one series from its instance files, or raise :class:`VolumeError`.

    The array is in the canonical orientation (see the module doc) whatever the patient
    position and acquisition plane.  ``headers`` may be passed when the caller already read
    them with :func:`read_slice_headers`.  ``limits`` (default: the ``[limits]`` defaults)
    caps the size before anything is decoded.
    """
    hdrs = list(headers) if headers is not None else read_slice_headers(paths)
    check_size(hdrs, limits or LimitsSection())
    plan = _plan(hdrs, policy)
    first = plan.slices[0]
    n_acq = len(plan.z_grid) if plan.z_grid is not None else len(plan.slices)
    acq_shape = (n_acq, first.rows, first.columns)
    ro = canonical_reorientation(plan.affine[:3, :3])
    vol = np.empty(ro.shape(acq_shape), dtype=np.float32)  # canonical layout, filled in place
    acq_refs = _fill(plan, ro.acquisition_view(vol))
    refs, ref_note = _canonical_refs(acq_refs, ro, vol.shape[0])
    notes = [*plan.notes, *_pixel_notes(plan.slices), *_orientation_notes(ro)]
    if ref_note is not None:
        notes.append(ref_note)
    spacing = tuple(plan.spacing[a] for a in ro.perm)
    log.debug(
        "volume: %s slices %s spacing %s axes %s", first.series_instance_uid, vol.shape, spacing,
        ro.acquisition_codes(),
    )
    return Volume(
        array=vol,
        spacing=(spacing[0], spacing[1], spacing[2]),
        affine=ro.affine(plan.affine, acq_shape),
        slice_refs=refs,
        study_instance_uid=first.study_instance_uid,
        series_instance_uid=first.series_instance_uid,
        frame_of_reference_uid=first.frame_of_reference_uid,
        notes=tuple(notes),
        sources=tuple(h.ref for h in plan.slices),
    )


__all__ = [
    "CANONICAL_AXCODES",
    "CANONICAL_DIRECTIONS",
    "ERROR_CODES",
    "Reorientation",
    "SliceHeader",
    "VolumeError",
    "assemble_volume",
    "canonical_reorientation",
    "check_size",
    "read_slice_headers",
]
