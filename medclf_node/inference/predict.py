"""Run one loaded model on one volume and describe the result as a :class:`ModelResult`.

2D/2.5D models run batched over the slices and aggregate per the manifest (max or top-k mean);
3D models run on the whole preprocessed volume, or on windows along z (series score = max).
Preprocessing is ``medclf_node.preprocess`` (the one implementation shared with training).

The heat map is occlusion sensitivity, so it works for any runtime (LiteRT included): the key
input is re-run with patches replaced by the input's per-channel median, and the drop in
P(positive) is the heat, on an absolute scale (not normalised per image: a negative study's map
stays below its probability).  Two stages (see :func:`_occlusion`): a coarse grid of
overlapping cells finds where, a sweep with a small patch around the hottest cells places the
peak on the finding (a coarse cell centre alone was up to ~20 mm off).  The cost is about
``max_occlusion_passes`` extra model inputs (default 160: 36 coarse + 121 fine, two batches;
a saturating model that loses nothing to the small patch gets one retry with a larger one).
For the shipped 2.5D model that is ~0.05 s per series.  The map is then put back into the key
slice's pixel grid by inverting the in-plane resampling and centre crop/pad.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medclf_node.domain import ModelResult, Volume
from medclf_node.inference.manifest import Aggregation, Manifest, OutputSpec
from medclf_node.inference.registry import LoadedModel
from medclf_node.inference.runtime import Runtime
from medclf_node.preprocess import crop_or_pad, resample, slices_2d, volume_3d

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
SLICE_CHUNK = 64  # slices preprocessed and run per runtime call (bounds memory for big inputs)


def output_to_probability(raw: F32, spec: OutputSpec) -> F32:
    """(N, units) model output -> (N,) P(positive) per the manifest's output semantics."""
    out = np.asarray(raw, np.float32).reshape(raw.shape[0], -1)
    units = out.shape[1]
    if spec.positive_index >= units:
        raise ValueError(f"output.positive_index {spec.positive_index} but the model has {units} output(s)")
    if spec.kind == "logit":
        if units == 1:
            return (1.0 / (1.0 + np.exp(-out[:, 0]))).astype(np.float32)
        e = np.exp(out - out.max(axis=1, keepdims=True))
        return (e[:, spec.positive_index] / e.sum(axis=1)).astype(np.float32)
    return np.clip(out[:, spec.positive_index], 0.0, 1.0).astype(np.float32)


KEY_TIE_TOLERANCE = 0.01  # scores this close to the maximum count as tied (quantised outputs saturate)


def key_index(scores: F32) -> int:
    """The highest-scoring slice; among near-ties, the middle of the longest run of tied slices
    (a saturated int8 model scores every slice through a nodule alike: pick its centre, not its edge)."""
    top = scores >= scores.max() - KEY_TIE_TOLERANCE
    best_start, best_len, start = 0, 0, -1
    for i, t in enumerate(np.append(top, False)):
        if t and start < 0:
            start = i
        elif not t and start >= 0:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = -1
    return best_start + (best_len - 1) // 2


def aggregate(scores: F32, agg: Aggregation) -> tuple[float, int]:
    """Series probability and key index (see key_index) from per-slice scores."""
    if scores.size == 0:
        raise ValueError("no slice scores to aggregate")
    key = key_index(scores)
    if agg.method == "max":
        return float(scores.max()), key
    k = min(agg.k, scores.size)
    top = np.partition(scores, scores.size - k)[scores.size - k :]
    return float(top.mean()), key


@dataclass(frozen=True)
class _Geometry:
    """How a source slice's (rows, cols) maps onto the model input's in-plane grid."""

    scale: tuple[float, float]  # model-grid pixels per source pixel (source spacing / target spacing)
    offset: tuple[float, float]  # model coordinate = resampled coordinate - offset (crop > 0, pad < 0)


def _n_out(n_in: int, s_in: float, s_out: float | None) -> int:
    """Length of an axis after preprocess.resample (same rule: round(n * s_in / s_out), >= 1)."""
    if s_out is None or math.isclose(s_in, s_out, rel_tol=1e-6):
        return n_in
    return max(1, int(round(n_in * s_in / s_out)))


def _resample_inplane(
    hu: F32, spacing: tuple[float, float, float], target: Sequence[float | None], inplane: Sequence[int]
) -> tuple[F32, tuple[float, float, float], _Geometry]:
    """Resample once (instead of per chunk) and centre crop/pad in-plane; returns the geometry."""
    arr = resample(hu, spacing, target)
    eff = tuple(float(t) if t is not None else float(s) for s, t in zip(spacing, target, strict=True))
    offsets = tuple((n - want) // 2 if n >= want else -((want - n) // 2)
                    for n, want in zip(arr.shape[1:], inplane, strict=True))
    scale = (spacing[1] / eff[1], spacing[2] / eff[2])
    return arr, (eff[0], eff[1], eff[2]), _Geometry(scale, (offsets[0], offsets[1]))


@dataclass(frozen=True)
class _Occlusion:
    """Occlusion drops of one model input, in model-grid coordinates (pixel centres at integers).

    ``coarse`` is the (H, W) map of the coarse cells (bilinear between cell centres); with a fine
    stage, the hot cells and their neighbours are left out of it (the fine map explains them; their
    bilinear bleed would paint bands around the finding).  The fine stage re-measures the hottest
    cells' neighbourhood with a small patch: ``fine_drops`` (gf, gf) at the patch centres
    ``fine_y`` x ``fine_x``; ``sigma`` (model pixels) smooths them.
    """

    coarse: F32
    fine_y: npt.NDArray[np.float64]
    fine_x: npt.NDArray[np.float64]
    fine_drops: F32 | None
    sigma: float
    fine_peak: float = 0.0  # the hot cell's drop: the fine map's value at its peak


def _occlude(x: F32, fill: F32, boxes: list[tuple[int, int, int, int]]) -> F32:
    """A batch: ``x`` once unchanged, then once per (y0, y1, x0, x1) box filled with ``fill``."""
    batch = np.repeat(x[None], len(boxes) + 1, axis=0)
    for n, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        batch[n, ..., y0:y1, x0:x1, :] = fill
    return batch


def _grid_split(max_passes: int) -> tuple[int, int]:
    """Coarse and fine grid sizes within the budget: a quarter for the coarse cells, the rest fine."""
    budget = max(1, max_passes)
    gc = max(1, math.isqrt(budget // 4))
    gf = math.isqrt(max(0, budget - gc * gc))
    return gc, (gf if gf >= 3 else 0)


def _occlusion(runtime: Runtime, x: F32, out: OutputSpec, max_passes: int,
               score: Callable[[F32], F32] | None = None) -> _Occlusion:
    """Two-stage occlusion sensitivity of one input (H, W, C) or (D, H, W, C) over the plane.

    A coarse grid of cells finds where the evidence is; its peak alone sits on a cell centre,
    up to half a cell (~20 mm for a 96-pixel input at 3.5 mm) from the finding.  So the hottest
    cell's neighbourhood (+-1 cell) is swept again with a patch of a third of a cell, whose
    drop as a function of the patch centre is a bump centred on the finding.  The fine stage
    says *where* inside the hot cell; how much is the coarse cell's drop (a saturating model
    may lose little when only part of the finding is hidden).
    ``score`` turns raw outputs into the score whose drop is the heat (default: P(positive) per ``out``;
    image models pass e.g. P(grade >= the predicted grade)).
    """
    to_score = score or (lambda raw: output_to_probability(raw, out))
    gc, gf = _grid_split(max_passes)
    h, w = x.shape[-3], x.shape[-2]
    gy, gx = min(gc, h), min(gc, w)
    fill = np.median(x.reshape(-1, x.shape[-1]), axis=0).astype(np.float32)
    ys = np.linspace(0, h, gy + 1).round().astype(int)
    xs = np.linspace(0, w, gx + 1).round().astype(int)
    # cells overlap by half a cell each side (patch 1.5 cells, centred on the cell): a finding of up
    # to half a cell is wholly hidden by some patch even where it straddles a cell border
    my_, mx_ = (ys[1:] - ys[:-1]) // 4, (xs[1:] - xs[:-1]) // 4
    boxes = [(max(0, int(ys[i] - my_[i])), int(ys[i + 1] + my_[i]),
              max(0, int(xs[j] - mx_[j])), int(xs[j + 1] + mx_[j])) for i in range(gy) for j in range(gx)]
    probs = to_score(runtime.predict(_occlude(x, fill, boxes)))
    drop = np.clip(probs[0] - probs[1:], 0.0, None).reshape(gy, gx)
    # cell heat -> model grid, bilinear between cell centres
    cy = (ys[:-1] + ys[1:] - 1) / 2.0
    cx = (xs[:-1] + xs[1:] - 1) / 2.0
    ry = np.interp(np.arange(h), cy, np.arange(gy)) if gy > 1 else np.zeros(h)
    rx = np.interp(np.arange(w), cx, np.arange(gx)) if gx > 1 else np.zeros(w)
    yy, xx = np.meshgrid(ry, rx, indexing="ij")

    def cells_to_grid(cells: npt.NDArray[np.floating]) -> F32:
        return ndimage.map_coordinates(cells.astype(np.float32), [yy, xx], order=1, mode="nearest").astype(np.float32)

    coarse = cells_to_grid(drop)
    empty = np.zeros(0, np.float64)
    if gf == 0 or float(drop.max()) <= 0.0:
        return _Occlusion(coarse, empty, empty, None, 1.0)
    pitch_y, pitch_x = h / gy, w / gx
    # the fine sweep centres on the drop-weighted centroid of the hot cells (overlapping cells tie)
    hot = np.where(drop >= 0.5 * drop.max(), drop, 0.0)
    fy = float((hot.sum(axis=1) @ cy) / hot.sum())
    fx = float((hot.sum(axis=0) @ cx) / hot.sum())

    def starts(centre: float, pitch: float, size: int, n: int) -> npt.NDArray[np.int64]:
        want = np.linspace(centre - pitch, centre + pitch, gf)
        return np.clip(np.floor(want - size / 2.0 + 0.5), -(size - 1), n - 1).astype(np.int64)

    best: tuple[F32, npt.NDArray[np.int64], npt.NDArray[np.int64], int, int] | None = None
    for frac in (1 / 3, 2 / 3):  # a saturating model may need more of the finding hidden: one retry
        size_y, size_x = max(2, round(pitch_y * frac)), max(2, round(pitch_x * frac))
        y0s, x0s = starts(fy, pitch_y, size_y, h), starts(fx, pitch_x, size_x, w)
        fine_boxes = [(max(0, int(a)), int(a) + size_y, max(0, int(b)), int(b) + size_x) for a in y0s for b in x0s]
        fprobs = to_score(runtime.predict(_occlude(x, fill, fine_boxes)))
        fine = np.clip(fprobs[0] - fprobs[1:], 0.0, None).reshape(gf, gf).astype(np.float32)
        log.debug("occlusion: coarse %s, fine (patch %d px) %s", np.round(drop, 2).tolist(), size_y,
                  np.round(fine, 2).tolist())
        if best is None or float(fine.max()) > float(best[0].max()):
            best = (fine, y0s, x0s, size_y, size_x)
        if float(fine.max()) >= 0.5 * float(drop.max()):
            break
    assert best is not None
    fine, y0s, x0s, size_y, size_x = best
    if float(fine.max()) <= 0.0:  # the small patch removes no evidence anywhere: coarse map only
        return _Occlusion(coarse, empty, empty, None, 1.0)
    stride = 2.0 * min(pitch_y, pitch_x) / (gf - 1)
    rest = np.where(ndimage.binary_dilation(hot > 0, structure=np.ones((3, 3), bool)), 0.0, drop)
    centres_y = (y0s + (size_y - 1) / 2.0).astype(np.float64)
    centres_x = (x0s + (size_x - 1) / 2.0).astype(np.float64)
    return _Occlusion(cells_to_grid(rest), centres_y, centres_x, fine, stride, float(drop.max()))


def _to_source_grid(occ: _Occlusion, geom: _Geometry, rows: int, cols: int) -> F32:
    """Occlusion drops -> a heat map on the source slice's (rows, cols), in probability units.

    The value is the drop in P(positive) when the region is occluded (absolute, not normalised
    per image, so a negative study stays cold).  Around the hottest cells the map is the fine
    samples smoothed by a Gaussian (sum, not mean, so its peak is the bump's centre, between
    the samples), scaled to the hot cell's drop; elsewhere the coarse map of the other cells
    (another finding far away still shows).  Zero outside the model's field of view.
    """
    my = np.arange(rows, dtype=np.float64) * geom.scale[0] - geom.offset[0]  # model coordinate of each row
    mx = np.arange(cols, dtype=np.float64) * geom.scale[1] - geom.offset[1]
    yy, xx = np.meshgrid(my, mx, indexing="ij")
    out = ndimage.map_coordinates(occ.coarse, [yy, xx], order=1, mode="constant", cval=0.0).astype(np.float32)
    if occ.fine_drops is None:
        return out
    gy = np.exp(-0.5 * ((occ.fine_y[:, None] - my[None, :]) / occ.sigma) ** 2)  # (gf, rows)
    gx = np.exp(-0.5 * ((occ.fine_x[:, None] - mx[None, :]) / occ.sigma) ** 2)  # (gf, cols)
    fine = gy.T @ occ.fine_drops.astype(np.float64) @ gx
    peak = float(fine.max())
    if peak <= 0.0:
        return out
    fine *= occ.fine_peak / peak
    fov = ((my > -0.5) & (my < occ.coarse.shape[0] - 0.5))[:, None] & (
        (mx > -0.5) & (mx < occ.coarse.shape[1] - 0.5))[None, :]
    merged = np.maximum(out, fine) * fov
    return np.clip(merged, 0.0, 1.0).astype(np.float32)


@contextmanager
def _timed(stages: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to ``stages[name]`` (logged per series: where the time goes)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0


def _to_source_index(i: int, model_dz: float, source_dz: float, n_source: int) -> int:
    return int(np.clip(round(i * model_dz / source_dz), 0, n_source - 1))


def _predict_2d(
    model: Manifest, runtime: Runtime, vol: Volume, heatmap: bool, max_passes: int, t: dict[str, float]
) -> tuple[float, int, F32, F32 | None]:
    spec = model.preprocessing
    z = vol.shape[0]
    ts = spec.target_spacing
    target = (ts[0] if (ts and spec.resample_z) else None, ts[1] if ts else None, ts[2] if ts else None)
    with _timed(t, "preprocess"):
        arr, eff, geom = _resample_inplane(vol.array, vol.spacing, target, tuple(spec.input_shape[:2]))
        arr = crop_or_pad(arr, (arr.shape[0], *spec.input_shape), spec.pad_value_hu)
    n = arr.shape[0]
    scores = np.empty(n, np.float32)
    for start in range(0, n, SLICE_CHUNK):
        idx = np.arange(start, min(n, start + SLICE_CHUNK))
        with _timed(t, "preprocess"):
            x = slices_2d(arr, eff, spec, indices=idx)
        with _timed(t, "model"):
            scores[idx] = output_to_probability(runtime.predict(x), model.output)
    assert model.aggregation is not None  # guaranteed by the manifest validator for 2D modes
    prob, key_m = aggregate(scores, model.aggregation)
    if n != z:  # resample_z: report per source slice (nearest model slice)
        src = np.clip(np.rint(np.arange(z) * vol.spacing[0] / eff[0]).astype(int), 0, n - 1)
        slice_scores = scores[src]
        key = _to_source_index(key_m, eff[0], vol.spacing[0], z)
    else:
        slice_scores, key = scores, key_m
    heat = None
    if heatmap:
        with _timed(t, "heatmap"):
            x_key = slices_2d(arr, eff, spec, indices=[key_m])[0]
            heat = _to_source_grid(_occlusion(runtime, x_key, model.output, max_passes), geom, *vol.shape[1:])
    return prob, key, slice_scores, heat


def _predict_3d(
    model: Manifest, runtime: Runtime, vol: Volume, heatmap: bool, max_passes: int, t: dict[str, float]
) -> tuple[float, int, F32 | None]:
    spec = model.preprocessing
    d = spec.input_shape[0]
    target = spec.target_spacing or (None, None, None)
    with _timed(t, "preprocess"):
        arr, eff, geom = _resample_inplane(vol.array, vol.spacing, target, tuple(spec.input_shape[1:]))
        nz = arr.shape[0]
        if model.sliding_window.enabled and nz > d:
            stride = model.sliding_window.stride
            starts = list(range(0, nz - d + 1, stride))
            if starts[-1] != nz - d:
                starts.append(nz - d)
            inputs = np.stack([volume_3d(arr[s : s + d], eff, spec) for s in starts])
        else:  # volume_3d centre-crops/pads z: the window "starts" at -pad or +crop
            starts = [(nz - d) // 2 if nz >= d else -((d - nz) // 2)]
            inputs = volume_3d(arr, eff, spec)[None]
    with _timed(t, "model"):
        probs = output_to_probability(runtime.predict(inputs), model.output)
    best = int(np.argmax(probs))
    centre = starts[best] + d // 2
    key = _to_source_index(int(np.clip(centre, 0, nz - 1)), eff[0], vol.spacing[0], vol.shape[0])
    heat = None
    if heatmap:
        with _timed(t, "heatmap"):
            heat = _to_source_grid(_occlusion(runtime, inputs[best], model.output, max_passes), geom,
                                   *vol.shape[1:])
    return float(probs[best]), key, heat


def predict_series(
    model: LoadedModel, volume: Volume, *, heatmap: bool = True, max_occlusion_passes: int = 160
) -> ModelResult:
    """Score ``volume`` with ``model``; see the module docstring for aggregation and heat map."""
    t0 = time.perf_counter()
    man = model.manifest
    slice_scores: F32 | None = None
    stages: dict[str, float] = {}
    if man.preprocessing.mode == "3d":
        prob, key, heat = _predict_3d(man, model.runtime, volume, heatmap, max_occlusion_passes, stages)
    else:
        prob, key, slice_scores, heat = _predict_2d(
            man, model.runtime, volume, heatmap, max_occlusion_passes, stages
        )
    secs = time.perf_counter() - t0
    log.info("%s %s on series %s: p=%.3f key slice %d (%.2f s: %s)", man.name, man.version,
             volume.series_instance_uid, prob, key, secs,
             ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
    return ModelResult(
        model_name=man.name,
        model_version=man.version,
        finding=man.finding,
        probability=prob,
        threshold=man.threshold,
        positive=prob >= man.threshold,
        key_slice_index=key,
        slice_scores=slice_scores,
        heatmap=heat,
        inference_seconds=secs,
    )
