"""The evidence stage of the shipped-model recipes: a locked test range, a shift report and baselines.

``python -m training.recipes.default_models --evidence-only --model 2.5d|3d --out models`` re-scores
the shipped artifacts (no training) and rewrites ``evaluation.json`` (key ``evidence``), the
manifest's metrics and ``MODEL_CARD.md``; the full recipes run the same stage after training.

* **Locked test range** (:data:`LOCKED_FIRST_SEED` ..): phantom seeds disjoint from every range
  used before (train 100000+, validation 200000+, the earlier test split 300000+, latency 400000+,
  the shipped-model tests 500000+).  It is scored once per artifact; nothing is chosen on it.
* **Shift sets**: small nodules (3-5 mm radius), 1 mm thin slices, prone (HFP) and feet-first (FFS)
  series written as DICOM and read back through the node's own ``assemble_volume``, higher noise,
  and another scanner geometry (512 x 512 matrix, 0.6 mm pixels, 307 mm field of view, 2.5 mm
  slices).  Each has its own disjoint seed range.
* **Baselines** on the same series, no model: max HU inside the lungs, the max after a 2 mm
  Gaussian smoothing, and the fraction of lung voxels denser than -300 HU.
* **Per-artifact thresholds** chosen on the validation split from that artifact's own scores
  (max Youden J, midpoint of the validation score gap), and the series-probability shift between
  the served artifact and its full-precision sibling (max, mean) on every series scored.

Every series is scored with the node's registry + predictor (``load_model(artifact=...)`` and
``predict_series``), i.e. the node's preprocessing, aggregation / sliding window and runtimes.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medclf_node.domain import Volume
from medclf_node.synthetic.phantoms import Phantom, make_phantom
from training.data.synth import case_spacing
from training.recipes.phantom_sets import SplitPlan, nodules_for_seed

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]

#: First seed of the locked test range; every evidence set lives in [LOCKED_FIRST_SEED, LOCKED_FIRST_SEED + 10^5).
LOCKED_FIRST_SEED = 900_000
#: Seed ranges used before the locked range existed (train / val / test / latency / tests).
USED_SEED_RANGES: dict[str, tuple[int, int]] = {
    "train": (100_000, 199_999), "validation": (200_000, 299_999), "earlier test": (300_000, 399_999),
    "latency": (400_000, 499_999), "shipped-model tests": (500_000, 599_999),
}
PATIENT_POSITIONS = ("HFS", "HFP", "FFS")
#: In-distribution phantom parameters of the recipes' test split.
IN_DIST_SHAPES: tuple[tuple[int, int, int], ...] = ((100, 128, 128), (100, 192, 192), (100, 256, 256))


@dataclass(frozen=True)
class EvidenceSet:
    """One evaluation set: a seed range and how its phantoms differ from the training distribution."""

    name: str
    title: str
    first_seed: int
    count: int
    shapes: tuple[tuple[int, int, int], ...] = IN_DIST_SHAPES
    spacing: tuple[float, float, float] | None = None  # None: per-seed jitter +-15% as in training
    radius_range_mm: tuple[float, float] = (5.0, 14.0)
    extra_noise_hu: float = 0.0
    position: str = "HFS"
    dicom: bool = False  # written as DICOM and read back through the node's assemble_volume
    locked: bool = False

    def seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.count))

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["shapes"] = [list(s) for s in self.shapes]
        return d


def evidence_sets(n_locked: int = 60, n_shift: int = 40) -> tuple[EvidenceSet, ...]:
    """The locked in-distribution set and the five shift sets (n per set as given)."""
    b = LOCKED_FIRST_SEED
    return (
        EvidenceSet("locked", "in-distribution, locked range", b, n_locked, locked=True),
        EvidenceSet("small_nodules", "small nodules (radius 3-5 mm)", b + 10_000, n_shift,
                    radius_range_mm=(3.0, 5.0)),
        EvidenceSet("thin_slices", "1 mm thin slices (300 x 192 x 192, 1 x 1.875 x 1.875 mm)", b + 20_000, n_shift,
                    shapes=((300, 192, 192),), spacing=(1.0, 1.875, 1.875)),
        EvidenceSet("prone", "prone (HFP) DICOM through the node's assemble_volume", b + 30_000, n_shift,
                    position="HFP", dicom=True),
        EvidenceSet("feet_first", "feet-first supine (FFS) DICOM through the node's assemble_volume", b + 40_000,
                    n_shift, position="FFS", dicom=True),
        EvidenceSet("high_noise", "higher noise (+40 HU Gaussian on top of the scanner's 8-22 HU)", b + 50_000,
                    n_shift, extra_noise_hu=40.0),
        EvidenceSet("geometry", "other scanner geometry (512 x 512, 0.6 mm pixels, 307 mm FOV, 2.5 mm slices)",
                    b + 60_000, n_shift, shapes=((120, 512, 512),), spacing=(2.5, 0.6, 0.6)),
    )


def check_locked_ranges(sets: Sequence[EvidenceSet], used: dict[str, dict[str, Any]]) -> None:
    """Refuse an evidence seed that falls into a recorded split or any range used before."""
    ranges = dict(USED_SEED_RANGES)
    for name, p in used.items():
        ranges[f"split {name}"] = (int(p["first_seed"]), int(p["first_seed"]) + int(p["count"]) - 1)
    for s in sets:
        lo, hi = s.first_seed, s.first_seed + s.count - 1
        for what, (a, b) in ranges.items():
            if lo <= b and a <= hi:
                raise ValueError(f"evidence set {s.name} seeds {lo}..{hi} overlap the {what} range {a}..{b}")


# ---------------------------------------------------------------------------------------------- phantoms


def set_phantom(es: EvidenceSet, seed: int) -> Phantom:
    """The phantom of ``seed`` in ``es`` (label from the seed: odd 1-3 nodules, even none)."""
    shape = es.shapes[(seed - es.first_seed) % len(es.shapes)]
    spacing = es.spacing if es.spacing is not None else case_spacing(seed, shape, 0.15)
    return make_phantom(seed, shape=shape, spacing=spacing, nodules=nodules_for_seed(seed),
                        radius_range_mm=es.radius_range_mm)


def split_phantom(plan: SplitPlan, seed: int) -> Phantom:
    from training.recipes.phantom_sets import phantom_for

    return phantom_for(plan, seed)


def _hu16(ph: Phantom, extra_noise_hu: float) -> npt.NDArray[np.int16]:
    hu = ph.hu
    if extra_noise_hu > 0:
        rng = np.random.default_rng(np.random.SeedSequence([ph.seed, 0xA015E]))
        hu = hu + rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(extra_noise_hu)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def memory_volume(hu: npt.NDArray[np.int16], spacing: tuple[float, float, float], seed: int) -> Volume:
    """The series as the node's ingest hands over an axial head-first supine series."""
    return Volume(array=hu.astype(np.float32), spacing=spacing,
                  affine=np.diag([spacing[0], spacing[1], spacing[2], 1.0]), slice_refs=(),
                  study_instance_uid=f"2.25.{seed + 1}", series_instance_uid=f"2.25.{seed + 2}")


def write_positioned_series(hu: npt.NDArray[np.int16], spacing: tuple[float, float, float], out_dir: Path,
                            position: str, *, patient_id: str, uid_seed: str) -> list[Path]:
    """Write the canonical (head->feet, anterior->posterior, right->left) volume ``hu`` as the CT
    series a scanner produces with the patient in ``position`` (HFS, HFP or FFS).

    The scanner's pixel grid stays fixed while the patient turns: prone (HFP) images are the
    canonical slices rotated 180 degrees in-plane with ImageOrientationPatient (-1,0,0 / 0,-1,0);
    feet-first supine (FFS) images are mirrored left-right with (-1,0,0 / 0,1,0) and acquired from the
    feet up (InstanceNumber 1 at the feet).  Positions are the true patient (LPS) positions, so a node
    that honours the geometry rebuilds the canonical array exactly.
    """
    import pydicom

    from medclf_node.synthetic.dicom_writer import default_origin, write_ct_series

    if position not in PATIENT_POSITIONS:
        raise ValueError(f"position {position!r}: choose one of {PATIENT_POSITIONS}")
    nz, ny, nx = hu.shape
    dz, dy, dx = spacing
    x0, y0, z0 = default_origin(hu.shape, spacing)
    if position == "HFS":
        pix, iop, ipp_xy = hu, [1, 0, 0, 0, 1, 0], (x0, y0)
    elif position == "HFP":
        pix, iop, ipp_xy = hu[:, ::-1, ::-1], [-1, 0, 0, 0, -1, 0], (x0 + (nx - 1) * dx, y0 + (ny - 1) * dy)
    else:  # FFS
        pix, iop, ipp_xy = hu[:, :, ::-1], [-1, 0, 0, 0, 1, 0], (x0 + (nx - 1) * dx, y0)
    paths = write_ct_series(np.ascontiguousarray(pix), spacing, out_dir, patient_id=patient_id, uid_seed=uid_seed,
                            origin=(x0, y0, z0), series_description=f"Synthetic chest CT {position}")
    if position == "HFS":
        return paths
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.PatientPosition = position
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [f"{ipp_xy[0]:.4f}", f"{ipp_xy[1]:.4f}", f"{z0 - k * dz:.4f}"]
        if position == "FFS":
            ds.InstanceNumber = nz - k
        ds.save_as(path, enforce_file_format=True)
    return paths


def node_volume(hu: npt.NDArray[np.int16], spacing: tuple[float, float, float], position: str, seed: int,
                patient_id: str) -> tuple[Volume, dict[str, Any]]:
    """Write ``hu`` as a ``position`` DICOM series, read it back with the node's ``assemble_volume``.

    Also says whether the node's array is the canonical one (identical voxels), i.e. whether the node
    put the series into the orientation the model was trained in.
    """
    from medclf_node.config import VolumeSection
    from medclf_node.ingest.volume import assemble_volume

    with tempfile.TemporaryDirectory(prefix="medclf-evidence-") as tmp:
        paths = write_positioned_series(hu, spacing, Path(tmp), position, patient_id=patient_id,
                                        uid_seed=f"evidence-{seed}")
        vol = assemble_volume(paths, VolumeSection())
    same = vol.array.shape == hu.shape and bool(np.array_equal(vol.array, hu.astype(np.float32)))
    return vol, {"canonical": same, "shape": list(vol.array.shape)}


# ---------------------------------------------------------------------------------------------- baselines


def lung_mask(hu: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """Per slice: air (< -500 HU) not connected to the image border, holes filled (nodules, vessels)."""
    air = np.asarray(hu) < -500
    out = np.zeros_like(air)
    for k in range(air.shape[0]):
        lab, n = ndimage.label(air[k])
        if n == 0:
            continue
        border = np.unique(np.r_[lab[0], lab[-1], lab[:, 0], lab[:, -1]])
        inside = air[k] & ~np.isin(lab, border)
        out[k] = ndimage.binary_fill_holes(inside)
    return out


BASELINES: dict[str, str] = {
    "max_hu_lung": "max HU inside the lungs",
    "max_hu_lung_smoothed": "max HU inside the lungs after a 2 mm Gaussian blur",
    "dense_lung_fraction": "fraction of lung voxels denser than -300 HU",
}


def baseline_scores(hu: npt.NDArray[Any], spacing: tuple[float, float, float]) -> dict[str, float]:
    """The trivial, model-free series scores of :data:`BASELINES` (higher = more suspicious)."""
    h = np.asarray(hu, np.float32)
    mask = lung_mask(h)
    if not mask.any():
        return dict.fromkeys(BASELINES, -1024.0)
    smooth = ndimage.gaussian_filter(h, [2.0 / s for s in spacing], mode="nearest", truncate=2.0)
    return {"max_hu_lung": float(h[mask].max()), "max_hu_lung_smoothed": float(smooth[mask].max()),
            "dense_lung_fraction": float((h[mask] > -300).mean())}


# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class SetScores:
    """Series labels, per-artifact probabilities and baseline scores of one set."""

    name: str
    labels: list[int] = field(default_factory=list)
    probs: dict[str, list[float]] = field(default_factory=dict)
    baselines: dict[str, list[float]] = field(default_factory=dict)
    radii_mm: list[list[float]] = field(default_factory=list)
    node_canonical: list[bool] = field(default_factory=list)
    inputs_diff: list[float] = field(default_factory=list)  # per model input |served - reference|


Scorer = Callable[[Volume], dict[str, float]]


def _series(es_or_plan: EvidenceSet | SplitPlan) -> Iterator[tuple[int, Phantom, EvidenceSet | None]]:
    if isinstance(es_or_plan, EvidenceSet):
        for seed in es_or_plan.seeds():
            yield seed, set_phantom(es_or_plan, seed), es_or_plan
    else:
        for seed in es_or_plan.seeds():
            yield seed, split_phantom(es_or_plan, seed), None


def score_set(which: EvidenceSet | SplitPlan, score: Scorer, *, baselines: bool = True,
              input_diff: Callable[[Volume], F32] | None = None,
              baseline_cache: dict[str, dict[str, float]] | None = None) -> SetScores:
    """Render every series of ``which``, build the node's volume, score it with every artifact.

    ``baseline_cache`` (keyed ``"<set>:<seed>"``) lets a second model reuse the model-free baselines.
    """
    name = which.name
    out = SetScores(name)
    t0 = time.perf_counter()
    for seed, ph, es in _series(which):
        hu = _hu16(ph, es.extra_noise_hu if es else 0.0)
        if es is not None and es.dicom:
            vol, info = node_volume(hu, ph.spacing, es.position, seed, ph.patient_id)
            out.node_canonical.append(bool(info["canonical"]))
        else:
            vol = memory_volume(hu, ph.spacing, seed)
        for art, p in score(vol).items():
            out.probs.setdefault(art, []).append(float(p))
        if baselines:
            key = f"{name}:{seed}"
            if baseline_cache is not None and key in baseline_cache:
                base = baseline_cache[key]
            else:
                base = baseline_scores(vol.array, vol.spacing)
                if baseline_cache is not None:
                    baseline_cache[key] = base
            for k, v in base.items():
                out.baselines.setdefault(k, []).append(v)
        if input_diff is not None:
            out.inputs_diff.extend(np.asarray(input_diff(vol), np.float64).reshape(-1).tolist())
        out.labels.append(ph.label)
        out.radii_mm.append([n.radius_mm for n in ph.nodules])
    log.info("evidence set %s: %d series scored in %.0f s", name, len(out.labels), time.perf_counter() - t0)
    return out


def node_scorer(model_dir: Path, artifacts: Sequence[str], threads: int = 2) -> tuple[Scorer, dict[str, Any]]:
    """Series probability of every artifact through the node's registry and predictor."""
    from medclf_node.inference.predict import predict_series
    from medclf_node.inference.registry import load_model

    loaded = {a: load_model(model_dir, threads=threads, artifact=a) for a in artifacts}

    def score(vol: Volume) -> dict[str, float]:
        return {a: float(predict_series(m, vol, heatmap=False).probability) for a, m in loaded.items()}

    return score, loaded


def input_differ(loaded: dict[str, Any], served: str, reference: str) -> Callable[[Volume], F32]:
    """|served - reference| probability of every model input (slice or window) the node builds."""
    from medclf_node.inference.predict import output_to_probability
    from medclf_node.preprocess import resample, slices_2d, volume_3d

    man = loaded[served].manifest
    spec = man.preprocessing

    def inputs(vol: Volume) -> F32:
        if spec.mode != "3d":
            return slices_2d(vol.array, vol.spacing, spec)
        from training.recipes.model_3d import window_starts

        assert spec.target_spacing is not None
        arr = resample(np.asarray(vol.array, np.float32), vol.spacing, spec.target_spacing)
        depth = spec.input_shape[0]
        starts = window_starts(arr.shape[0], depth, man.sliding_window.stride)
        return np.stack([volume_3d(arr[s : s + depth] if s >= 0 else arr, spec.target_spacing, spec)
                         for s in starts]).astype(np.float32)

    def diff(vol: Volume) -> F32:
        x = inputs(vol)
        ps = []
        for art in (served, reference):
            rt = loaded[art].runtime
            ps.append(np.concatenate([output_to_probability(rt.predict(x[i : i + 32]), man.output)
                                      for i in range(0, len(x), 32)]))
        return np.abs(ps[0] - ps[1]).astype(np.float32)

    return diff


def artifact_threshold(labels: Sequence[int], probs: Sequence[float]) -> float:
    """Max Youden J on validation, moved to the middle of the validation score gap it sits in."""
    from training.evaluate import choose_threshold

    y = np.asarray(labels)
    s = np.asarray(probs, np.float64)
    top = float(choose_threshold(y, s, "youden", 0.9))
    below = s[s < top]
    return float((top + (below.max() if below.size else 0.0)) / 2.0)


def _auc_ci(y: Sequence[int], s: Sequence[float], n_boot: int) -> dict[str, Any]:
    from training.evaluate import bootstrap_auc_ci, roc_auc

    lo, hi = bootstrap_auc_ci(y, s, n_boot, 0)
    return {"auc": roc_auc(y, s), "auc_ci95": [lo, hi]}


def summarize(scores: SetScores, thresholds: dict[str, float], n_boot: int, title: str,
              served: str, reference: str) -> dict[str, Any]:
    """AUC (CI), sensitivity/specificity at each artifact's own threshold, baselines, artifact shift."""
    from training.evaluate import binary_report

    y = scores.labels
    arts = {a: binary_report(y, p, thresholds[a], n_boot=n_boot, name=f"{scores.name} ({a})")
            for a, p in scores.probs.items()}
    for r in arts.values():
        r.pop("calibration", None)
    shift = np.abs(np.asarray(scores.probs[served]) - np.asarray(scores.probs[reference]))
    out: dict[str, Any] = {
        "title": title, "n": len(y), "n_positive": int(sum(y)), "artifacts": arts,
        "series_probability_shift": {"max": float(shift.max()), "mean": float(shift.mean())},
        "baselines": {k: _auc_ci(y, v, n_boot) for k, v in scores.baselines.items()},
        "warnings": sorted({w for r in arts.values() for w in r["warnings"]}),
        "scores": {"labels": y, **{a: p for a, p in scores.probs.items()}},
    }
    radii = [r for rs in scores.radii_mm for r in rs]
    if radii:
        out["nodule_radius_mm"] = {"min": float(min(radii)), "median": float(np.median(radii)),
                                   "max": float(max(radii))}
    if scores.node_canonical:
        out["node_canonical_orientation"] = {"series": len(scores.node_canonical),
                                             "canonical": int(sum(scores.node_canonical))}
    return out


def run_evidence(model_dir: Path, report: dict[str, Any], *, served: str, reference: str,
                 n_locked: int = 60, n_shift: int = 40, n_boot: int = 2000, threads: int = 2,
                 sets: Sequence[EvidenceSet] | None = None, plots_dir: Path | None = None,
                 model_name: str = "", split_limit: int | None = None,
                 baseline_cache: Path | None = None) -> dict[str, Any]:
    """Score validation, the earlier test split, the locked set and the shift sets with both artifacts.

    ``report`` is the model's evaluation record (its ``splits`` give the validation and earlier test
    plans).  Returns the ``evidence`` section of evaluation.json.
    """
    from training.evaluate import plot_curves

    t_start = time.perf_counter()
    sets = tuple(sets) if sets is not None else evidence_sets(n_locked, n_shift)
    check_locked_ranges(sets, report["splits"])
    plans = {k: SplitPlan(k, int(p["first_seed"]), min(int(p["count"]), split_limit or int(p["count"])),
                          tuple(tuple(s) for s in p["shapes"]), float(p["spacing_jitter"]),
                          tuple(p["radius_range_mm"]))
             for k, p in report["splits"].items() if k in ("val", "test")}
    import json

    cache: dict[str, dict[str, float]] = {}
    if baseline_cache is not None and baseline_cache.exists():
        cache = json.loads(baseline_cache.read_text(encoding="utf-8"))
    score, loaded = node_scorer(model_dir, (served, reference), threads)
    differ = input_differ(loaded, served, reference)

    # 1. thresholds: each artifact on its own validation scores
    val = score_set(plans["val"], score, baselines=False, input_diff=differ)
    thresholds = {a: artifact_threshold(val.labels, p) for a, p in val.probs.items()}
    log.info("per-artifact validation thresholds: %s", thresholds)

    # 2. every set at those thresholds
    results: dict[str, Any] = {}
    results["validation"] = summarize(val, thresholds, n_boot, "validation split (chooses the thresholds)",
                                      served, reference)
    dev = score_set(plans["test"], score, baseline_cache=cache)
    results["earlier_test"] = summarize(dev, thresholds, n_boot,
                                        "earlier test split (seen during model development)", served, reference)
    all_scores = [val, dev]
    for es in sets:
        sc = score_set(es, score, baseline_cache=cache)
        all_scores.append(sc)
        if baseline_cache is not None:
            baseline_cache.write_text(json.dumps(cache), encoding="utf-8")
        results[es.name] = summarize(sc, thresholds, n_boot, es.title, served, reference)
        results[es.name]["definition"] = es.describe()

    shift = np.concatenate([np.abs(np.asarray(s.probs[served]) - np.asarray(s.probs[reference]))
                            for s in all_scores])
    inputs = np.asarray(val.inputs_diff, np.float64)
    plots: list[str] = []
    if plots_dir is not None:
        locked = next(s for s in all_scores if s.name == "locked")
        for split, sc in (("validation", val), ("locked test", locked)):
            paths = plot_curves(sc.labels, sc.probs[served], plots_dir, split.replace(" ", "_"),
                                model=f"{model_name} {served}".strip(), split=split, threshold=thresholds[served])
            plots += [str(p.relative_to(model_dir)) if p.is_relative_to(model_dir) else str(p) for p in paths]
    evidence = {
        "served_artifact": served, "reference_artifact": reference,
        "thresholds": thresholds,
        "threshold_rule": "per artifact: max Youden J on that artifact's validation series scores, midpoint of "
                          "the validation score gap",
        "locked_first_seed": LOCKED_FIRST_SEED, "used_seed_ranges": USED_SEED_RANGES,
        "sets": results,
        "artifact_shift": {
            "series": {"n": int(len(shift)), "max": float(shift.max()), "mean": float(shift.mean()),
                       "p99": float(np.quantile(shift, 0.99))},
            "validation_inputs": {"n": int(len(inputs)), "max": float(inputs.max()), "mean": float(inputs.mean()),
                                  "p99": float(np.quantile(inputs, 0.99))},
        },
        "baseline_definitions": BASELINES,
        "bootstrap": n_boot,
        "plots": plots,
        "seconds": time.perf_counter() - t_start,
    }
    log.info("evidence for %s in %.0f s: locked AUC %s", model_dir.name, evidence["seconds"],
             {a: round(r["auc"], 4) for a, r in results["locked"]["artifacts"].items()})
    return evidence


__all__ = ["BASELINES", "LOCKED_FIRST_SEED", "EvidenceSet", "baseline_scores", "check_locked_ranges",
           "evidence_sets", "lung_mask", "node_volume", "run_evidence", "write_positioned_series"]
