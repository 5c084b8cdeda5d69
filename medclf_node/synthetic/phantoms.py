"""Synthetic chest CT phantoms with known nodule ground truth.

Nobody here can download a CT data set, so models and tests train on these.  The anatomy is
built to make the task non-trivial: a nodule is not "any bright blob" because lungs also hold
vessels (tubes of soft-tissue density that look like round blobs in cross-section), ribs,
spine and heart sit next to the lungs, lung parenchyma is textured and denser posteriorly,
and the whole image is blurred (scanner PSF) and noisy.

Geometry is in millimetres so that varied pixel spacing and slice thickness give the same
patient; the z axis is expressed as a fraction of the scanned range (a chest CT is planned to
cover the lungs).  Slice index 0 is the most superior slice and the index runs toward the
feet, the same convention as the node's ``assemble_volume`` (and ``highdicom.Volume``) for an
axial series, so a phantom written to DICOM and read back by the node is the same array.
Everything is vectorised numpy and rendered in slabs so a 300x512x512 phantom takes a few
seconds and bounded memory.  Deterministic under the seed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

log = logging.getLogger(__name__)

NoduleKind = Literal["solid", "ground_glass"]
FloatArray = npt.NDArray[np.float32]
AnyFloat = npt.NDArray[np.floating[Any]]

#: A slice is labelled positive when its cross-section of a nodule has at least this fraction
#: of the nodule radius, i.e. |dz| <= radius * sqrt(1 - f**2).  Tiny polar caps do not count.
SLICE_LABEL_MIN_SECTION = 0.5
HU_MIN, HU_MAX = -1024.0, 3071.0
_SLAB = 24  # slices rendered at once; bounds temporaries to ~_SLAB * rows * cols * 4 bytes each


@dataclass(frozen=True)
class Nodule:
    """One nodule: centre voxel (z, y, x), radius in mm, kind and core density in HU."""

    center_zyx: tuple[int, int, int]
    radius_mm: float
    kind: NoduleKind
    hu: float


@dataclass(frozen=True)
class Phantom:
    """A synthetic CT volume in HU, indexed (slice, row, column), slice 0 most superior.

    ``label`` is the series-level label (1 when any nodule is present).  ``slice_labels[k]``
    is 1 when slice ``k`` cuts a nodule (see :data:`SLICE_LABEL_MIN_SECTION`).
    """

    hu: FloatArray
    spacing: tuple[float, float, float]
    patient_id: str
    label: int
    nodules: tuple[Nodule, ...]
    slice_labels: npt.NDArray[np.uint8]
    seed: int

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.hu.shape
        return (int(s[0]), int(s[1]), int(s[2]))


@dataclass(frozen=True)
class _Anatomy:
    """Random anatomical parameters of one patient (mm, or fractions of the z range)."""

    body_ax: float
    body_ay: float
    body_cy: float
    lung_cx: float
    lung_cy: float
    lung_ax: float
    lung_ay: float
    lung_lo: float
    lung_hi: float
    dome: float
    heart_cx: float
    heart_cy: float
    heart_ax: float
    heart_ay: float
    heart_zc: float
    heart_zr: float
    rib_pitch: float
    rib_slope: float
    rib_phase: float
    vert_pitch: float
    noise_hu: float
    blur_mm: float


def default_spacing(shape: tuple[int, int, int]) -> tuple[float, float, float]:
    """Spacing that makes ``shape`` cover a typical chest CT: ~360 mm FOV, ~300 mm in z."""
    return (round(300.0 / shape[0], 4), round(360.0 / shape[1], 4), round(360.0 / shape[2], 4))


def patient_id_for_seed(seed: int) -> str:
    return f"PHANTOM-{seed:06d}"


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    s = float(rng.uniform(0.85, 1.08))
    body_ax = 165.0 * s
    body_ay = 118.0 * s * float(rng.uniform(0.92, 1.05))
    return _Anatomy(
        body_ax=body_ax,
        body_ay=body_ay,
        body_cy=float(rng.uniform(0.0, 12.0)),
        lung_cx=float(rng.uniform(0.40, 0.46)) * body_ax,
        lung_cy=float(rng.uniform(-0.06, 0.02)) * body_ay,
        lung_ax=float(rng.uniform(0.34, 0.38)) * body_ax,
        lung_ay=float(rng.uniform(0.64, 0.70)) * body_ay,
        lung_lo=float(rng.uniform(0.03, 0.10)),
        lung_hi=float(rng.uniform(0.93, 0.99)),
        dome=float(rng.uniform(0.15, 0.24)),
        heart_cx=float(rng.uniform(0.08, 0.16)) * body_ax,
        heart_cy=float(rng.uniform(-0.30, -0.18)) * body_ay,
        heart_ax=float(rng.uniform(0.30, 0.36)) * body_ax,
        heart_ay=float(rng.uniform(0.38, 0.46)) * body_ay,
        heart_zc=float(rng.uniform(0.22, 0.32)),
        heart_zr=float(rng.uniform(0.22, 0.28)),
        rib_pitch=float(rng.uniform(22.0, 28.0)),
        rib_slope=float(rng.uniform(20.0, 35.0)),
        rib_phase=float(rng.uniform(0.0, 30.0)),
        vert_pitch=float(rng.uniform(24.0, 30.0)),
        noise_hu=float(rng.uniform(8.0, 22.0)),
        blur_mm=float(rng.uniform(0.5, 0.9)),
    )


def _lung_profile(zf: AnyFloat, a: _Anatomy) -> AnyFloat:
    """In-plane scale of the lungs along z: tapers to nothing at the apex."""
    top = np.clip((a.lung_hi - zf) / 0.35, 0.0, 1.0) ** 0.55
    return np.where(zf > a.lung_lo, 0.25 + 0.75 * top, 0.0) * (top > 0)


def _lung_mask(zf: AnyFloat, y: AnyFloat, x: AnyFloat, a: _Anatomy) -> npt.NDArray[np.bool_]:
    """Lung membership for broadcastable (z fraction, y mm, x mm) coordinates."""
    prof = np.maximum(_lung_profile(zf, a), 1e-6)
    inside = np.zeros(np.broadcast_shapes(zf.shape, y.shape, x.shape), dtype=bool)
    for side in (-1.0, 1.0):
        cx = side * a.lung_cx
        rho2 = ((x - cx) / (a.lung_ax * prof)) ** 2 + ((y - a.lung_cy) / (a.lung_ay * prof)) ** 2
        dome_top = a.dome + (0.03 if side < 0 else 0.0)  # right hemidiaphragm sits higher (liver)
        above_diaphragm = zf > a.lung_lo + dome_top * (1.0 - np.minimum(rho2, 1.0))
        inside |= (rho2 < 1.0) & above_diaphragm
    heart = (
        ((x - a.heart_cx) / (a.heart_ax * 1.12)) ** 2
        + ((y - a.heart_cy) / (a.heart_ay * 1.12)) ** 2
        + ((zf - a.heart_zc) / (a.heart_zr * 1.12)) ** 2
    ) < 1.0
    return inside & ~heart


def _bbox(mask: npt.NDArray[np.bool_]) -> tuple[slice, slice]:
    """Row and column slices covering the True pixels of a (1, y, x) or (y, x) mask (empty -> 0:0)."""
    m = mask.reshape(mask.shape[-2:]) if mask.ndim == 3 else mask
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float]) -> FloatArray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    std = float(f.std()) or 1.0
    return (f / std).astype(np.float32)


def _curve_points(
    p0: npt.NDArray[np.float64], p1: npt.NDArray[np.float64], bend: npt.NDArray[np.float64], step: float
) -> npt.NDArray[np.float64]:
    """Points (n, 3) in mm along a quadratic Bezier from p0 to p1 bent by ``bend``, ``step`` mm apart."""
    mid = (p0 + p1) / 2.0 + bend
    length = float(np.linalg.norm(mid - p0) + np.linalg.norm(p1 - mid))
    n = max(2, int(math.ceil(length / step)) + 1)
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts: npt.NDArray[np.float64] = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * mid + t**2 * p1
    return pts


def _splat_spheres(
    mask: npt.NDArray[np.bool_],
    centres_mm: npt.NDArray[np.float64],
    radii_mm: npt.NDArray[np.float64],
    spacing: tuple[float, float, float],
    origin_mm: tuple[float, float, float],
) -> None:
    """Set ``mask`` True inside spheres (vectorised per integer-radius class)."""
    sp = np.asarray(spacing)
    org = np.asarray(origin_mm)
    shape = np.asarray(mask.shape)
    for rclass in np.unique(np.ceil(radii_mm)):
        sel = np.ceil(radii_mm) == rclass
        c = centres_mm[sel]
        r = radii_mm[sel]
        half = np.ceil(rclass / sp).astype(int)
        grids = np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij")
        offs = np.stack([g.ravel() for g in grids], axis=1)  # (m, 3)
        cv = np.rint((c - org) / sp).astype(int)  # (n, 3) nearest voxel of each centre
        idx = cv[:, None, :] + offs[None, :, :]  # (n, m, 3)
        d2 = (((idx * sp + org) - c[:, None, :]) ** 2).sum(axis=2)
        keep = (d2 <= (r[:, None] ** 2)) & np.all((idx >= 0) & (idx < shape), axis=2)
        sel_idx = idx[keep]
        mask[sel_idx[:, 0], sel_idx[:, 1], sel_idx[:, 2]] = True


def _random_lung_point(
    rng: np.random.Generator,
    a: _Anatomy,
    zr: tuple[float, float],
    length_z: float,
    margin_mm: float,
    side: float | None = None,
) -> npt.NDArray[np.float64] | None:
    """A point (z mm, y mm, x mm) inside a lung with ``margin_mm`` of lung all around, or None."""
    dirs = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=float)
    for _ in range(200):
        sd = side if side is not None else float(rng.choice([-1.0, 1.0]))
        zf = float(rng.uniform(*zr))
        p = np.array(
            [
                zf * length_z,
                a.lung_cy + rng.uniform(-1, 1) * a.lung_ay,
                sd * a.lung_cx + rng.uniform(-1, 1) * a.lung_ax,
            ]
        )
        probe = p[None, :] + np.vstack([np.zeros((1, 3)), dirs * margin_mm])
        ok = _lung_mask(probe[:, 0] / length_z, probe[:, 1], probe[:, 2], a)
        if bool(np.all(ok)):
            return p
    return None


def _vessel_mask(
    rng: np.random.Generator,
    a: _Anatomy,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    length_z: float,
) -> npt.NDArray[np.bool_]:
    """Branching vessel trees from each hilum out to the lung periphery."""
    mask = np.zeros(shape, dtype=bool)
    step_floor = 0.5 * min(spacing)
    pts_all: list[npt.NDArray[np.float64]] = []
    rad_all: list[npt.NDArray[np.float64]] = []
    for side in (-1.0, 1.0):
        hilum = np.array(
            [
                (a.lung_lo + 0.5 * (a.lung_hi - a.lung_lo)) * length_z,
                a.lung_cy + 0.05 * a.lung_ay,
                side * (a.lung_cx - 0.55 * a.lung_ax),
            ]
        )
        n_trunks = int(rng.integers(16, 24))
        for _ in range(n_trunks):
            end = _random_lung_point(rng, a, (a.lung_lo + 0.05, a.lung_hi - 0.02), length_z, 3.0, side)
            if end is None:
                continue
            r0 = float(rng.uniform(3.0, 5.0))
            bend = rng.normal(0.0, 12.0, size=3)
            pts = _curve_points(hilum, end, bend, 1.0)
            radii = np.linspace(r0, 0.9, len(pts))
            # Keep only the part inside the lung: outside, a vessel is invisible in soft tissue anyway.
            step = np.maximum(0.6 * radii, step_floor)
            keep = _thin_by_step(pts, step)
            pts_all.append(pts[keep])
            rad_all.append(radii[keep])
            for _b in range(int(rng.integers(2, 5))):
                k = int(rng.integers(len(pts) // 4, max(len(pts) // 4 + 1, 3 * len(pts) // 4)))
                bend_end = _random_lung_point(rng, a, (a.lung_lo + 0.05, a.lung_hi - 0.02), length_z, 2.0, side)
                if bend_end is None:
                    continue
                bpts = _curve_points(pts[k], bend_end, rng.normal(0.0, 8.0, size=3), 1.0)
                brad = np.linspace(max(0.9, 0.7 * float(radii[k])), 0.7, len(bpts))
                bkeep = _thin_by_step(bpts, np.maximum(0.6 * brad, step_floor))
                pts_all.append(bpts[bkeep])
                rad_all.append(brad[bkeep])
    if pts_all:
        _splat_spheres(mask, np.concatenate(pts_all), np.concatenate(rad_all), spacing, origin)
    return mask


def _thin_by_step(pts: npt.NDArray[np.float64], step: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Subsample 1 mm-spaced curve points so consecutive kept points are ~``step`` apart."""
    arclen = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    keep = np.zeros(len(pts), dtype=bool)
    nxt = 0.0
    for i, s in enumerate(arclen):  # at most a few hundred points per curve
        if s >= nxt:
            keep[i] = True
            nxt = s + float(step[i])
    keep[-1] = True
    return keep


def _place_nodules(
    rng: np.random.Generator,
    a: _Anatomy,
    count: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    length_z: float,
    radius_range: tuple[float, float],
) -> list[tuple[npt.NDArray[np.float64], float, NoduleKind, float]]:
    placed: list[tuple[npt.NDArray[np.float64], float, NoduleKind, float]] = []
    tries = 0
    while len(placed) < count and tries < 50 * max(count, 1):
        tries += 1
        r = float(np.exp(rng.uniform(math.log(radius_range[0]), math.log(radius_range[1]))))
        kind: NoduleKind = "solid" if rng.random() < 0.65 else "ground_glass"
        hu = float(rng.uniform(30.0, 100.0)) if kind == "solid" else float(rng.uniform(-500.0, -300.0))
        p = _random_lung_point(rng, a, (a.lung_lo + 0.08, a.lung_hi - 0.08), length_z, r + 1.0)
        if p is None:
            continue
        vox = (p - np.asarray(origin)) / np.asarray(spacing)
        if np.any(vox < 1) or np.any(vox > np.asarray(shape) - 2):
            continue
        if any(np.linalg.norm(p - q) < r + rq + 4.0 for q, rq, _, _ in placed):
            continue
        placed.append((p, r, kind, hu))
    if len(placed) < count:
        log.warning("placed only %d of %d nodules (lungs too small for the requested sizes)", len(placed), count)
    return placed


@dataclass(frozen=True)
class _Patch:
    """A nodule's blend weights and target HU over its bounding box (z, y, x)."""

    box: tuple[slice, slice, slice]
    frac: FloatArray
    target: FloatArray


def _nodule_patch(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    centre_mm: npt.NDArray[np.float64],
    radius: float,
    kind: NoduleKind,
    core_hu: float,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
) -> _Patch:
    """A lobulated sphere with a soft (partial-volume) edge, ready to blend slab by slab."""
    sp = np.asarray(spacing)
    org = np.asarray(origin)
    rmax = radius * 1.25 + 1.5 * float(sp.max())
    lo = np.maximum(np.floor((centre_mm - rmax - org) / sp).astype(int), 0)
    hi = np.minimum(np.ceil((centre_mm + rmax - org) / sp).astype(int) + 1, np.asarray(shape))
    zz, yy, xx = (np.arange(lo[i], hi[i]) * sp[i] + org[i] - centre_mm[i] for i in range(3))
    dz, dy, dx = np.meshgrid(zz, yy, xx, indexing="ij")
    d = np.sqrt(dz**2 + dy**2 + dx**2)
    theta = np.arctan2(dy, dx)
    phi = np.arccos(np.clip(dz / np.maximum(d, 1e-6), -1.0, 1.0))
    k1, k2 = int(rng.integers(2, 6)), int(rng.integers(1, 4))
    amp = float(rng.uniform(0.04, 0.14))
    r_local = radius * (1.0 + amp * np.sin(k1 * theta + rng.uniform(0, 6.3)) * np.cos(k2 * phi + rng.uniform(0, 6.3)))
    edge = 0.5 * float(sp[1:].mean())
    frac = np.clip((r_local - d) / (2 * edge) + 0.5, 0.0, 1.0).astype(np.float32)
    target = np.full(d.shape, core_hu, dtype=np.float32)
    if kind == "ground_glass":
        target += rng.normal(0.0, 35.0, size=d.shape).astype(np.float32)
    box = (slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])), slice(int(lo[2]), int(hi[2])))
    return _Patch(box, frac, target)


def _blend(slab: FloatArray, z0: int, patch: _Patch) -> None:
    """Blend the part of ``patch`` that falls in ``slab`` (slices z0 .. z0 + len(slab))."""
    zb = patch.box[0]
    a, b = max(zb.start, z0), min(zb.stop, z0 + slab.shape[0])
    if a >= b:
        return
    region = slab[a - z0 : b - z0, patch.box[1], patch.box[2]]
    frac = patch.frac[a - zb.start : b - zb.start]
    target = patch.target[a - zb.start : b - zb.start]
    slab[a - z0 : b - z0, patch.box[1], patch.box[2]] = region * (1 - frac) + target * frac


def make_phantom(
    seed: int,
    *,
    shape: tuple[int, int, int] = (64, 128, 128),
    spacing: tuple[float, float, float] | None = None,
    nodules: int | None = None,
    radius_range_mm: tuple[float, float] = (3.0, 14.0),
    noise: bool = True,
    patient_id: str | None = None,
) -> Phantom:
    """Build one phantom.

    ``nodules``: None draws the label from the seed (half of the phantoms positive, with 1-3
    nodules); 0 makes a negative phantom; n > 0 asks for n nodules (fewer are placed, with a
    warning, when the lungs are too small).  ``spacing`` (slice, row, column) defaults to
    :func:`default_spacing` for ``shape``.
    """
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be (z, y, x) with every extent >= 8, got {shape}")
    sp = spacing if spacing is not None else default_spacing(shape)
    sp = (float(sp[0]), float(sp[1]), float(sp[2]))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x51C7]))
    a = _draw_anatomy(rng)
    nz, ny, nx = shape
    length_z = nz * sp[0]
    # mm coordinates of voxel centres: z from the first slice, y/x from the image centre.
    origin = (0.5 * sp[0], -(ny - 1) / 2.0 * sp[1], -(nx - 1) / 2.0 * sp[2])
    yv = (np.arange(ny) * sp[1] + origin[1])[None, :, None]
    xv = (np.arange(nx) * sp[2] + origin[2])[None, None, :]

    if nodules is None:
        n_nod = int(rng.integers(1, 4)) if rng.random() < 0.5 else 0
    else:
        n_nod = int(nodules)
    vessels = _vessel_mask(rng, a, shape, sp, origin, length_z)
    placed = _place_nodules(rng, a, n_nod, shape, sp, origin, length_z, radius_range_mm)

    tex_sigma = 2.5  # mm, parenchymal texture scale
    t_zy = _smooth_field(rng, (nz, ny), (tex_sigma / sp[0], tex_sigma / sp[1]))
    t_zx = _smooth_field(rng, (nz, nx), (tex_sigma / sp[0], tex_sigma / sp[2]))
    t_yx = _smooth_field(rng, (ny, nx), (tex_sigma / sp[1], tex_sigma / sp[2]))
    bone_tex = _smooth_field(rng, (ny, nx), (1.5 / sp[1], 1.5 / sp[2]))

    # In-plane quantities that do not depend on z (float32: the slab loop is memory bound).
    f32 = np.float32
    yv32, xv32 = yv.astype(f32), xv.astype(f32)
    yb = (yv32 - f32(a.body_cy)) / f32(a.body_ay)
    rho_b2d = np.sqrt((xv32 / f32(a.body_ax)) ** 2 + yb**2)
    vy = a.body_cy + 0.62 * a.body_ay  # vertebral body centre (posterior midline)
    d_vert = np.sqrt(xv32**2 + (yv32 - f32(vy)) ** 2)
    vbody2d = d_vert < 17.0
    rim2d = (d_vert >= 14.5) & (d_vert < 17.0)
    canal2d = np.sqrt(xv32**2 + (yv32 - f32(vy + 24.0)) ** 2) < 8.0
    spinous2d = (np.abs(xv32) < 5.0) & (yv32 > vy + 30.0) & (yv32 < vy + 48.0)
    sternum2d = ((xv32 / 16.0) ** 2 + ((yv32 - f32(a.body_cy - 0.86 * a.body_ay)) / 6.0) ** 2) < 1.0
    liver2d = xv32 < 0.15 * a.body_ax
    heart2d = ((xv32 - f32(a.heart_cx)) / f32(a.heart_ax)) ** 2 + ((yv32 - f32(a.heart_cy)) / f32(a.heart_ay)) ** 2
    rib_phase2d = f32(a.rib_slope) * yb + f32(a.rib_phase)
    rib_x2d = np.abs(xv32) > 28.0
    lung_q = [
        ((xv32 - f32(side * a.lung_cx)) / f32(a.lung_ax)) ** 2 + ((yv32 - f32(a.lung_cy)) / f32(a.lung_ay)) ** 2
        for side in (-1.0, 1.0)
    ]
    lung_dome = [a.dome + 0.03, a.dome]  # right hemidiaphragm sits higher (liver)
    post_grad = f32(45.0) * np.clip((yv32 - f32(a.lung_cy)) / f32(a.lung_ay), -1.0, 1.0)

    # Work only where a structure can be: bounding boxes / pixel lists of each 2D footprint.
    def plane(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.ascontiguousarray(np.broadcast_to(arr, (1, ny, nx))[0])

    rho_b2d, heart2d, liver2d, rib_x2d, rib_phase2d = map(plane, (rho_b2d, heart2d, liver2d, rib_x2d, rib_phase2d))
    vbody2d, rim2d, canal2d, spinous2d, sternum2d = map(plane, (vbody2d, rim2d, canal2d, spinous2d, sternum2d))
    lung_q = [plane(q) for q in lung_q]
    post_grad = plane(post_grad)
    heart_box = _bbox(heart2d < 1.12**2)
    spine_box = _bbox(vbody2d | canal2d | spinous2d)
    sternum_box = _bbox(sternum2d)
    lung_box = _bbox((lung_q[0] < 1.0) | (lung_q[1] < 1.0))
    rib_r, rib_c = np.nonzero((rho_b2d > 0.80 * 0.9) & (rho_b2d < 0.89) & rib_x2d)
    rib_rho, rib_phase = rho_b2d[rib_r, rib_c], rib_phase2d[rib_r, rib_c]
    rib_val = (450.0 + 120.0 * bone_tex)[rib_r, rib_c]
    base_cache: dict[tuple[float, bool], FloatArray] = {}

    def base(g1: float, liver_on: bool) -> FloatArray:
        """Body layers (and liver) of one slice; slices mostly share a few of these."""
        key = (g1, liver_on)
        if key not in base_cache:
            img = np.full((ny, nx), -1000.0, dtype=f32)
            img[rho_b2d < g1] = -100.0  # subcutaneous fat
            img[rho_b2d < 0.93 * g1] = 45.0  # chest wall muscle
            img[rho_b2d < 0.86 * g1] = 30.0  # mediastinum / abdomen
            if liver_on:  # liver under the right hemidiaphragm
                img[liver2d & (rho_b2d < 0.8 * g1)] = 58.0
            base_cache[key] = img
        return base_cache[key]

    patches = [_nodule_patch(shape, rng, c, r, kind, core, sp, origin) for c, r, kind, core in placed]
    nodule_list: list[Nodule] = []
    for centre, r, kind, core in placed:
        vox = np.rint((centre - np.asarray(origin)) / np.asarray(sp)).astype(int)
        # Built with index 0 at the feet; the output is flipped to head-first slice order.
        zyx = (nz - 1 - int(vox[0]), int(vox[1]), int(vox[2]))
        nodule_list.append(Nodule(zyx, round(r, 3), kind, round(core, 1)))

    # Scanner PSF (in-plane blur) then noise.
    sigma_px = (0.0, a.blur_mm / sp[1], a.blur_mm / sp[2])
    noise_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x0015E]))
    out = np.empty(shape, dtype=np.float32)
    for z0 in range(0, nz, _SLAB):
        z1 = min(nz, z0 + _SLAB)
        zmm = (np.arange(z0, z1) * sp[0] + origin[0])[:, None, None]
        zf = zmm / length_z
        g = (1.0 - 0.10 * np.clip((zf - 0.75) / 0.25, 0.0, 1.0) ** 2).astype(f32)  # narrower at the neck
        liver_z = zf < a.lung_lo + a.dome + 0.06
        slab = np.stack([base(float(g[i, 0, 0]), bool(liver_z[i, 0, 0])) for i in range(z1 - z0)])
        zterm = (((zf - a.heart_zc) / a.heart_zr) ** 2).astype(f32)
        hs = (slice(None), *heart_box)
        heart_r = heart2d[heart_box] + zterm
        np.copyto(slab[hs], f32(-90.0), where=(heart_r < 1.2) & (heart_r >= 1.0))  # epicardial fat
        np.copyto(slab[hs], f32(42.0), where=heart_r < 1.0)
        # Ribs: oblique bands in the chest wall shell, posterior ends higher than anterior ends.
        zin = (zf[:, :, 0] > a.lung_lo) & (zf[:, :, 0] < a.lung_hi + 0.02)
        g2 = g[:, :, 0]
        ribs = (rib_rho > 0.80 * g2) & (rib_rho < 0.89 * g2) & zin
        ribs &= np.mod(zmm[:, :, 0].astype(f32) + rib_phase, f32(a.rib_pitch)) < 9.0
        sub = slab[:, rib_r, rib_c]
        np.copyto(sub, rib_val, where=ribs)
        slab[:, rib_r, rib_c] = sub
        # Spine: vertebral bodies with cortical rim and discs, canal, spinous process; sternum.
        disc = np.mod(zmm, a.vert_pitch) < 5.0
        ss = (slice(None), *spine_box)
        np.copyto(slab[ss], np.where(disc, f32(85.0), f32(260.0)).astype(f32), where=vbody2d[spine_box])
        np.copyto(slab[ss], f32(750.0), where=rim2d[spine_box] & ~disc)
        np.copyto(slab[ss], f32(15.0), where=canal2d[spine_box])
        np.copyto(slab[ss], f32(600.0), where=spinous2d[spine_box] & ~disc)
        st = (slice(None), *sternum_box)
        np.copyto(slab[st], f32(420.0), where=sternum2d[sternum_box] & ((zf > 0.3) & (zf < 0.9)))
        # Lungs: textured parenchyma, denser posteriorly, with vessels.
        prof = np.maximum(_lung_profile(zf, a), 1e-6).astype(f32)
        ls = (slice(None), *lung_box)
        lung = np.zeros(slab[ls].shape, dtype=bool)
        for q, dome in zip(lung_q, lung_dome, strict=True):
            rho2 = q[lung_box] / prof**2
            lung |= (rho2 < 1.0) & (zf.astype(f32) > f32(a.lung_lo + dome) - f32(dome) * rho2)
        lung &= ~((heart2d[lung_box] + zterm) < 1.12**2)
        ry, rx = lung_box
        parenchyma = (t_zy[z0:z1, ry, None] + t_zx[z0:z1, None, rx]) + t_yx[None, ry, rx]
        parenchyma *= f32(9.0)
        parenchyma += f32(-865.0) + post_grad[ry, rx]
        np.copyto(slab[ls], parenchyma, where=lung)
        np.copyto(slab[ls], f32(40.0), where=lung & vessels[z0:z1, ry, rx])
        for patch in patches:
            _blend(slab, z0, patch)
        slab = ndimage.gaussian_filter(slab, sigma_px, mode="nearest", truncate=2.5)
        if noise:
            slab += noise_rng.standard_normal(slab.shape, dtype=np.float32) * np.float32(a.noise_hu)
        np.clip(slab, HU_MIN, HU_MAX, out=slab)
        out[nz - z1 : nz - z0] = slab[::-1]

    slice_labels = slice_labels_for(nodule_list, nz, sp[0])
    return Phantom(
        hu=out,
        spacing=sp,
        patient_id=patient_id or patient_id_for_seed(seed),
        label=int(bool(nodule_list)),
        nodules=tuple(nodule_list),
        slice_labels=slice_labels,
        seed=seed,
    )


def slice_labels_for(
    nodules: tuple[Nodule, ...] | list[Nodule], n_slices: int, slice_mm: float
) -> npt.NDArray[np.uint8]:
    """Per-slice labels: 1 where a slice's cross-section of some nodule is large enough."""
    labels = np.zeros(n_slices, dtype=np.uint8)
    reach = math.sqrt(1.0 - SLICE_LABEL_MIN_SECTION**2)
    k = np.arange(n_slices)
    for n in nodules:
        labels[np.abs(k - n.center_zyx[0]) * slice_mm <= n.radius_mm * reach] = 1
    return labels
