"""Synthetic colour fundus photographs with diabetic-retinopathy lesions, graded 0-4 by rule.

numpy/scipy only, deterministic per seed.  An image (RGB uint8, ``size`` x ``size``, default 512)
has a circular field of view on black with vignetting, an orange-red textured retina, the optic
disc (bright, yellowish, with a cup) on the nasal side (image right for a right eye, ``OD``; left for
``OS``), a darker macula/fovea temporal to it, and arcade vessels branching from the disc (veins
wider and darker than arteries).  Lesions are drawn on top:

* microaneurysms (MA): small sharp dark-red dots;
* dot/blot (intraretinal) haemorrhages (H): larger dark-red round/irregular blots;
* hard exudates (EX): small bright yellow flecks in clusters;
* cotton-wool spots (CWS): pale, blurred, whitish patches;
* venous beading (VB): the veins of a quadrant with sausage-like calibre variation;
* intraretinal microvascular abnormalities (IRMA): short, thin, tortuous vessels inside a quadrant;
* neovascularisation (NV): a fine tangled vessel net at the disc (NVD) or elsewhere (NVE);
* preretinal haemorrhage (PRH): a large dark-red boat-shaped patch.

**Grade** (International Clinical Diabetic Retinopathy severity scale; Wilkinson et al.,
Ophthalmology 2003), computed by :func:`grade_findings` from the drawn features only, never chosen
directly (a generator draws features *for* a target grade, then the rule grades what was drawn):

* 4 proliferative DR: any NV or PRH (vitreous/preretinal haemorrhage);
* 3 severe NPDR, the 4-2-1 rule on our features: more than 20 intraretinal haemorrhages in **each**
  of the 4 quadrants, **or** venous beading in 2 or more quadrants, **or** IRMA in 1 or more
  quadrant; and no PDR sign;
* 2 moderate NPDR: more than microaneurysms only (any H, EX or CWS, or VB in 1 quadrant) but
  less than severe;
* 1 mild NPDR: microaneurysms only;
* 0 no apparent retinopathy.

Quadrants are the four quarters of the field around the image centre split by its horizontal and
vertical lines (superior/inferior x nasal/temporal); a lesion's quadrant is the one holding its
centre.  The drawn sizes scale with ``size`` and are larger than true scale so that a 256-pixel
model input still shows them (a limitation stated in the model card).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

log = logging.getLogger(__name__)

Laterality = Literal["R", "L"]
F32 = npt.NDArray[np.float32]
GRADE_NAMES = ("No DR", "Mild NPDR", "Moderate NPDR", "Severe NPDR", "Proliferative DR")
QUADRANTS = ("superior-nasal", "superior-temporal", "inferior-nasal", "inferior-temporal")
#: 4-2-1 rule thresholds.
SEVERE_H_PER_QUADRANT = 20
SEVERE_VB_QUADRANTS = 2
SEVERE_IRMA_QUADRANTS = 1


@dataclass(frozen=True)
class Lesion:
    """One drawn lesion: kind, centre (row, col in pixels), radius in pixels, quadrant index."""

    kind: Literal["MA", "H", "EX", "CWS", "IRMA", "NV", "PRH"]
    row: float
    col: float
    radius: float
    quadrant: int


@dataclass(frozen=True)
class Findings:
    """What was drawn, per kind; the grade is a function of this alone (:func:`grade_findings`)."""

    lesions: tuple[Lesion, ...] = ()
    beading_quadrants: tuple[int, ...] = ()

    def count(self, kind: str, quadrant: int | None = None) -> int:
        return sum(1 for x in self.lesions if x.kind == kind and (quadrant is None or x.quadrant == quadrant))

    def quadrants_with(self, kind: str) -> set[int]:
        return {x.quadrant for x in self.lesions if x.kind == kind}

    def summary(self) -> dict[str, object]:
        kinds = ("MA", "H", "EX", "CWS", "IRMA", "NV", "PRH")
        return {**{k: self.count(k) for k in kinds},
                "H_per_quadrant": [self.count("H", q) for q in range(4)],
                "VB_quadrants": len(self.beading_quadrants)}


def grade_findings(f: Findings) -> int:
    """International Clinical DR grade (0-4) of the drawn features; see the module docstring."""
    if f.count("NV") or f.count("PRH"):
        return 4
    severe = (all(f.count("H", q) > SEVERE_H_PER_QUADRANT for q in range(4))
              or len(set(f.beading_quadrants)) >= SEVERE_VB_QUADRANTS
              or len(f.quadrants_with("IRMA")) >= SEVERE_IRMA_QUADRANTS)
    if severe:
        return 3
    if f.count("H") or f.count("EX") or f.count("CWS") or f.beading_quadrants:
        return 2
    if f.count("MA"):
        return 1
    return 0


def referable(grade: int) -> bool:
    """Referable DR: moderate NPDR or worse (grade >= 2)."""
    return grade >= 2


@dataclass(frozen=True)
class Fundus:
    """One synthetic photograph, its findings and grade."""

    seed: int
    image: npt.NDArray[np.uint8]  # (size, size, 3) RGB
    laterality: Laterality
    findings: Findings
    grade: int
    disc_rc: tuple[float, float]
    fov_radius: float
    patient_id: str = field(default="")


# ---------------------------------------------------------------------------------------------- drawing


def _stamp(canvas: F32, r: float, c: float, radius: float, value: float, soft: float = 0.6) -> None:
    """Add a soft-edged disc of ``value`` (max-combined) centred at (r, c)."""
    h, w = canvas.shape
    ext = int(math.ceil(radius + 2 * soft + 1))
    r0, r1 = max(0, int(r) - ext), min(h, int(r) + ext + 1)
    c0, c1 = max(0, int(c) - ext), min(w, int(c) + ext + 1)
    if r0 >= r1 or c0 >= c1:
        return
    yy, xx = np.ogrid[r0:r1, c0:c1]
    d = np.sqrt((yy - r) ** 2 + (xx - c) ** 2)
    a = np.clip((radius + soft - d) / (2 * soft), 0.0, 1.0).astype(np.float32) * np.float32(value)
    np.maximum(canvas[r0:r1, c0:c1], a, out=canvas[r0:r1, c0:c1])


def _polyline(canvas: F32, pts: npt.NDArray[np.float64], widths: npt.NDArray[np.float64], value: float) -> None:
    """Stamp discs every half pixel along ``pts`` (N, 2) with per-point half-widths."""
    for (r0, c0), (r1, c1), w0, w1 in zip(pts[:-1], pts[1:], widths[:-1], widths[1:], strict=True):
        n = max(1, int(math.hypot(r1 - r0, c1 - c0) * 2))
        for t in np.linspace(0.0, 1.0, n, endpoint=False):
            _stamp(canvas, r0 + t * (r1 - r0), c0 + t * (c1 - c0), w0 + t * (w1 - w0), value)


def _walk(rng: np.random.Generator, start: tuple[float, float], angle: float, length: float, step: float,
          curl: float, bend: float = 0.0) -> npt.NDArray[np.float64]:
    """A smooth random path from ``start``: heading ``angle`` (rad), turning ``bend`` per step plus noise."""
    n = max(2, int(length / step))
    pts = np.empty((n, 2))
    pts[0] = start
    a = angle
    for i in range(1, n):
        a += bend + rng.normal(0.0, curl)
        pts[i] = pts[i - 1] + step * np.array([math.sin(a), math.cos(a)])
    return pts


@dataclass
class _Vessels:
    veins: F32
    arteries: F32
    vein_paths: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]
    beaded: set[int]  # quadrants where beaded vein calibre was actually drawn


def _quadrant(row: float, col: float, size: int, laterality: Laterality) -> int:
    """0 superior-nasal, 1 superior-temporal, 2 inferior-nasal, 3 inferior-temporal (see docstring)."""
    superior = row < size / 2.0
    nasal = (col >= size / 2.0) if laterality == "R" else (col < size / 2.0)
    return (0 if nasal else 1) if superior else (2 if nasal else 3)


def _vessel_tree(rng: np.random.Generator, size: int, disc: tuple[float, float], toward_macula: float,
                 beading: set[int], laterality: Laterality) -> _Vessels:
    """Four arcades (sup/inf x vein/artery) curving around the macula, plus nasal branches, branching twice."""
    veins = np.zeros((size, size), np.float32)
    arteries = np.zeros((size, size), np.float32)
    s = size / 512.0
    paths: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]] = []
    beaded: set[int] = set()

    def grow(start: tuple[float, float], angle: float, width: float, length: float, bend: float, depth: int,
             vein: bool) -> None:
        pts = _walk(rng, start, angle, length, 3.0 * s, 0.04, bend)
        w = np.linspace(width, width * 0.55, len(pts))
        if vein:
            quads = np.array([_quadrant(r, c, size, laterality) for r, c in pts])
            bead = np.isin(quads, list(beading))
            if bead.sum() >= 8:  # sausage-like calibre variation along the vein (venous beading)
                beaded.update(int(q) for q in np.unique(quads[bead]) if (quads[bead] == q).sum() >= 8)
                phase = np.arange(len(pts)) * (2 * math.pi / 5.0)
                w = np.where(bead, w * (1.0 + 0.85 * np.sin(phase) ** 2), w)
            paths.append((pts, w))
        _polyline(veins if vein else arteries, pts, w, 1.0)
        if depth > 0:
            for k in rng.choice(np.arange(len(pts) // 5, len(pts) - 2), size=2, replace=False):
                side = rng.choice([-1.0, 1.0])
                a = math.atan2(pts[k + 1][0] - pts[k][0], pts[k + 1][1] - pts[k][1]) + side * rng.uniform(0.5, 1.0)
                grow((pts[k][0], pts[k][1]), a, w[k] * 0.7, length * rng.uniform(0.35, 0.55), 0.0, depth - 1, vein)

    for vein, width in ((True, 3.2 * s), (False, 2.3 * s)):
        jitter = 0.12 if vein else -0.12
        for sup in (-1.0, 1.0):  # superior (up, -row) and inferior arcades: start toward the macula, curve round it
            a0 = toward_macula + sup * (1.05 + jitter + rng.normal(0, 0.05))
            grow(disc, a0, width, 300 * s, -sup * 0.012, 2, vein)
        for sup in (-1.0, 1.0):  # nasal branches
            grow(disc, toward_macula + math.pi + sup * rng.uniform(0.4, 0.9), width * 0.8, 150 * s, 0.0, 1, vein)
    return _Vessels(veins, arteries, paths, beaded)


def _random_point(rng: np.random.Generator, size: int, fov: float, laterality: Laterality,
                  quadrant: int | None, avoid: tuple[float, float], avoid_r: float) -> tuple[float, float, int]:
    """A point inside the field (0.1-0.9 of its radius), in ``quadrant`` if given, away from ``avoid``."""
    cy = cx = size / 2.0
    for _ in range(200):
        rad = fov * math.sqrt(rng.uniform(0.01, 0.81))
        ang = rng.uniform(0, 2 * math.pi)
        r, c = cy + rad * math.sin(ang), cx + rad * math.cos(ang)
        q = _quadrant(r, c, size, laterality)
        if (quadrant is None or q == quadrant) and math.hypot(r - avoid[0], c - avoid[1]) > avoid_r:
            return r, c, q
    return r, c, q


def _plan_findings(rng: np.random.Generator, target: int, size: int, fov: float, laterality: Laterality,
                   disc: tuple[float, float], disc_r: float) -> tuple[list[Lesion], set[int]]:
    """Lesions drawn for ``target``; the grade is recomputed from them (grade_findings)."""
    s = size / 512.0
    lesions: list[Lesion] = []
    beading: set[int] = set()

    def add(kind: Literal["MA", "H", "EX", "CWS", "IRMA", "NV", "PRH"], n: int, r_lo: float, r_hi: float,
            quadrant: int | None = None) -> None:
        for _ in range(n):
            r, c, q = _random_point(rng, size, fov, laterality, quadrant, disc, disc_r * 1.6)
            # at least 1.2 px: a lesion must survive a 256-pixel rendering as more than one dim pixel
            lesions.append(Lesion(kind, r, c, max(1.2, float(rng.uniform(r_lo, r_hi)) * s), q))

    if target >= 1:
        add("MA", int(rng.integers(2, 12)), 1.8, 2.6)
    if target == 2:  # at least one non-MA sign, never a severe one
        kinds = rng.choice(["H", "EX", "CWS", "VB"], size=int(rng.integers(1, 4)), replace=False)
        if "H" in kinds:
            add("H", int(rng.integers(2, 15)), 3.5, 7.0)
        if "EX" in kinds:
            for _ in range(int(rng.integers(1, 4))):  # exudates come in clusters
                r, c, q = _random_point(rng, size, fov, laterality, None, disc, disc_r * 1.6)
                for _ in range(int(rng.integers(3, 9))):
                    rr, cc = r + rng.normal(0, 9 * s), c + rng.normal(0, 9 * s)
                    lesions.append(Lesion("EX", rr, cc, max(1.2, float(rng.uniform(1.8, 3.5)) * s),
                                          _quadrant(rr, cc, size, laterality)))
        if "CWS" in kinds:
            add("CWS", int(rng.integers(1, 4)), 8.0, 13.0)
        if "VB" in kinds:
            beading.add(int(rng.integers(0, 4)))
    if target == 3:
        rule = rng.choice(["H4", "VB2", "IRMA"])
        if rule == "H4":
            for q in range(4):
                add("H", int(rng.integers(SEVERE_H_PER_QUADRANT + 1, SEVERE_H_PER_QUADRANT + 8)), 3.0, 6.0, q)
        elif rule == "VB2":
            beading.update(int(q) for q in rng.choice(4, size=int(rng.integers(2, 4)), replace=False))
            add("H", int(rng.integers(3, 15)), 3.5, 7.0)
        else:
            for q in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
                add("IRMA", int(rng.integers(1, 3)), 10.0, 16.0, int(q))
            add("H", int(rng.integers(3, 15)), 3.5, 7.0)
    if target == 4:
        if rng.random() < 0.6:  # NVD at the disc
            lesions.append(Lesion("NV", disc[0] + rng.normal(0, 4 * s), disc[1] + rng.normal(0, 4 * s),
                                  float(rng.uniform(20, 30)) * s, _quadrant(disc[0], disc[1], size, laterality)))
        else:
            add("NV", int(rng.integers(1, 3)), 16.0, 26.0)
        if rng.random() < 0.4:
            add("PRH", 1, 22.0, 36.0)
        add("H", int(rng.integers(5, 30)), 3.5, 7.0)
        if rng.random() < 0.5:
            add("CWS", int(rng.integers(1, 4)), 8.0, 13.0)
    return lesions, beading


def _draw_lesions(rng: np.random.Generator, size: int, lesions: Sequence[Lesion]) -> dict[str, F32]:
    """One intensity layer per lesion appearance (red, bright yellow, white haze, fine vessels)."""
    red = np.zeros((size, size), np.float32)
    yellow = np.zeros((size, size), np.float32)
    white = np.zeros((size, size), np.float32)
    fine = np.zeros((size, size), np.float32)
    s = size / 512.0
    for x in lesions:
        if x.kind == "MA":
            _stamp(red, x.row, x.col, x.radius, 1.0, soft=0.4)
        elif x.kind == "H":  # blot: a few overlapping discs
            for _ in range(int(rng.integers(1, 4))):
                _stamp(red, x.row + rng.normal(0, x.radius / 3), x.col + rng.normal(0, x.radius / 3),
                       x.radius * rng.uniform(0.6, 1.0), 0.9)
        elif x.kind == "EX":
            _stamp(yellow, x.row, x.col, x.radius, 1.0, soft=0.5)
        elif x.kind == "CWS":
            _stamp(white, x.row, x.col, x.radius, 0.8, soft=x.radius / 2)
        elif x.kind == "PRH":  # boat-shaped: flat top (fluid level), round bottom
            tmp = np.zeros_like(red)
            _stamp(tmp, x.row, x.col, x.radius, 1.0, soft=1.0)
            tmp[: max(0, int(x.row - x.radius * 0.3))] = 0.0
            np.maximum(red, tmp, out=red)
        elif x.kind in ("IRMA", "NV"):  # tortuous fine vessels in a small area
            n = 4 if x.kind == "IRMA" else 14
            for _ in range(n):
                a = rng.uniform(0, 2 * math.pi)
                start = (x.row + rng.normal(0, x.radius / 3), x.col + rng.normal(0, x.radius / 3))
                pts = _walk(rng, start, a, x.radius * rng.uniform(0.8, 1.6), 1.5 * s, 0.6)
                _polyline(fine, pts, np.full(len(pts), max(0.7, (0.9 if x.kind == "IRMA" else 0.8) * s)), 1.0)
    return {"red": red, "yellow": yellow, "white": white, "fine": fine}


def make_fundus(seed: int, *, size: int = 512, target_grade: int | None = None,
                laterality: Laterality | None = None) -> Fundus:
    """Render one photograph; ``target_grade`` None draws a grade uniformly (seeded)."""
    if size < 64:
        raise ValueError(f"size {size}: at least 64 pixels")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xF0D05]))
    target = int(rng.integers(0, 5)) if target_grade is None else int(target_grade)
    if not 0 <= target <= 4:
        raise ValueError(f"target_grade {target_grade}: 0-4")
    lat: Laterality = laterality or ("R" if rng.random() < 0.5 else "L")
    s = size / 512.0
    cy = cx = (size - 1) / 2.0
    fov = size * rng.uniform(0.44, 0.48)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rad = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / np.float32(fov)
    nasal = 1.0 if lat == "R" else -1.0
    disc = (cy + rng.normal(0, 10 * s), cx + nasal * fov * rng.uniform(0.36, 0.44))
    disc_r = float(rng.uniform(30, 38)) * s
    macula = (cy + rng.normal(0, 6 * s), cx - nasal * fov * rng.uniform(0.0, 0.08))
    toward_macula = 0.0 if nasal < 0 else math.pi  # heading (rad) from the disc toward the macula

    # background: orange-red retina, low-frequency texture, vignetting, darker macula, bright disc
    tex = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 14 * s) * 6.0
    tex += ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 2 * s) * 0.6
    hue = rng.uniform(-0.04, 0.04)
    base = np.stack([np.full((size, size), 0.78 + hue), np.full((size, size), 0.36 + hue / 2),
                     np.full((size, size), 0.16)], axis=-1).astype(np.float32)
    base *= (1.0 + 0.05 * tex)[..., None]
    dm = np.sqrt((yy - macula[0]) ** 2 + (xx - macula[1]) ** 2) / (55 * s)
    base *= (1.0 - 0.28 * np.exp(-(dm**2)))[..., None]
    dd = np.sqrt((yy - disc[0]) ** 2 + ((xx - disc[1]) * 1.1) ** 2) / disc_r
    disc_a = np.clip(1.3 - dd, 0.0, 1.0) ** 0.8
    cup = np.clip(1.5 - dd / 0.45, 0.0, 1.0)
    disc_rgb = np.array([1.0, 0.82, 0.55], np.float32)
    base = base * (1 - disc_a[..., None]) + disc_rgb * disc_a[..., None]
    base += (0.12 * cup)[..., None] * np.array([0.3, 1.0, 1.0], np.float32)

    lesions, beading = _plan_findings(rng, target, size, fov, lat, disc, disc_r)
    vessels = _vessel_tree(rng, size, disc, toward_macula, beading, lat)
    vein = ndimage.gaussian_filter(vessels.veins, 0.7 * s)
    art = ndimage.gaussian_filter(vessels.arteries, 0.7 * s)
    base *= (1.0 - vein[..., None] * np.array([0.45, 0.75, 0.7], np.float32))
    base *= (1.0 - art[..., None] * np.array([0.25, 0.55, 0.5], np.float32))

    layers = _draw_lesions(rng, size, lesions)
    red = ndimage.gaussian_filter(layers["red"], 0.5 * s)
    base *= (1.0 - red[..., None] * np.array([0.55, 0.85, 0.8], np.float32))
    fine = ndimage.gaussian_filter(layers["fine"], 0.5 * s)
    base *= (1.0 - fine[..., None] * np.array([0.35, 0.7, 0.6], np.float32))
    yel = ndimage.gaussian_filter(layers["yellow"], 0.5 * s)[..., None]
    base = base * (1 - yel) + yel * np.array([1.0, 0.92, 0.45], np.float32)
    wht = layers["white"][..., None]
    base = base * (1 - 0.8 * wht) + 0.8 * wht * np.array([0.95, 0.9, 0.8], np.float32)

    # vignetting, camera noise, field-of-view mask
    base *= np.clip(1.0 - 0.45 * rad**2.2, 0.0, 1.0)[..., None]
    base += rng.normal(0.0, 0.012, base.shape).astype(np.float32)
    base *= np.clip((1.0 - rad) * fov / 1.5, 0.0, 1.0)[..., None]
    image = np.clip(np.rint(base * 255.0), 0, 255).astype(np.uint8)

    findings = Findings(tuple(lesions), tuple(sorted(vessels.beaded)))
    grade = grade_findings(findings)
    if grade != target:  # the plan is built so that this cannot happen; the rule decides regardless
        log.warning("seed %d: planned grade %d, drawn features grade %d", seed, target, grade)
    return Fundus(seed, image, lat, findings, grade, disc, float(fov), patient_id=f"FUNDUS-{seed:07d}")


__all__ = ["GRADE_NAMES", "QUADRANTS", "Findings", "Fundus", "Lesion", "grade_findings", "make_fundus", "referable"]
