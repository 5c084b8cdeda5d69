"""Recipe for the shipped default model ``nodule-2p5d-int8``: a configuration run by the one recipe runner.

Run ``python -m training.recipes.default_models --out models`` (about 10 minutes on 2 cores);
``--tiny`` runs the same code path on a handful of phantoms for one epoch (tests, < 1 minute).
``--model 3d`` runs the ``nodule-3d-cbam`` recipe (:mod:`training.recipes.model_3d`) instead.

:data:`RECIPE` lists the stages (:mod:`training.recipes.runner`): ``data`` (phantoms rendered
before TensorFlow is imported, so in forked workers) -> ``train`` -> ``export`` (fp32 + int8
LiteRT) -> ``evaluate`` (series level through the node's preprocessing and runtimes; aggregation
and threshold chosen on validation; manifest written by the one builder) -> ``parity`` (the node's
predictor reproduces the scores) -> ``latency`` -> ``card`` (evaluation.json + MODEL_CARD.md) ->
``evidence`` (:mod:`training.recipes.evidence`: a locked test range never used for any decision,
shift sets, trivial baselines, per-artifact thresholds, the int8-vs-fp32 probability shift).

``--resume --work-dir DIR`` skips the stages a previous run in DIR finished; ``--only STAGE`` /
``--skip STAGE`` pick stages.  ``--evidence-only [--model 3d]`` (= ``--only evidence``) re-scores
the shipped artifacts (no training) and regenerates evaluation.json, the manifest's metrics and the
card (``--baseline-cache FILE`` lets the second model reuse the model-free baseline scores);
``--card-only`` (= ``--only card`` on a built model) re-renders the card from evaluation.json.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medclf_node.inference.manifest import (
    Aggregation,
    Artifact,
    Labels,
    Manifest,
    OutputSpec,
    Provenance,
    sha256_path,
    write_manifest,
)
from medclf_node.preprocess import PreprocessSpec, Window
from training.export.manifest_builder import build_manifest, update_manifest
from training.recipes.evidence_stage import card_from_disk, run_evidence_stage
from training.recipes.node_checks import node_latency, node_parity, recalibrate_batchnorm
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
from training.recipes.runner import RecipeConfig, RecipeRun, Stage, run_recipe
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


def manifest_2p5d(
    *, artifacts: list[Artifact], threshold: float, aggregation: Aggregation, metrics: dict[str, float],
    command: str, seed_offset: int, size_name: str, dataset: str = "",
) -> Manifest:
    """The recipe's manifest, through the one builder (training.export.manifest_builder)."""
    return build_manifest(
        name=MODEL_NAME,
        version=MODEL_VERSION,
        description=(
            "2.5D slice classifier (small CNN) for pulmonary nodules, trained on synthetic CT phantoms. "
            "DEMONSTRATION ONLY - not for clinical use."
        ),
        labels=Labels.model_validate(
            {"finding": {"value": "427359005", "scheme": "SCT", "meaning": "Pulmonary nodule"}}
        ),
        preprocessing=SPEC,
        output=OutputSpec(kind="probability", positive_index=0),
        aggregation=aggregation,
        threshold=threshold,
        metrics=metrics,
        artifacts=artifacts,
        default_artifact=INT8_FILE,
        provenance=Provenance(
            dataset=dataset or DATASET, seed=seed_offset, command=command,
            notes=f"recipe size {size_name}; split seed ranges in {REPORT_FILE}",
        ),
    )


DATASET = "synthetic chest CT phantoms (medclf_node.synthetic.phantoms), nodule present/absent at series level"


def train_config(run: RecipeRun) -> Any:
    """The fit configuration of this recipe (tf-keras, float32 on CPU; best weights by validation AUC)."""
    from training.modeling.config import ModelConfig
    from training.train_config import DataSection, EvalSection, ExportSection, FitSection, TrainConfig

    size: RecipeSize = run.size
    return TrainConfig(
        name=MODEL_NAME, version=MODEL_VERSION, output_dir=run.work_dir,
        model=ModelConfig(family="cnn2d", base_filters=8, max_stages=3, dropout=0.2),
        preprocess=SPEC,
        data=DataSection(shuffle_buffer=4096),
        fit=FitSection(epochs=size.epochs, batch_size=size.batch_size, learning_rate=3e-3, warmup_epochs=0.5,
                       precision="float32", early_stopping_patience=cfg_patience(size),
                       seed=1234 + run.seed_offset),
        evaluate=EvalSection(aggregation=Aggregation(method="topk_mean", k=2), bootstrap=size.bootstrap),
        export=ExportSection(modes=("fp32", "int8"), default="int8", representative_samples=size.representative),
    )


# ---------------------------------------------------------------------------------------------- stages


def stage_data(run: RecipeRun) -> dict[str, Any]:
    """Training samples and the held-out val/test series (numpy only; TensorFlow is not imported yet)."""
    from training.data.splits import assert_no_leakage

    size: RecipeSize = run.size
    plans = split_plans(size, run.seed_offset)
    workers = run.workers or default_workers()
    train_set = build_samples(plans["train"], SPEC, negatives_per_series=size.negatives_per_series,
                              flip_positives=True, workers=workers)
    val_series = build_eval_series(plans["val"], SPEC, workers)
    test_series = build_eval_series(plans["test"], SPEC, workers)
    val_set = _val_samples(val_series, size.negatives_per_series)
    assert_no_leakage(train=train_set.patient_ids.tolist(), val=[s.patient_id for s in val_series],
                      test=[s.patient_id for s in test_series])
    return {"plans": plans, "train": train_set, "val": val_set, "val_series": val_series,
            "test_series": test_series}


def _data_summary(d: dict[str, Any]) -> dict[str, Any]:
    val_series, test_series = d["val_series"], d["test_series"]
    return {"train_slice_samples": d["train"].summary(),
            "val_series": len(val_series), "val_positive": sum(s.label for s in val_series),
            "test_series": len(test_series), "test_positive": sum(s.label for s in test_series),
            "val_slice_samples": d["val"].summary()}


def stage_train(run: RecipeRun) -> dict[str, Any]:
    from training.train import Split, fit

    d = run.get("data")
    cfg = train_config(run)
    train = d["train"]
    train_split = _augmented(Split.from_arrays(train.x, train.y, train.patient_ids), 77 + run.seed_offset)
    val_split = Split.from_arrays(d["val"].x, d["val"].y, d["val"].patient_ids)
    result = fit(cfg, train_split, val_split, cfg.run_dir)
    return {"run_dir": str(cfg.run_dir), "epochs_run": result.epochs_run, "best_val_auc": result.best_val_auc,
            "history": result.history, "data": _data_summary(d)}


def stage_export(run: RecipeRun) -> dict[str, Any]:
    """fp32 + int8 LiteRT (int8 calibrated on training samples, after BatchNorm recalibration)."""
    from medclf_node.inference.runtime import LiteRTRuntime
    from training.export.tflite import convert
    from training.train import load_trained_model

    size: RecipeSize = run.size
    d = run.get("data")
    cfg = train_config(run)
    model = load_trained_model(Path(run.get("train")["run_dir"]))
    train = d["train"]
    recalibrate_batchnorm(model, train.x, run.seed_offset)
    model_dir = run.model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(run.seed_offset)
    rep = train.x[rng.choice(len(train.y), size=min(size.representative, len(train.y)), replace=False)]
    (model_dir / FP32_FILE).write_bytes(convert(model, "fp32"))
    (model_dir / INT8_FILE).write_bytes(convert(model, "int8", rep))
    # the training arrays are not needed after this stage (GBs for the full 3D recipe): drop them
    run.results["data"] = {k: v for k, v in d.items() if k != "train"}
    parity_x = d["val"].x[: cfg.export.parity_samples]
    keras_p = np.asarray(model.predict(parity_x, verbose=0), np.float32).reshape(-1)
    tflite_p = LiteRTRuntime(model_dir / FP32_FILE, threads=2).predict(parity_x).reshape(-1)
    artifacts = [
        Artifact(path=INT8_FILE, format="tflite", precision="int8", sha256=sha256_path(model_dir / INT8_FILE),
                 input_dtype="int8"),
        Artifact(path=FP32_FILE, format="tflite", precision="fp32", sha256=sha256_path(model_dir / FP32_FILE),
                 input_dtype="float32"),
    ]
    return {"artifacts": [a.model_dump(mode="json") for a in artifacts],
            "keras_vs_tflite_fp32_max_abs_diff": float(np.max(np.abs(keras_p - tflite_p)))}


def stage_evaluate(run: RecipeRun) -> dict[str, Any]:
    """Both artifacts at series level (node preprocessing + runtime); aggregation and threshold on validation."""
    from medclf_node.inference.runtime import LiteRTRuntime
    from training.evaluate import evaluate_scores

    size: RecipeSize = run.size
    d = run.get("data")
    val_series, test_series = d["val_series"], d["test_series"]
    model_dir = run.model_dir
    output = OutputSpec(kind="probability", positive_index=0)
    runtimes = {a: LiteRTRuntime(model_dir / a, threads=2) for a in (INT8_FILE, FP32_FILE)}
    val_scores = {a: [slice_scores(rt, SPEC, output, s) for s in val_series] for a, rt in runtimes.items()}
    test_scores = {a: [slice_scores(rt, SPEC, output, s) for s in test_series] for a, rt in runtimes.items()}
    aggregation, val_aggregation_aucs = _choose_aggregation(val_series, val_scores[INT8_FILE])
    reports: dict[str, Any] = {}
    for art in (INT8_FILE, FP32_FILE):
        val_part = _series_level(val_series, val_scores[art])
        test_part = _series_level(test_series, test_scores[art])
        reports[art] = evaluate_scores(
            val_part, test_part, aggregation, run.work_dir / "evaluation" / art.removesuffix(".tflite"),
            threshold_rule="youden", n_boot=size.bootstrap,
        )
        _widen_threshold(reports[art], val_part, test_part, aggregation)
    served = reports[INT8_FILE]
    threshold = float(served["threshold"])
    delta = served["test_series"]["auc"] - reports[FP32_FILE]["test_series"]["auc"]
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
    artifacts = [Artifact.model_validate(a) for a in run.get("export")["artifacts"]]
    manifest = manifest_2p5d(artifacts=artifacts, threshold=threshold, aggregation=aggregation, metrics=metrics,
                             command=run.command, seed_offset=run.seed_offset, size_name=run.size_name)
    write_manifest(manifest, model_dir)
    return {"reports": reports, "aggregation": aggregation.model_dump(mode="json"),
            "validation_aggregation_aucs": val_aggregation_aucs, "threshold": threshold, "delta": float(delta),
            "test_scores_served": test_scores[INT8_FILE]}


def stage_parity(run: RecipeRun) -> dict[str, float]:
    """The node's registry + predictor must reproduce the recipe's test-series probabilities."""
    from training.evaluate import series_score

    ev = run.get("evaluate")
    agg = Aggregation.model_validate(ev["aggregation"])
    series = run.get("data")["test_series"]
    expected = [series_score(np.asarray(sc, np.float32), agg) for sc in ev["test_scores_served"]]
    return node_parity(run.model_dir, [s.volume() for s in series], expected, threads=2)


def stage_latency(run: RecipeRun) -> dict[str, Any]:
    """Per-series CPU latency of the node's predictor (2 threads) for each artifact; into the manifest."""
    from medclf_node.inference.manifest import load_manifest
    from medclf_node.synthetic.phantoms import make_phantom

    size: RecipeSize = run.size
    seed = SEED_BASES["latency"] + run.seed_offset
    ph = make_phantom(seed, shape=size.latency_shape, nodules=1)
    es = EvalSeries(ph.patient_id, seed, ph.label, np.rint(ph.hu).astype(np.int16), ph.spacing,
                    np.zeros(1, np.uint8), np.zeros(1, bool))
    assert SPEC.target_spacing is not None
    n_inputs = int(round(size.latency_shape[0] * ph.spacing[0] / SPEC.target_spacing[0]))
    out: dict[str, Any] = {"series_shape": list(size.latency_shape), "series_spacing_mm": list(ph.spacing),
                           "threads": 2, "repeats": size.latency_repeats}
    out.update(node_latency(run.model_dir, es.volume(), (INT8_FILE, FP32_FILE), threads=2,
                            repeats=size.latency_repeats, n_inputs=n_inputs))
    manifest = load_manifest(run.model_dir)
    metrics = {**manifest.metrics,
               "latency_series_seconds_int8": float(out[INT8_FILE]["series_seconds_median"]),
               "latency_series_seconds_fp32": float(out[FP32_FILE]["series_seconds_median"])}
    write_manifest(update_manifest(manifest, metrics=metrics), run.model_dir)
    return out


def stage_card(run: RecipeRun) -> None:
    """evaluation.json + MODEL_CARD.md from this run's stage results (alone: re-rendered from evaluation.json)."""
    from medclf_node.inference.manifest import load_manifest
    from training.recipes.model_card import render_card

    if "evaluate" not in run.results:
        card_from_disk(run.model_dir, render_card)
        return
    size: RecipeSize = run.size
    tr, ex, ev = run.get("train"), run.get("export"), run.get("evaluate")
    cfg = train_config(run)
    manifest = load_manifest(run.model_dir)
    report = {
        "model": MODEL_NAME, "version": MODEL_VERSION, "recipe_size": run.size_name, "command": run.command,
        "spec": SPEC.model_dump(mode="json"),
        "model_config": cfg.model.model_dump(mode="json"), "fit": cfg.fit.model_dump(mode="json"),
        "augment": {**AUGMENT, "shift_px": SHIFT_PX},
        "size": asdict(size),
        "splits": split_summaries(split_plans(size, run.seed_offset)),
        "positives_rule": "odd seed: 1-3 nodules (training.recipes.phantom_sets.nodules_for_seed), even: none",
        "data": tr["data"],
        "training": {"epochs_run": tr["epochs_run"], "best_val_slice_auc": tr["best_val_auc"],
                     "history": tr["history"]},
        "aggregation": ev["aggregation"], "validation_aggregation_aucs": ev["validation_aggregation_aucs"],
        "threshold": ev["threshold"],
        "int8": ev["reports"][INT8_FILE], "fp32": ev["reports"][FP32_FILE], "int8_minus_fp32_test_auc": ev["delta"],
        "keras_vs_tflite_fp32_max_abs_diff": ex["keras_vs_tflite_fp32_max_abs_diff"],
        "node_parity": run.get("parity"), "latency": run.get("latency"),
        "artifact_bytes": artifact_bytes(run.model_dir, [a.path for a in manifest.artifacts]),
        "stages": dict(run.seconds),
    }
    write_evaluation(run.model_dir, report, render_card(report, manifest))
    log.info("wrote %s: test AUC %.4f, int8-fp32 %.4f", run.model_dir, manifest.metrics["test_series_auc"],
             ev["delta"])


def stage_evidence(run: RecipeRun) -> None:
    """Locked test range, shift sets, baselines (training.recipes.evidence) on the built model directory."""
    from training.recipes.model_card import render_card

    run_evidence_stage(run.model_dir, served=INT8_FILE, reference=FP32_FILE, render=render_card, tiny=run.tiny,
                       threads=run.threads, command=run.command, baseline_cache=run.options.get("baseline_cache"))


RECIPE = RecipeConfig(
    name=MODEL_NAME,
    version=MODEL_VERSION,
    description="2.5D slice CNN for pulmonary nodules on synthetic CT phantoms, served as int8 LiteRT",
    sizes={"full": FULL, "tiny": TINY},
    stages=(
        Stage("data", stage_data, persist=False, description="phantoms -> 2.5D samples and held-out series"),
        Stage("train", stage_train, needs=("data",)),
        Stage("export", stage_export, needs=("data", "train")),
        Stage("evaluate", stage_evaluate, needs=("data", "export")),
        Stage("parity", stage_parity, needs=("data", "evaluate")),
        Stage("latency", stage_latency, needs=("evaluate",)),
        Stage("card", stage_card),
        Stage("evidence", stage_evidence),
    ),
)


# ---------------------------------------------------------------------------------------------- CLI


def recipes() -> dict[str, RecipeConfig]:
    """The recipes this CLI runs, by ``--model`` choice."""
    from training.recipes.model_3d import RECIPE_3D

    return {"2.5d": RECIPE, "3d": RECIPE_3D}


def _command(args: argparse.Namespace) -> str:
    """The reproducing command: only the options that change the result (not --work-dir / --workers)."""
    result_args = ["--out", str(args.out)]
    if args.evidence_only:
        result_args += ["--model", args.model, "--evidence-only"] + (["--tiny"] if args.tiny else [])
    else:
        result_args += ["--model", args.model] if args.model != "2.5d" else []
        result_args += ["--tiny"] if args.tiny else []
        result_args += ["--seed-offset", str(args.seed_offset)] if args.seed_offset else []
    return shlex.join(["python", "-m", "training.recipes.default_models", *result_args])


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``python -m training.recipes.default_models [--model 2.5d|3d] [--tiny] [--out DIR]``."""
    args_list = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m training.recipes.default_models", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("models"), help="Models root; writes OUT/<model name>.")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="Training logs/checkpoints and the stage record (default: a temp dir).")
    p.add_argument("--tiny", action="store_true", help="Same code path on tiny data, 1 epoch (for tests).")
    p.add_argument("--seed-offset", type=int, default=0, help="Shift every split's seed range.")
    p.add_argument("--workers", type=int, default=None, help="Processes rendering phantoms (default 2; 3d: 1).")
    p.add_argument("--model", choices=("2.5d", "3d"), default="2.5d",
                   help="Which shipped model: 2.5d (nodule-2p5d-int8) or 3d (nodule-3d-cbam).")
    p.add_argument("--threads", type=int, default=2, help="TensorFlow / LiteRT threads.")
    p.add_argument("--only", action="append", default=None, metavar="STAGE", help="Run only this stage (repeatable).")
    p.add_argument("--skip", action="append", default=[], metavar="STAGE", help="Skip this stage (repeatable).")
    p.add_argument("--resume", action="store_true",
                   help="Skip the stages a previous run in --work-dir finished (same recipe, size, seed offset).")
    p.add_argument("--evidence-only", action="store_true",
                   help="No training: re-score the built model in OUT (locked test range, shift sets, baselines, "
                        "per-artifact thresholds) and regenerate evaluation.json, manifest metrics and the card.")
    p.add_argument("--card-only", action="store_true", help="Only re-render MODEL_CARD.md from evaluation.json.")
    p.add_argument("--baseline-cache", type=Path, default=None,
                   help="JSON file caching the model-free baseline scores between the two models' evidence runs.")
    args = p.parse_args(args_list)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = recipes()[args.model]
    only = ["evidence"] if args.evidence_only else ["card"] if args.card_only else args.only
    workers = args.workers or (1 if args.model == "3d" else default_workers())

    def go(work: Path) -> None:
        run = RecipeRun(recipe, args.out, work, size_name="tiny" if args.tiny else "full",
                        seed_offset=args.seed_offset, workers=workers, threads=args.threads, command=_command(args),
                        options={"baseline_cache": args.baseline_cache})
        run_recipe(run, only=only, skip=args.skip, resume=args.resume)

    if args.work_dir is not None:
        go(args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="medclf-recipe-") as tmp:
            go(Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["FULL", "RECIPE", "SPEC", "TINY", "RecipeSize", "main", "manifest_2p5d", "recipes"]
