"""Recipe for the shipped default model ``nodule-2p5d-int8``: synthetic data -> train -> evaluate -> export.

Run ``python -m training.recipes.default_models --out models`` (about 10 minutes on 2 cores);
``--tiny`` runs the same code path on a handful of phantoms for one epoch (tests, < 1 minute).

Every figure in the model card comes from this run: series-level AUC on the synthetic test split
(bootstrap 95% CI), sensitivity/specificity at a threshold chosen on validation, the int8-vs-fp32
AUC delta, and the CPU latency of the node's own predictor on a 300x512x512 series.  The data is
built before TensorFlow is imported, so it can be rendered in forked workers.

The run ends with the evidence stage (:mod:`training.recipes.evidence`): a locked test range never
used for any decision, a shift report (small nodules, thin slices, prone / feet-first DICOM through
the node, higher noise, other scanner geometry), trivial baselines, per-artifact thresholds and the
int8-vs-fp32 series-probability shift.  ``--evidence-only [--model 3d]`` runs just that stage on the
shipped artifacts (no training) and regenerates evaluation.json, the manifest's metrics and the card
(``--baseline-cache FILE`` lets the second model reuse the model-free baseline scores);
``--card-only`` re-renders the card from evaluation.json.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medclf_node.inference.manifest import (
    Aggregation,
    Artifact,
    InputSpec,
    Labels,
    Manifest,
    OutputSpec,
    Provenance,
    sha256_path,
    write_manifest,
)
from medclf_node.preprocess import PreprocessSpec, Window
from training.recipes.phantom_sets import (
    RecipeSize,
    SampleSet,
    SplitPlan,
    build_samples,
    default_workers,
    series_samples,
)
from training.recipes.recipe_output import (
    REPORT_FILE,
    artifact_bytes,
    split_summaries,
    write_evaluation,
)
from training.recipes.series_eval import EvalSeries, build_eval_series, slice_scores

log = logging.getLogger(__name__)

MODEL_NAME = "nodule-2p5d-int8"
MODEL_VERSION = "1.0.0"
INT8_FILE = "model_int8.tflite"
FP32_FILE = "model_fp32.tflite"
LUNG_WINDOW = Window(center=-600.0, width=1500.0)

#: 3.5 mm isotropic model grid: a 300-slice 512x512 series (0.7 x 0.7 x 1 mm) becomes 86 inputs of
#: 96x96x3 (the slice and its neighbours 3.5 mm above and below; 336 mm field of view), so inference
#: stays well under 1 s and a CPU epoch of training takes about a minute.
SPEC = PreprocessSpec(
    mode="2.5d",
    windows=(LUNG_WINDOW,),
    input_shape=(96, 96),
    target_spacing=(3.5, 3.5, 3.5),
    resample_z=True,
    context_slices=1,
)
AGGREGATION_CANDIDATES = (
    Aggregation(method="max"),
    Aggregation(method="topk_mean", k=2),
    Aggregation(method="topk_mean", k=3),
)


FULL = RecipeSize(
    train=140, val=40, test=60,
    train_shapes=((100, 128, 128), (100, 192, 192), (100, 256, 256)),
    test_shapes=((100, 128, 128), (100, 192, 192), (100, 256, 256)),
    negatives_per_series=8, epochs=12, batch_size=16, bootstrap=2000, representative=200,
    latency_shape=(300, 512, 512), latency_repeats=3,
)
TINY = RecipeSize(
    train=6, val=4, test=4,
    train_shapes=((40, 96, 96),), test_shapes=((40, 96, 96),),
    negatives_per_series=6, epochs=1, batch_size=16, bootstrap=50, representative=16,
    latency_shape=(40, 96, 96), latency_repeats=1,
)
SEED_BASES = {"train": 100_000, "val": 200_000, "test": 300_000, "latency": 400_000}


def cfg_patience(size: RecipeSize) -> int:
    """No early stopping: validation AUC during training uses lagging BatchNorm statistics, so the
    whole (short) cosine schedule runs and the best checkpoint is kept."""
    return size.epochs


def split_plans(size: RecipeSize, seed_offset: int = 0) -> dict[str, SplitPlan]:
    """Disjoint seed ranges (= disjoint patients) for train / val / test."""
    return {
        "train": SplitPlan("train", SEED_BASES["train"] + seed_offset, size.train, size.train_shapes),
        "val": SplitPlan("val", SEED_BASES["val"] + seed_offset, size.val, size.train_shapes),
        "test": SplitPlan("test", SEED_BASES["test"] + seed_offset, size.test, size.test_shapes),
    }


def _val_samples(series: list[EvalSeries], negatives: int) -> SampleSet:
    """Slice-level validation samples (for checkpointing on val AUC) from the held-out val series."""
    xs, ys, ids = [], [], []
    for s in series:
        x, y = series_samples(s.hu, s.spacing, SPEC, s.slice_labels, s.ambiguous, seed=s.seed,
                              negatives=negatives, flip=False)
        xs.append(x)
        ys.append(y)
        ids += [s.patient_id] * len(y)
    return SampleSet(np.concatenate(xs), np.concatenate(ys), np.asarray(ids), len(series),
                     sum(s.label for s in series))


#: Training-time augmentation (training.data.augment): mirror, small rotations, contrast/brightness.
#: No elastic deformation: it costs more CPU than it adds for rigid spherical nodules.
AUGMENT = {"flip_axes": (-1,), "flip_prob": 0.5, "rotate_deg": 10.0, "contrast": 0.1, "brightness": 0.03,
           "elastic_alpha": 0.0}
SHIFT_PX = 8


def _augmented(split: Any, seed: int) -> Any:
    """The split repeated forever with a new augmentation of every sample on every pass.

    Each draw is keyed by (seed, position in the endless stream) with stateless random ops, so
    runs repeat exactly although the map runs in parallel (``fit`` shuffles and batches it).
    """
    from training.data.augment import AugmentConfig, augment
    from training.tfenv import tf

    cfg = AugmentConfig.model_validate(AUGMENT)
    w = SPEC.windows[0]
    pad = float(np.clip((SPEC.pad_value_hu - (w.center - w.width / 2.0)) / w.width, 0.0, 1.0))

    def aug(pair: Any, n: Any) -> Any:
        x, y = pair
        key = tf.stack([tf.constant(seed, tf.int64), n])
        x = augment(x, key, cfg)
        # random translation by up to SHIFT_PX pixels (air pads the edge): anatomy moves, the label stays
        h, w, c = x.shape
        x = tf.pad(x, [[SHIFT_PX, SHIFT_PX], [SHIFT_PX, SHIFT_PX], [0, 0]], constant_values=pad)
        crop_key = tf.random.experimental.stateless_fold_in(key, 7)
        return tf.image.stateless_random_crop(x, [h, w, c], seed=crop_key), y

    stream = tf.data.Dataset.zip((split.dataset.repeat(), tf.data.Dataset.counter()))
    ds = stream.map(aug, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return type(split)(ds, split.labels, split.series_ids)


def _recalibrate_batchnorm(model: Any, x: npt.NDArray[np.float32], seed: int, n: int = 512) -> None:
    """Replace BatchNorm moving statistics by the exact statistics of ``n`` training samples.

    Keras' moving averages (momentum 0.99) trail the weights while they still change quickly; on
    this small CPU budget the exported model would otherwise use stale statistics (measured: train
    AUC 0.74 with moving statistics vs 0.99 after recalibration on the same weights).
    """
    from training.tfenv import keras

    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    idx = np.random.default_rng(seed).choice(len(x), size=min(n, len(x)), replace=False)
    saved = [b.momentum for b in bns]
    for b in bns:
        b.momentum = 0.0
    model(x[np.sort(idx)], training=True)
    for b, m in zip(bns, saved, strict=True):
        b.momentum = m
    log.info("recalibrated %d BatchNorm layers on %d training samples", len(bns), len(idx))


def _widen_threshold(report: dict[str, Any], val: Any, test: Any, agg: Aggregation) -> None:
    """Move the Youden threshold to the middle of the validation gap it sits in, and redo the confusions.

    ``choose_threshold`` returns the highest threshold with maximal Youden J, i.e. the lowest
    positive validation score: new positives just below it would be missed.  Every threshold
    between that score and the next lower validation score gives the same validation confusion
    (same J), so the midpoint keeps the rule and adds margin on both sides.
    """
    from training.evaluate import aggregate_series, confusion

    _, vs, vy = aggregate_series(val[0], val[2], val[1], agg)
    _, ts, ty = aggregate_series(test[0], test[2], test[1], agg)
    top = float(report["threshold"])
    below = vs[vs < top]
    mid = float((top + (below.max() if below.size else 0.0)) / 2.0)
    report["threshold"] = mid
    report["threshold_rule"] = "youden, midpoint of the validation gap"
    parts = {"validation_series": (vy, vs), "test_series": (ty, ts), "test_slices": (test[1], test[2])}
    for key, (yy, ss) in parts.items():
        report[key]["confusion"] = confusion(yy, ss, mid).as_dict()


def _series_level(
    series: list[EvalSeries], scores: list[npt.NDArray[np.float32]]
) -> tuple[npt.NDArray[np.str_], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Flatten per-series slice scores into evaluate.evaluate_scores' (ids, slice labels, scores)."""
    ids = np.concatenate([[s.patient_id] * len(sc) for s, sc in zip(series, scores, strict=True)])
    labels = np.concatenate([s.slice_labels.astype(np.int64) for s in series])
    return ids.astype(str), labels, np.concatenate(scores)


def _choose_aggregation(
    series: list[EvalSeries], scores: list[npt.NDArray[np.float32]]
) -> tuple[Aggregation, dict[str, float]]:
    """The candidate aggregation with the best VALIDATION series AUC (ties: the simpler one)."""
    from training.evaluate import roc_auc, series_score

    y = np.array([s.label for s in series])
    aucs: dict[str, float] = {}
    best: tuple[float, Aggregation] | None = None
    for agg in AGGREGATION_CANDIDATES:
        auc = roc_auc(y, [series_score(sc, agg) for sc in scores])
        key = agg.method if agg.method == "max" else f"topk_mean_k{agg.k}"
        aucs[key] = auc
        if best is None or auc > best[0] + 1e-9:
            best = (auc, agg)
    assert best is not None
    return best[1], aucs


def _build_manifest(
    *, artifacts: list[Artifact], threshold: float, aggregation: Aggregation, metrics: dict[str, float],
    command: str, seed_offset: int, size_name: str, dataset: str,
) -> Manifest:
    return Manifest(
        name=MODEL_NAME,
        version=MODEL_VERSION,
        description=(
            "2.5D slice classifier (small CNN) for pulmonary nodules, trained on synthetic CT phantoms. "
            "DEMONSTRATION ONLY - not for clinical use."
        ),
        labels=Labels.model_validate(
            {"finding": {"value": "427359005", "scheme": "SCT", "meaning": "Pulmonary nodule"}}
        ),
        input=InputSpec(shape=(*SPEC.input_shape, SPEC.channels), layout="NHWC", dtype="int8"),
        preprocessing=SPEC,
        output=OutputSpec(kind="probability", positive_index=0),
        aggregation=aggregation,
        threshold=threshold,
        metrics=metrics,
        artifacts=tuple(artifacts),
        default_artifact=INT8_FILE,
        provenance=Provenance(
            dataset=dataset, seed=seed_offset, command=command,
            notes=f"recipe size {size_name}; split seed ranges in {REPORT_FILE}",
        ),
        training_package_version=MODEL_VERSION,
    )


def _latency(model_dir: Path, size: RecipeSize, seed_offset: int) -> dict[str, Any]:
    """Per-series CPU latency of the node's predictor (2 threads) for each artifact."""
    from medclf_node.inference.predict import predict_series
    from medclf_node.inference.registry import load_model
    from medclf_node.synthetic.phantoms import make_phantom
    seed = SEED_BASES["latency"] + seed_offset
    ph = make_phantom(seed, shape=size.latency_shape, nodules=1)
    es = EvalSeries(ph.patient_id, seed, ph.label, np.rint(ph.hu).astype(np.int16), ph.spacing,
             np.zeros(1, np.uint8), np.zeros(1, bool))
    vol = es.volume()
    out: dict[str, Any] = {"series_shape": list(size.latency_shape), "series_spacing_mm": list(ph.spacing),
                           "threads": 2, "repeats": size.latency_repeats}
    for art in (INT8_FILE, FP32_FILE):
        loaded = load_model(model_dir, threads=2, artifact=art)
        times, times_heat = [], []
        prob = float("nan")
        for _ in range(size.latency_repeats):
            t0 = time.perf_counter()
            prob = predict_series(loaded, vol, heatmap=False).probability
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            predict_series(loaded, vol, heatmap=True)
            times_heat.append(time.perf_counter() - t0)
        n_inputs = int(round(size.latency_shape[0] * ph.spacing[0] / SPEC.target_spacing[0]))  # type: ignore[index]
        x = np.random.default_rng(0).random((n_inputs, *loaded.manifest.input.shape), dtype=np.float32)
        t0 = time.perf_counter()
        loaded.runtime.predict(x)
        runtime_only = time.perf_counter() - t0
        out[art] = {
            "series_seconds_median": float(np.median(times)),
            "series_seconds_with_heatmap_median": float(np.median(times_heat)),
            "model_only_seconds": runtime_only,
            "model_inputs": n_inputs,
            "load_seconds": loaded.load_seconds,
            "probability_nodule_phantom": prob,
        }
        log.info("latency %s: %.3f s/series (%.3f s with heat map), model only %.3f s for %d inputs",
                 art, out[art]["series_seconds_median"], out[art]["series_seconds_with_heatmap_median"],
                 runtime_only, n_inputs)
    return out


def run_recipe(out_root: Path, work_dir: Path, *, tiny: bool = False, seed_offset: int = 0,
               workers: int | None = None, command: str = "") -> Path:
    """Build ``out_root/nodule-2p5d-int8`` end to end; returns the model directory."""
    t_start = time.perf_counter()
    size = TINY if tiny else FULL
    size_name = "tiny" if tiny else "full"
    workers = workers or default_workers()
    plans = split_plans(size, seed_offset)
    stages: dict[str, float] = {}

    # 1. data (numpy only, forked workers; TensorFlow is not imported yet)
    t0 = time.perf_counter()
    train_set = build_samples(plans["train"], SPEC, negatives_per_series=size.negatives_per_series,
                              flip_positives=True, workers=workers)
    val_series = build_eval_series(plans["val"], SPEC, workers)
    test_series = build_eval_series(plans["test"], SPEC, workers)
    val_set = _val_samples(val_series, size.negatives_per_series)
    train_summary = train_set.summary()
    stages["data_seconds"] = time.perf_counter() - t0

    from training.data.splits import assert_no_leakage

    assert_no_leakage(train=train_set.patient_ids.tolist(), val=[s.patient_id for s in val_series],
                      test=[s.patient_id for s in test_series])

    # 2. train (tf-keras, float32 on CPU; best weights by validation AUC)
    t0 = time.perf_counter()
    from training.export.tflite import convert
    from training.modeling.config import ModelConfig
    from training.train import Split, fit, load_trained_model
    from training.train_config import DataSection, EvalSection, ExportSection, FitSection, TrainConfig

    cfg = TrainConfig(
        name=MODEL_NAME, version=MODEL_VERSION, output_dir=work_dir,
        model=ModelConfig(family="cnn2d", base_filters=8, max_stages=3, dropout=0.2),
        preprocess=SPEC,
        data=DataSection(shuffle_buffer=4096),
        fit=FitSection(epochs=size.epochs, batch_size=size.batch_size, learning_rate=3e-3, warmup_epochs=0.5,
                       precision="float32", early_stopping_patience=cfg_patience(size), seed=1234 + seed_offset),
        evaluate=EvalSection(aggregation=Aggregation(method="topk_mean", k=2), bootstrap=size.bootstrap),
        export=ExportSection(modes=("fp32", "int8"), default="int8",
                             representative_samples=size.representative),
    )
    train_split = _augmented(Split.from_arrays(train_set.x, train_set.y, train_set.patient_ids), 77 + seed_offset)
    val_split = Split.from_arrays(val_set.x, val_set.y, val_set.patient_ids)
    result = fit(cfg, train_split, val_split, cfg.run_dir)
    stages["train_seconds"] = time.perf_counter() - t0

    # 3. export fp32 + int8 (int8 calibrated on training samples)
    t0 = time.perf_counter()
    model = load_trained_model(cfg.run_dir)
    _recalibrate_batchnorm(model, train_set.x, seed_offset)
    model_dir = out_root / MODEL_NAME
    model_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed_offset)
    rep = train_set.x[rng.choice(len(train_set.y), size=min(size.representative, len(train_set.y)), replace=False)]
    (model_dir / FP32_FILE).write_bytes(convert(model, "fp32"))
    (model_dir / INT8_FILE).write_bytes(convert(model, "int8", rep))
    parity_x = val_set.x[: cfg.export.parity_samples]
    keras_p = np.asarray(model.predict(parity_x, verbose=0), np.float32).reshape(-1)
    del train_set, train_split
    stages["export_seconds"] = time.perf_counter() - t0

    # 4. evaluate both artifacts at series level (node preprocessing + runtime), choose on validation
    t0 = time.perf_counter()
    from medclf_node.inference.runtime import LiteRTRuntime
    from training.evaluate import evaluate_scores

    output = OutputSpec(kind="probability", positive_index=0)
    runtimes = {a: LiteRTRuntime(model_dir / a, threads=2) for a in (INT8_FILE, FP32_FILE)}
    tflite_p = runtimes[FP32_FILE].predict(parity_x).reshape(-1)
    val_scores = {a: [slice_scores(rt, SPEC, output, s) for s in val_series] for a, rt in runtimes.items()}
    test_scores = {a: [slice_scores(rt, SPEC, output, s) for s in test_series] for a, rt in runtimes.items()}
    aggregation, val_aggregation_aucs = _choose_aggregation(val_series, val_scores[INT8_FILE])
    reports: dict[str, Any] = {}
    for art in (INT8_FILE, FP32_FILE):
        val_part = _series_level(val_series, val_scores[art])
        test_part = _series_level(test_series, test_scores[art])
        reports[art] = evaluate_scores(
            val_part, test_part, aggregation, work_dir / "evaluation" / art.removesuffix(".tflite"),
            threshold_rule="youden", n_boot=size.bootstrap,
        )
        _widen_threshold(reports[art], val_part, test_part, aggregation)
    served = reports[INT8_FILE]
    threshold = float(served["threshold"])
    delta = served["test_series"]["auc"] - reports[FP32_FILE]["test_series"]["auc"]
    stages["evaluate_seconds"] = time.perf_counter() - t0

    # 5. manifest, then the node's own loader + predictor on the test series (parity) and latency
    t0 = time.perf_counter()
    artifacts = [
        Artifact(path=INT8_FILE, format="tflite", precision="int8", sha256=sha256_path(model_dir / INT8_FILE),
                 input_dtype="int8"),
        Artifact(path=FP32_FILE, format="tflite", precision="fp32", sha256=sha256_path(model_dir / FP32_FILE),
                 input_dtype="float32"),
    ]
    t = served["test_series"]
    metrics = {
        "test_series_auc": float(t["auc"]),
        "test_series_auc_ci95_low": float(t["auc_ci95"][0]),
        "test_series_auc_ci95_high": float(t["auc_ci95"][1]),
        "test_sensitivity": float(t["confusion"]["sensitivity"]),
        "test_specificity": float(t["confusion"]["specificity"]),
        "val_series_auc": float(served["validation_series"]["auc"]),
        "fp32_test_series_auc": float(reports[FP32_FILE]["test_series"]["auc"]),
        "int8_minus_fp32_test_auc": float(delta),
    }
    dataset = "synthetic chest CT phantoms (medclf_node.synthetic.phantoms), nodule present/absent at series level"
    manifest = _build_manifest(artifacts=artifacts, threshold=threshold, aggregation=aggregation, metrics=metrics,
                               command=command, seed_offset=seed_offset, size_name=size_name, dataset=dataset)
    write_manifest(manifest, model_dir)
    parity = _node_parity(model_dir, test_series, test_scores[INT8_FILE], aggregation)
    latency = _latency(model_dir, size, seed_offset)
    stages["node_checks_seconds"] = time.perf_counter() - t0
    metrics["latency_series_seconds_int8"] = float(latency[INT8_FILE]["series_seconds_median"])
    metrics["latency_series_seconds_fp32"] = float(latency[FP32_FILE]["series_seconds_median"])
    manifest = manifest.model_copy(update={"metrics": metrics})
    write_manifest(manifest, model_dir)
    stages["total_seconds"] = time.perf_counter() - t_start

    # 6. the evaluation record and the model card, both from the figures above
    from training.recipes.model_card import render_card

    report = {
        "model": MODEL_NAME, "version": MODEL_VERSION, "recipe_size": size_name, "command": command,
        "spec": SPEC.model_dump(mode="json"),
        "model_config": cfg.model.model_dump(mode="json"), "fit": cfg.fit.model_dump(mode="json"),
        "augment": {**AUGMENT, "shift_px": SHIFT_PX},
        "size": asdict(size),
        "splits": split_summaries(plans),
        "positives_rule": "odd seed: 1-3 nodules (training.recipes.phantom_sets.nodules_for_seed), even: none",
        "data": {"train_slice_samples": train_summary,
                 "val_series": len(val_series), "val_positive": sum(s.label for s in val_series),
                 "test_series": len(test_series), "test_positive": sum(s.label for s in test_series),
                 "val_slice_samples": val_set.summary()},
        "training": {"epochs_run": result.epochs_run, "best_val_slice_auc": result.best_val_auc,
                     "history": result.history},
        "aggregation": aggregation.model_dump(), "validation_aggregation_aucs": val_aggregation_aucs,
        "threshold": threshold,
        "int8": served, "fp32": reports[FP32_FILE], "int8_minus_fp32_test_auc": delta,
        "keras_vs_tflite_fp32_max_abs_diff": float(np.max(np.abs(keras_p - tflite_p))),
        "node_parity": parity, "latency": latency,
        "artifact_bytes": artifact_bytes(model_dir, [a.path for a in artifacts]),
        "stages": stages,
    }
    write_evaluation(model_dir, report, render_card(report, manifest))
    evidence_stage(model_dir, kind="2.5d", tiny=tiny, command=command)
    log.info("wrote %s in %.0f s: test AUC %.4f, int8-fp32 %.4f", model_dir, stages["total_seconds"],
             metrics["test_series_auc"], delta)
    return model_dir


def _node_parity(model_dir: Path, series: list[EvalSeries], scores: list[npt.NDArray[np.float32]],
                 aggregation: Aggregation) -> dict[str, float]:
    """The node's registry + predictor must reproduce the recipe's series probabilities exactly."""
    from medclf_node.inference.predict import predict_series
    from medclf_node.inference.registry import load_model
    from training.evaluate import series_score

    loaded = load_model(model_dir, threads=2)
    diffs = [abs(predict_series(loaded, s.volume(), heatmap=False).probability - series_score(sc, aggregation))
             for s, sc in zip(series, scores, strict=True)]
    worst = float(max(diffs))
    if worst > 1e-5:
        raise RuntimeError(f"node predictor differs from the recipe's scoring by {worst:.2e}")
    return {"series": len(series), "max_abs_diff": worst}


#: Evidence-stage sizes (training.recipes.evidence): series in the locked set / each shift set.
EVIDENCE_FULL = {"n_locked": 60, "n_shift": 40, "n_boot": 2000, "split_limit": None}
EVIDENCE_TINY = {"n_locked": 4, "n_shift": 2, "n_boot": 50, "split_limit": 4}


def evidence_stage(model_dir: Path, *, kind: str, tiny: bool = False, threads: int = 2, command: str = "",
                   baseline_cache: Path | None = None, sizes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Re-score a built model directory's artifacts (no training): validation thresholds per artifact,
    the earlier test split, the locked test range, the shift sets and baselines; rewrite
    evaluation.json (``evidence``), the manifest's threshold/metrics and MODEL_CARD.md."""
    import json

    from medclf_node.inference.manifest import load_manifest
    from training.recipes.evidence import run_evidence

    report = json.loads((model_dir / REPORT_FILE).read_text(encoding="utf-8"))
    manifest = load_manifest(model_dir)
    if kind == "3d":
        from training.recipes.model_3d import FP16_FILE, SAVED_MODEL_DIR

        served, reference = FP16_FILE, SAVED_MODEL_DIR
    else:
        served, reference = INT8_FILE, FP32_FILE
    sz = dict(sizes or (EVIDENCE_TINY if tiny else EVIDENCE_FULL))
    ev = run_evidence(model_dir, report, served=served, reference=reference, threads=threads,
                      plots_dir=model_dir / "plots", model_name=manifest.name, baseline_cache=baseline_cache, **sz)
    recipe_thr = {served: float(report["threshold"])}
    ev["recipe_threshold_reproduced"] = abs(ev["thresholds"][served] - recipe_thr[served]) < 1e-6
    ev["command"] = command
    report["evidence"] = ev
    report["threshold"] = ev["thresholds"][served]
    metrics = dict(manifest.metrics)
    locked = ev["sets"]["locked"]["artifacts"][served]
    metrics.update({
        "locked_test_series_auc": float(locked["auc"]),
        "locked_test_series_auc_ci95_low": float(locked["auc_ci95"][0]),
        "locked_test_series_auc_ci95_high": float(locked["auc_ci95"][1]),
        "locked_test_sensitivity": float(locked["confusion"]["sensitivity"]),
        "locked_test_specificity": float(locked["confusion"]["specificity"]),
        "series_probability_shift_max": float(ev["artifact_shift"]["series"]["max"]),
        "series_probability_shift_mean": float(ev["artifact_shift"]["series"]["mean"]),
    })
    for name, r in ev["sets"].items():
        if name not in ("validation", "earlier_test", "locked"):
            metrics[f"shift_{name}_auc"] = float(r["artifacts"][served]["auc"])
    manifest = manifest.model_copy(update={"metrics": {k: v for k, v in metrics.items() if np.isfinite(v)},
                                           "threshold": float(ev["thresholds"][served])})
    write_manifest(manifest, model_dir)
    render_and_write_card(model_dir, report, kind)
    return report


def render_and_write_card(model_dir: Path, report: dict[str, Any], kind: str) -> None:
    """evaluation.json + MODEL_CARD.md from ``report`` (the card only renders what the report holds)."""
    from medclf_node.inference.manifest import load_manifest
    from training.recipes.model_card import render_card, render_card_3d

    manifest = load_manifest(model_dir)
    card = render_card_3d(report, manifest) if kind == "3d" else render_card(report, manifest)
    write_evaluation(model_dir, report, card)


def _main_3d(args: argparse.Namespace) -> int:
    """``--model 3d``: the nodule-3d-cbam recipe (training.recipes.model_3d)."""
    from training.recipes.model_3d import run_recipe_3d

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result_args = ["--out", str(args.out), "--model", "3d"] + (["--tiny"] if args.tiny else [])
    result_args += ["--seed-offset", str(args.seed_offset)] if args.seed_offset else []
    command = shlex.join(["python", "-m", "training.recipes.default_models", *result_args])
    kw: dict[str, Any] = {"tiny": args.tiny, "seed_offset": args.seed_offset, "workers": args.workers or 1,
                          "threads": args.threads, "command": command}
    if args.work_dir is not None:
        run_recipe_3d(args.out, args.work_dir, **kw)
    else:
        with tempfile.TemporaryDirectory(prefix="medclf-recipe3d-") as tmp:
            run_recipe_3d(args.out, Path(tmp), **kw)
    return 0


def _main_evidence(args: argparse.Namespace) -> int:
    """``--evidence-only`` / ``--card-only`` on ``OUT/<model>`` (shipped artifacts, no training)."""
    import json

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kind = "3d" if args.model == "3d" else "2.5d"
    name = "nodule-3d-cbam" if kind == "3d" else MODEL_NAME
    model_dir = args.out / name
    if args.card_only:
        render_and_write_card(model_dir, json.loads((model_dir / REPORT_FILE).read_text(encoding="utf-8")), kind)
        return 0
    result_args = ["--out", str(args.out), "--model", args.model, "--evidence-only"] + (["--tiny"] if args.tiny else [])
    command = shlex.join(["python", "-m", "training.recipes.default_models", *result_args])
    evidence_stage(model_dir, kind=kind, tiny=args.tiny, threads=args.threads, command=command,
                   baseline_cache=args.baseline_cache)
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``python -m training.recipes.default_models [--tiny] [--out DIR]``."""
    args_list = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m training.recipes.default_models", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("models"), help="Models root; writes OUT/nodule-2p5d-int8.")
    p.add_argument("--work-dir", type=Path, default=None, help="Training logs/checkpoints (default: a temp dir).")
    p.add_argument("--tiny", action="store_true", help="Same code path on tiny data, 1 epoch (for tests).")
    p.add_argument("--seed-offset", type=int, default=0, help="Shift every split's seed range.")
    p.add_argument("--workers", type=int, default=None, help="Processes rendering phantoms (default 2).")
    p.add_argument("--model", choices=("2.5d", "3d"), default="2.5d",
                   help="Which shipped model: 2.5d (nodule-2p5d-int8) or 3d (nodule-3d-cbam).")
    p.add_argument("--threads", type=int, default=2, help="TensorFlow intra/inter-op threads (3d recipe).")
    p.add_argument("--evidence-only", action="store_true",
                   help="No training: re-score the built model in OUT (locked test range, shift sets, baselines, "
                        "per-artifact thresholds) and regenerate evaluation.json, manifest metrics and the card.")
    p.add_argument("--card-only", action="store_true", help="Only re-render MODEL_CARD.md from evaluation.json.")
    p.add_argument("--baseline-cache", type=Path, default=None,
                   help="JSON file caching the model-free baseline scores between the two models' evidence runs.")
    args = p.parse_args(args_list)
    if args.evidence_only or args.card_only:
        return _main_evidence(args)
    if args.model == "3d":
        return _main_3d(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The reproducing command: only the options that change the result (not --work-dir / --workers).
    result_args = ["--out", str(args.out)] + (["--tiny"] if args.tiny else [])
    result_args += ["--seed-offset", str(args.seed_offset)] if args.seed_offset else []
    command = shlex.join(["python", "-m", "training.recipes.default_models", *result_args])
    if args.work_dir is not None:
        run_recipe(args.out, args.work_dir, tiny=args.tiny, seed_offset=args.seed_offset, workers=args.workers,
                   command=command)
    else:
        with tempfile.TemporaryDirectory(prefix="medclf-recipe-") as tmp:
            run_recipe(args.out, Path(tmp), tiny=args.tiny, seed_offset=args.seed_offset, workers=args.workers,
                       command=command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["FULL", "SPEC", "TINY", "RecipeSize", "main", "run_recipe"]
