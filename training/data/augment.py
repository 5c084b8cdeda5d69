"""Data augmentation as TensorFlow graph ops, for 2D (H, W, C) and 3D (D, H, W, C) samples.

Everything draws from stateless random ops keyed by a per-sample seed, so a pipeline is
deterministic under its seed and the ops run inside ``tf.data`` maps (graph mode, parallel).

* flips along chosen spatial axes;
* small in-plane rotations (a 3D sample rotates every slice alike);
* contrast (scale about the sample mean) and brightness (shift), in normalised units;
* elastic deformation: a random displacement field (white noise smoothed by a separable
  Gaussian, scaled so its standard deviation is ``elastic_alpha`` voxels), applied by
  bilinear (2D) / trilinear (3D) interpolation.  Zero strength is the exact identity; with
  ``alpha`` well below ``sigma`` the map has a positive Jacobian everywhere (no folding).
  Rotation and elastic displacement are summed and applied in one interpolation pass
  (edges replicate).

Labels are never touched: every op is a geometric or intensity change that keeps the class.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from training.tfenv import tf

log = logging.getLogger(__name__)

Tensor = Any  # tf.Tensor; TensorFlow ships no usable type stubs


class AugmentConfig(BaseModel):
    """Augmentation strengths; zero disables an op.  Spatial axes count from 0 without channels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flip_axes: tuple[int, ...] = Field(
        (-1,), description="Spatial axes flipped with probability flip_prob (-1: left-right)."
    )
    flip_prob: float = Field(0.5, ge=0, le=1)
    rotate_deg: float = Field(10.0, ge=0, le=180, description="Max in-plane rotation, degrees.")
    contrast: float = Field(0.1, ge=0, lt=1, description="Contrast factor drawn from 1 +- contrast.")
    brightness: float = Field(0.05, ge=0, description="Additive shift drawn from +- brightness.")
    elastic_alpha: float = Field(2.0, ge=0, description="Displacement std, voxels (0: off).")
    elastic_sigma: float = Field(8.0, gt=0, description="Gaussian smoothing of the field, voxels.")
    elastic_prob: float = Field(0.5, ge=0, le=1)
    elastic_z: bool = Field(False, description="3D: also displace along z (thick slices: usually off).")


# --------------------------------------------------------------------------- helpers


def _uniform(seed: Tensor, lo: float, hi: float) -> Tensor:
    return tf.random.stateless_uniform([], seed=seed, minval=lo, maxval=hi, dtype=tf.float32)


def gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix that Gaussian-smooths a length-n signal with symmetric (mirror) edges.

    Smoothing along an axis is then one small matmul, far cheaper on CPU than a 1-channel
    convolution with a wide kernel; the matrix is a trace-time constant.
    """
    radius = max(1, int(math.ceil(3.0 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    mat = np.zeros((n, n), dtype=np.float64)
    period = 2 * n
    for i in range(n):
        src = np.mod(i + offsets, period)
        src = np.where(src >= n, period - 1 - src, src)  # symmetric reflection: ... 1 0 | 0 1 ... n-1 | n-1 ...
        np.add.at(mat[i], src, weights)
    return mat.astype(np.float32)


def smooth_upsample_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, m) matrix: Gaussian smoothing on a coarse grid of m points, then linear upsampling to n.

    A field smoothed with ``sigma`` voxels has no detail finer than ~sigma, so the noise is
    drawn and smoothed on a grid ``factor = max(1, floor(sigma / 2))`` times coarser (sigma
    stays >= 2 coarse voxels there) and interpolated back: the same smooth random field for a
    fraction of the random numbers and arithmetic.
    """
    factor = max(1, int(sigma // 2))
    m = -(-(n - 1) // factor) + 1  # coarse points j sit at fine coordinate j * factor
    coarse = gaussian_matrix(m, sigma / factor).astype(np.float64)
    pos = np.arange(n) / factor
    j0 = np.minimum(np.floor(pos).astype(int), m - 1)
    j1 = np.minimum(j0 + 1, m - 1)
    w = pos - j0
    up = np.zeros((n, m))
    up[np.arange(n), j0] += 1.0 - w
    up[np.arange(n), j1] += w
    return (up @ coarse).astype(np.float32)


def _apply_axis(field: Tensor, axis: int, mat: np.ndarray) -> Tensor:
    """``out[..., i, ...] = sum_j mat[i, j] * field[..., j, ...]`` along ``axis`` (one matmul)."""
    moved = tf.experimental.numpy.moveaxis(field, axis, -1)
    lead = tf.shape(moved)[:-1]
    flat = tf.reshape(moved, [-1, mat.shape[1]])
    out = tf.matmul(flat, tf.constant(mat), transpose_b=True)
    out = tf.reshape(out, tf.concat([lead, [mat.shape[0]]], axis=0))
    return tf.experimental.numpy.moveaxis(out, -1, axis)


def elastic_field(spatial_shape: tuple[int, ...], alpha: float, sigma: float, seed: Tensor, z: bool = True) -> Tensor:
    """Displacement field in voxels: Gaussian-smoothed noise with std ``alpha`` per component.

    Shape (*spatial_shape, ndim); for 3D with ``z`` False it is (*spatial_shape, 2), the
    in-plane (rows, columns) components only (see :func:`warp`).
    """
    ndim = len(spatial_shape)
    mats = [smooth_upsample_matrix(n, sigma) for n in spatial_shape]
    coarse_shape = [m.shape[1] for m in mats]
    comps = []
    seeds = tf.random.experimental.stateless_split(seed, num=ndim)
    for c in range(ndim):
        if ndim == 3 and c == 0 and not z:
            continue
        f = tf.random.stateless_normal(coarse_shape, seed=seeds[c], dtype=tf.float32)
        for axis in range(ndim):
            f = _apply_axis(f, axis, mats[axis])
        std = tf.math.reduce_std(f)
        comps.append(f * (alpha / tf.maximum(std, 1e-6)))
    return tf.stack(comps, axis=-1)


def warp(image: Tensor, displacement: Tensor) -> Tensor:
    """Sample ``image`` (*spatial, C) at ``grid + displacement`` with (bi/tri)linear interpolation.

    ``displacement`` is (*spatial, k) and moves the LAST k spatial axes (k = 2 on a 3D image:
    an in-plane deformation, interpolated bilinearly within each slice -- half the work of a
    trilinear warp).  Coordinates are clamped to the volume (edge values replicate).  At zero
    displacement the result equals the input exactly.
    """
    spatial = [int(n) for n in image.shape[:-1]]
    ndim = len(spatial)
    k = int(displacement.shape[-1])
    moved_axes = list(range(ndim - k, ndim))
    grids = tf.meshgrid(*[tf.range(n, dtype=tf.float32) for n in spatial], indexing="ij")
    strides = [int(np.prod(spatial[a + 1 :])) for a in range(ndim)]
    base = tf.zeros(spatial, tf.int32)  # linear index contribution of the axes that do not move
    for a in range(ndim - k):
        base = base + tf.cast(grids[a], tf.int32) * strides[a]
    lo_i, hi_i, frac = [], [], []
    for j, a in enumerate(moved_axes):
        c = tf.clip_by_value(grids[a] + displacement[..., j], 0.0, float(spatial[a] - 1))
        f = tf.floor(c)
        frac.append(c - f)
        lo_i.append(tf.cast(f, tf.int32))
        hi_i.append(tf.minimum(lo_i[-1] + 1, spatial[a] - 1))
    flat = tf.reshape(image, [-1, image.shape[-1]])
    out = tf.zeros_like(image)
    for corner in range(2**k):
        linear = base
        weight = tf.ones(spatial, tf.float32)
        for j, a in enumerate(moved_axes):
            upper = (corner >> j) & 1
            linear = linear + (hi_i[j] if upper else lo_i[j]) * strides[a]
            weight = weight * (frac[j] if upper else (1.0 - frac[j]))
        out = out + tf.gather(flat, linear) * weight[..., None]
    return out


def rotation_field(spatial_shape: tuple[int, ...], angle_rad: Tensor) -> Tensor:
    """In-plane displacement (*spatial_shape, 2) = (rows, columns) that rotates about the centre.

    For 3D every slice rotates alike.  Composed with an elastic field it costs a single
    interpolation pass (see :func:`warp` for in-plane fields on 3D images).
    """
    h, w = spatial_shape[-2], spatial_shape[-1]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = tf.meshgrid(tf.range(h, dtype=tf.float32) - cy, tf.range(w, dtype=tf.float32) - cx, indexing="ij")
    c, s = tf.cos(angle_rad), tf.sin(angle_rad)
    dy = (s * xx + c * yy) - yy  # output (y, x) samples input R(p - c) + c
    dx = (c * xx - s * yy) - xx
    plane = tf.stack([dy, dx], axis=-1)  # (h, w, 2)
    if len(spatial_shape) == 2:
        return plane
    return tf.tile(plane[None], [spatial_shape[0], 1, 1, 1])  # (d, h, w, 2): in-plane components only


def rotate(image: Tensor, angle_rad: Tensor) -> Tensor:
    """Rotate (H, W, C) or every slice of (D, H, W, C) about the image centre (linear, edges replicated)."""
    return warp(image, rotation_field(tuple(int(d) for d in image.shape[:-1]), angle_rad))


# --------------------------------------------------------------------------- the augmentation


def augment(image: Tensor, seed: Tensor, cfg: AugmentConfig) -> Tensor:
    """One random augmentation of ``image`` ((H, W, C) or (D, H, W, C), float32) keyed by ``seed`` ([2] int)."""
    rank = len(image.shape)
    if rank not in (3, 4):
        raise ValueError(f"augment expects (H, W, C) or (D, H, W, C), got shape {image.shape}")
    n_spatial = rank - 1
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=7 + len(cfg.flip_axes))
    x = tf.convert_to_tensor(image, tf.float32)
    if cfg.flip_prob > 0:
        for i, axis in enumerate(cfg.flip_axes):
            flip = _uniform(seeds[7 + i], 0.0, 1.0) < cfg.flip_prob
            x = tf.where(flip, tf.reverse(x, [axis % n_spatial]), x)
    spatial = tuple(int(d) for d in x.shape[:-1])
    displacement = None
    if cfg.rotate_deg > 0:
        angle = _uniform(seeds[2], -cfg.rotate_deg, cfg.rotate_deg) * (math.pi / 180.0)
        displacement = rotation_field(spatial, angle)
    if cfg.elastic_alpha > 0 and cfg.elastic_prob > 0:
        on = tf.cast(_uniform(seeds[4], 0.0, 1.0) < cfg.elastic_prob, tf.float32)
        field = on * elastic_field(spatial, cfg.elastic_alpha, cfg.elastic_sigma, seeds[3], cfg.elastic_z)
        if displacement is not None and displacement.shape[-1] < field.shape[-1]:  # 3D with z: pad rotation
            displacement = tf.concat([tf.zeros_like(displacement[..., :1]), displacement], axis=-1)
        displacement = field if displacement is None else displacement + field
    if displacement is not None:
        x = warp(x, displacement)  # rotation and elastic deformation in one interpolation
    if cfg.contrast > 0:
        mean = tf.reduce_mean(x)
        x = (x - mean) * _uniform(seeds[5], 1.0 - cfg.contrast, 1.0 + cfg.contrast) + mean
    if cfg.brightness > 0:
        x = x + _uniform(seeds[6], -cfg.brightness, cfg.brightness)
    return tf.ensure_shape(x, image.shape)
