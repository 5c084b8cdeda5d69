"""THE one implementation of preprocessing, shared by the node and the training package.

numpy/scipy only, no TensorFlow.  A :class:`PreprocessSpec` travels inside every model
manifest, so a model is always fed exactly the pixels it was trained on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage

log = logging.getLogger(__name__)


class Window(BaseModel):
    """An HU window; each window becomes one channel scaled to [0, 1]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    center: float
    width: float = Field(gt=0)


class PreprocessSpec(BaseModel):
    """How a volume in HU, or one 2D image, becomes model input.

    ``mode``:
      * ``"2d"``: one slice -> (rows, cols, channels) with channels = windows.
      * ``"2.5d"``: one slice with ``context_slices`` neighbours on each side, one window ->
        channels = 2 * context_slices + 1 (with several windows: slices x windows, slice-major).
      * ``"3d"``: the whole (resampled) volume cropped/padded to ``input_shape`` (z, y, x), channels = windows.
      * ``"image"``: one 2D image (a photograph or radiograph, already decoded to display values in
        [0, 1] by the caller, see :func:`image_input`) resized to ``input_shape`` (rows, cols);
        ``color`` says whether the model takes 3 channels (in ``channel_order``) or 1; windows and
        spacings do not apply.
    ``target_spacing`` is (slice, row, column) mm; None keeps the source spacing.  For 2D modes
    only the in-plane part is used unless ``resample_z`` is set.
    ``input_shape`` is (rows, cols) for 2D modes and images, (slices, rows, cols) for 3D.
    Normalisation: ``window01`` (CT: the windowed [0, 1] values), ``zscore`` (per input),
    ``unit`` (images: display values in [0, 1]), ``mean_std`` (images: (x - mean) / std per channel,
    on [0, 1] values, e.g. ImageNet statistics).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["2d", "2.5d", "3d", "image"]
    windows: tuple[Window, ...] = Field(default=(), description="HU windows (CT modes; at least one).")
    input_shape: tuple[int, ...]
    target_spacing: tuple[float, float, float] | None = None
    resample_z: bool = False
    context_slices: int = Field(0, ge=0)
    normalization: Literal["window01", "zscore", "unit", "mean_std"] = "window01"
    pad_value_hu: float = -1024.0
    color: Literal["rgb", "grey"] = Field("rgb", description="Image mode: 3-channel or 1-channel model input.")
    channel_order: Literal["rgb", "bgr"] = Field("rgb", description="Image mode: channel order of an rgb input.")
    resize: Literal["stretch", "pad"] = Field(
        "stretch", description="Image mode: 'stretch' to input_shape, or 'pad' (keep the aspect ratio, "
        "centred, pad with pad_value)."
    )
    pad_value: float = Field(0.0, description="Image mode: display value [0, 1] of the padding.")
    mean: tuple[float, ...] | None = Field(None, description="Image mode, mean_std: per-channel mean.")
    std: tuple[float, ...] | None = Field(None, description="Image mode, mean_std: per-channel std (> 0).")

    @model_validator(mode="after")
    def _check(self) -> PreprocessSpec:
        want = 3 if self.mode == "3d" else 2
        if len(self.input_shape) != want or any(s < 1 for s in self.input_shape):
            raise ValueError(f"input_shape must have {want} positive entries for mode {self.mode!r}")
        if self.mode != "2.5d" and self.context_slices:
            raise ValueError("context_slices is only meaningful for mode '2.5d'")
        if self.mode == "image":
            self._check_image()
        else:
            if not self.windows:
                raise ValueError(f"windows: mode {self.mode!r} needs at least one HU window")
            if self.normalization not in ("window01", "zscore"):
                raise ValueError(f"normalization {self.normalization!r} is for mode 'image' only")
            if self.mean is not None or self.std is not None:
                raise ValueError("mean/std are for mode 'image' only")
        return self

    def _check_image(self) -> None:
        if self.windows:
            raise ValueError("windows: mode 'image' takes display values, not HU windows")
        if self.target_spacing is not None or self.resample_z:
            raise ValueError("target_spacing/resample_z do not apply to mode 'image'")
        if self.normalization == "window01":
            raise ValueError("normalization: mode 'image' takes 'unit', 'zscore' or 'mean_std'")
        n = self.channels
        if self.normalization == "mean_std":
            if self.mean is None or self.std is None:
                raise ValueError("normalization 'mean_std' needs mean and std")
            if len(self.mean) != n or len(self.std) != n:
                raise ValueError(f"mean and std need {n} entries (one per channel)")
            if any(s <= 0 for s in self.std):
                raise ValueError("std entries must be > 0")
        elif self.mean is not None or self.std is not None:
            raise ValueError("mean/std are only used by normalization 'mean_std'")

    @property
    def channels(self) -> int:
        if self.mode == "image":
            return 3 if self.color == "rgb" else 1
        if self.mode == "2.5d":
            return (2 * self.context_slices + 1) * len(self.windows)
        return len(self.windows)


# --------------------------------------------------------------------------------------------
# Functions.  Everything below works on (z, y, x) float32 HU arrays and is vectorised: the
# maths never loops over slices in Python.  Resampling is "origin-aligned": output voxel 0
# sits on input voxel 0 and output voxel i on input coordinate i * target / source, so a
# volume's affine origin is unchanged by resampling.
# --------------------------------------------------------------------------------------------

FloatArray = npt.NDArray[np.float32]


def apply_windows(hu: npt.NDArray[np.floating[Any]], windows: Sequence[Window]) -> FloatArray:
    """Map HU to [0, 1] through each window; the windows become a new trailing channel axis."""
    if not windows:
        raise ValueError("at least one window is needed")
    lo = np.array([w.center - w.width / 2.0 for w in windows], dtype=np.float32)
    inv = np.array([1.0 / w.width for w in windows], dtype=np.float32)
    out = np.asarray(hu, dtype=np.float32)[..., None] - lo
    out *= inv
    np.clip(out, 0.0, 1.0, out=out)
    return out


def output_length(n_in: int, s_in: float, s_out: float) -> int:
    """Samples along an axis of ``n_in`` voxels at ``s_in`` mm after resampling to ``s_out`` mm.

    ``n_in * s_in / s_out`` rounded half-up (at least 1), so the physical extent is kept.
    """
    return max(1, math.floor(n_in * s_in / s_out + 0.5))


def _axis_positions(n_in: int, s_in: float, s_out: float) -> npt.NDArray[np.float64]:
    """Input coordinates (origin-aligned) of the output samples along one axis."""
    n_out = output_length(n_in, s_in, s_out)
    pos = np.arange(n_out, dtype=np.float64) * (s_out / s_in)
    return np.minimum(pos, n_in - 1)  # the last sample may fall just past the end: replicate the edge


def _resample_axis_linear(arr: FloatArray, axis: int, pos: npt.NDArray[np.float64]) -> FloatArray:
    """Separable linear interpolation of ``arr`` along ``axis`` at fractional positions ``pos``."""
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, arr.shape[axis] - 1)
    w = (pos - i0).astype(np.float32)
    shape = [1] * arr.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    a0 = np.take(arr, i0, axis=axis)
    a1 = np.take(arr, i1, axis=axis)
    a1 -= a0
    a1 *= w
    a0 += a1
    return a0


def resample(
    hu: npt.NDArray[np.floating[Any]],
    spacing: Sequence[float],
    target_spacing: Sequence[float | None],
    order: int = 1,
) -> FloatArray:
    """Resample a volume to ``target_spacing`` (same axis order as ``spacing``; None keeps an axis).

    Output length per axis is ``round(n * spacing / target)`` (at least 1).  ``order`` 0 is
    nearest neighbour, 1 separable linear (the default, fast), higher orders use scipy splines.
    Axes whose spacing already matches are not touched.
    """
    arr = np.asarray(hu, dtype=np.float32)
    if len(spacing) != arr.ndim or len(target_spacing) != arr.ndim:
        raise ValueError(f"spacing/target_spacing need {arr.ndim} entries, got {spacing}, {target_spacing}")
    axes: list[tuple[int, npt.NDArray[np.float64]]] = []
    for ax, (s, t) in enumerate(zip(spacing, target_spacing, strict=True)):
        if t is None or math.isclose(s, t, rel_tol=1e-6):
            continue
        if s <= 0 or t <= 0:
            raise ValueError(f"spacings must be positive, got {s} -> {t}")
        axes.append((ax, _axis_positions(arr.shape[ax], float(s), float(t))))
    if not axes:
        return arr
    if order == 0:
        for ax, pos in axes:
            arr = np.take(arr, np.rint(pos).astype(np.intp), axis=ax)
        return arr
    if order == 1:
        for ax, pos in axes:
            arr = _resample_axis_linear(arr, ax, pos)
        return arr
    # Higher orders: one spline pass over the full grid.
    grids = [np.arange(n, dtype=np.float64) for n in arr.shape]
    for ax, pos in axes:
        grids[ax] = pos
    coords = np.meshgrid(*grids, indexing="ij", sparse=False)
    out = ndimage.map_coordinates(arr, coords, order=order, mode="nearest")
    return np.asarray(out, dtype=np.float32)


def crop_or_pad(arr: npt.NDArray[Any], shape: Sequence[int], pad_value: float) -> npt.NDArray[Any]:
    """Centre-crop or pad the leading ``len(shape)`` axes of ``arr`` to ``shape``.

    Trailing axes (e.g. channels) are kept.  When the difference is odd the extra voxel is
    cropped from / padded at the end.
    """
    if len(shape) > arr.ndim:
        raise ValueError(f"shape {tuple(shape)} has more axes than the array {arr.shape}")
    src: list[slice] = []
    dst: list[slice] = []
    for n, want in zip(arr.shape, shape, strict=False):
        if n >= want:
            start = (n - want) // 2
            src.append(slice(start, start + want))
            dst.append(slice(0, want))
        else:
            start = (want - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    if all(n == w for n, w in zip(arr.shape, shape, strict=False)):
        return arr
    out_shape = tuple(shape) + arr.shape[len(shape):]
    out = np.full(out_shape, pad_value, dtype=arr.dtype)
    out[tuple(dst)] = arr[tuple(src)]
    return out


def _normalize(windowed: FloatArray, normalization: str, sample_axes: int) -> FloatArray:
    """Apply the spec's normalisation; ``zscore`` is per sample (the leading ``sample_axes``)."""
    if normalization == "window01":
        return windowed
    if normalization == "zscore":
        axes = tuple(range(sample_axes, windowed.ndim))
        mean = windowed.mean(axis=axes, keepdims=True, dtype=np.float64).astype(np.float32)
        std = windowed.std(axis=axes, keepdims=True, dtype=np.float64).astype(np.float32)
        std[std < 1e-6] = 1.0  # a constant sample (e.g. all air) maps to zeros, never NaN
        windowed -= mean
        windowed /= std
        return windowed
    raise ValueError(f"unknown normalization {normalization!r}")


def slices_2d(
    hu: npt.NDArray[np.floating[Any]],
    spacing: Sequence[float],
    spec: PreprocessSpec,
    indices: Sequence[int] | npt.NDArray[np.integer[Any]] | None = None,
) -> FloatArray:
    """Model inputs for the 2D and 2.5D modes: (n, rows, cols, channels) float32.

    Input ``k`` belongs to slice ``k`` (or to ``indices[k]`` when given, which lets a caller
    work in batches without building every input at once).  In-plane the volume is resampled
    to ``spec.target_spacing[1:]`` and centre-cropped/padded to ``spec.input_shape``.  For
    2.5D the neighbours ``k-c .. k+c`` are stacked slice-major (for each slice, each window),
    replicating the first/last slice at the ends.  With ``spec.resample_z`` the volume is also
    resampled along z first, and ``k`` then indexes the resampled slices.
    """
    if spec.mode not in ("2d", "2.5d"):
        raise ValueError(f"slices_2d needs a 2d/2.5d spec, got mode {spec.mode!r}")
    arr = np.asarray(hu, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {arr.shape}")
    if spec.target_spacing is not None and spec.resample_z:
        arr = resample(arr, spacing, spec.target_spacing)
    n_slices = arr.shape[0]
    idx = np.arange(n_slices) if indices is None else np.asarray(indices, dtype=np.intp)
    if idx.size and (idx.min() < 0 or idx.max() >= n_slices):
        raise IndexError(f"slice indices must lie in [0, {n_slices}), got {idx.min()}..{idx.max()}")
    c = spec.context_slices if spec.mode == "2.5d" else 0
    # Only the slices that are needed (with their neighbours) are resampled in-plane,
    # cropped and windowed, once each; then the neighbourhoods are gathered.
    neighbours = np.clip(idx[:, None] + np.arange(-c, c + 1)[None, :], 0, n_slices - 1)
    need = np.unique(neighbours)
    sub = arr if need.size == n_slices else arr[need]
    if spec.target_spacing is not None and not spec.resample_z:
        sub = resample(sub, spacing, (None, spec.target_spacing[1], spec.target_spacing[2]))
    sub = crop_or_pad(sub, (sub.shape[0], *spec.input_shape), spec.pad_value_hu)
    windowed = apply_windows(sub, spec.windows)  # (m, rows, cols, W)
    lookup = np.searchsorted(need, neighbours)
    stacked = windowed[lookup]  # (n, 2c+1, rows, cols, W)
    n = idx.size
    rows, cols = spec.input_shape
    out = np.ascontiguousarray(np.moveaxis(stacked, 1, 3)).reshape(n, rows, cols, spec.channels)
    return _normalize(out, spec.normalization, sample_axes=1)


def volume_3d(
    hu: npt.NDArray[np.floating[Any]], spacing: Sequence[float], spec: PreprocessSpec
) -> FloatArray:
    """Model input for the 3D mode: (z, y, x, channels) float32 of exactly ``spec.input_shape``."""
    if spec.mode != "3d":
        raise ValueError(f"volume_3d needs a 3d spec, got mode {spec.mode!r}")
    arr = np.asarray(hu, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {arr.shape}")
    if spec.target_spacing is not None:
        arr = resample(arr, spacing, spec.target_spacing)
    arr = crop_or_pad(arr, spec.input_shape, spec.pad_value_hu)
    out = apply_windows(arr, spec.windows)
    return _normalize(out[None], spec.normalization, sample_axes=1)[0]


# --------------------------------------------------------------------------------------------
# 2D images (mode "image").  The caller hands display values in [0, 1], (rows, cols, 1 or 3),
# RGB order, bright = high (``ingest.image2d`` does that for DICOM: YBR -> RGB, MONOCHROME1
# inverted, VOI window); training hands its synthetic photographs the same way.
# --------------------------------------------------------------------------------------------


def _resize_axis(arr: FloatArray, axis: int, n_out: int) -> FloatArray:
    """Resize one axis to ``n_out`` samples: box-average first when shrinking by 2x or more
    (linear interpolation alone aliases a 2000-pixel photograph down to 256), then linear with
    pixel centres aligned (output pixel i covers input ((i + 0.5) * n_in / n_out - 0.5))."""
    n_in = arr.shape[axis]
    if n_in == n_out:
        return arr
    k = n_in // n_out
    if k >= 2:
        m = (n_in // k) * k
        start = (n_in - m) // 2
        sub = np.take(arr, np.arange(start, start + m), axis=axis)
        shape = list(sub.shape)
        shape[axis : axis + 1] = [m // k, k]
        arr = sub.reshape(shape).mean(axis=axis + 1, dtype=np.float32)
        n_in = arr.shape[axis]
        if n_in == n_out:
            return arr
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    return _resample_axis_linear(arr, axis, np.clip(pos, 0.0, n_in - 1))


def image_geometry(shape: tuple[int, int], spec: PreprocessSpec) -> tuple[tuple[float, float], tuple[float, float]]:
    """How a source image's pixel (r, c) maps onto the model input: ((scale_r, scale_c), (off_r, off_c))
    with model coordinate = (source coordinate + 0.5) * scale - 0.5 - offset (pixel centres)."""
    rows, cols = spec.input_shape
    if spec.resize == "stretch":
        return (rows / shape[0], cols / shape[1]), (0.0, 0.0)
    s = min(rows / shape[0], cols / shape[1])
    new = (max(1, round(shape[0] * s)), max(1, round(shape[1] * s)))
    return (new[0] / shape[0], new[1] / shape[1]), (-float((rows - new[0]) // 2), -float((cols - new[1]) // 2))


def image_input(image: npt.NDArray[np.floating[Any]], spec: PreprocessSpec) -> FloatArray:
    """Model input for mode ``image``: (rows, cols, channels) float32 from display values in [0, 1].

    ``image`` is (rows, cols), (rows, cols, 1) or (rows, cols, 3) RGB.  A grey image fed to an RGB
    model is replicated to three channels; an RGB image fed to a grey model becomes its luma
    (ITU-R BT.601 weights).  Then resized (``spec.resize``), reordered and normalised.
    """
    if spec.mode != "image":
        raise ValueError(f"image_input needs an image spec, got mode {spec.mode!r}")
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"expected a (rows, cols[, 1|3]) image, got shape {arr.shape}")
    if spec.color == "grey" and arr.shape[2] == 3:
        arr = (arr @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    rows, cols = spec.input_shape
    if spec.resize == "stretch":
        out = _resize_axis(_resize_axis(arr, 0, rows), 1, cols)
    else:
        (sr, sc), (orr, occ) = image_geometry((arr.shape[0], arr.shape[1]), spec)
        new_r, new_c = round(arr.shape[0] * sr), round(arr.shape[1] * sc)
        inner = _resize_axis(_resize_axis(arr, 0, new_r), 1, new_c)
        out = np.full((rows, cols, arr.shape[2]), spec.pad_value, np.float32)
        out[int(-orr) : int(-orr) + new_r, int(-occ) : int(-occ) + new_c] = inner
    if spec.color == "rgb" and out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    if spec.color == "rgb" and spec.channel_order == "bgr":
        out = out[..., ::-1]
    out = np.ascontiguousarray(out, dtype=np.float32)
    if spec.normalization == "mean_std":
        assert spec.mean is not None and spec.std is not None  # checked by the spec's validator
        out -= np.asarray(spec.mean, np.float32)
        out /= np.asarray(spec.std, np.float32)
        return out
    if spec.normalization == "zscore":
        return _normalize(out[None], "zscore", sample_axes=1)[0]
    return out
