# ruff: noqa: T201  (a CLI module: printing results is its job, like training/cli.py)
"""`medclf-train train | cv | evaluate | export`: argument parsing and wiring, registered in training/cli.py.

Data comes from ``convert``'s TFRecord shards (``[data] tfrecord_dir`` of the experiment TOML) and
``split``'s ``splits.json`` there.  Runs live in ``output_dir/name/fold-K``; the test patients are
never used by ``train``/``cv`` and the operating threshold is chosen on the run's validation fold.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], int]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="experiment TOML (model, preprocess, data, fit...)")
    p.add_argument("--fold", type=int, default=0, help="validation fold (default 0); the test split is never used")


def _load(args: argparse.Namespace) -> Any:
    from training.train_config import load_train_config

    cfg = load_train_config(args.config)
    updates: dict[str, Any] = {}
    fit_upd = {k: v for k, v in (("precision", getattr(args, "precision", None)),
                                 ("epochs", getattr(args, "epochs", None))) if v is not None}
    if fit_upd:
        updates["fit"] = cfg.fit.model_copy(update=fit_upd)
    return cfg.model_copy(update=updates) if updates else cfg


def _load_training(args: argparse.Namespace) -> Any:
    """The config, with the distribution strategy created before any TensorFlow op (TF_CONFIG workers need it)."""
    from training.train import strategy_from_env

    cfg = _load(args)
    strategy_from_env(cfg.fit.strategy)
    return cfg


def _splits(cfg: Any) -> tuple[Path, Any]:
    from training.data.splits import SPLITS_FILENAME, Splits

    d = cfg.data.tfrecord_dir
    if d is None:
        raise FileNotFoundError("[data] tfrecord_dir is not set in the config; run `medclf-train convert` first")
    path = Path(d) / SPLITS_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `medclf-train split {d}` first")
    return Path(d), Splits.load(path)


DETERMINISM = ("data", "ops", "off")


def _add_determinism(p: argparse.ArgumentParser) -> None:
    p.add_argument("--determinism", choices=DETERMINISM, default="data",
                   help="data (default): the same config, seed and data give the same weights and fold results on "
                   "CPU (training augmentation runs on one tf.data thread); ops: also TensorFlow's deterministic "
                   "kernels (GPU; slower); off: multi-threaded augmentation, results may differ between runs")


def _apply_determinism(mode: str) -> None:
    """``ops``: tf.config.experimental.enable_op_determinism() (process-wide, before any model is built)."""
    if mode == "ops":
        from training.tfenv import tf

        tf.config.experimental.enable_op_determinism()
        log.info("determinism: TensorFlow op determinism enabled")


def _fold_data(cfg: Any, fold: int, determinism: str = "data") -> tuple[Any, Any, Any]:
    """(train Split, validation Split, the pipeline's batched+shuffled training dataset) of one fold.

    Unless ``determinism`` is 'off' the training dataset runs its maps on a private one-thread pool:
    with TensorFlow's shared pools the augmentation (warp, then the contrast mean) of an example now
    and then differed in the last bit between processes (measured 2026-12-02, TF 2.21, 2 cores), and
    the training amplified that into different weights and fold AUCs.
    """
    from training.data.pipeline import make_dataset
    from training.tfenv import tf
    from training.train import Split

    d, splits = _splits(cfg)
    train_p, val_p = splits.fold(fold)
    train_ds, _ = make_dataset(d, patients=train_p, batch_size=cfg.fit.batch_size, training=True,
                               seed=cfg.fit.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                               augment_cfg=cfg.data.augment, balance=cfg.data.balance)
    if determinism != "off":
        options = tf.data.Options()
        options.threading.private_threadpool_size = 1
        train_ds = train_ds.with_options(options)
    return Split.from_tfrecords(d, train_p), Split.from_tfrecords(d, val_p), train_ds


def _run_dir(cfg: Any, args: argparse.Namespace) -> Path:
    run = getattr(args, "run", None)
    return Path(run) if run is not None else Path(cfg.run_dir) / f"fold-{args.fold}"


# --------------------------------------------------------------------------- train


def _args_train(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--precision", choices=["auto", "float32", "mixed_bfloat16", "mixed_float16"], default=None,
                   help="override fit.precision")
    p.add_argument("--epochs", type=int, default=None, help="override fit.epochs")
    _add_determinism(p)


def train_fold(cfg: Any, fold: int, run: Path, determinism: str = "data") -> Any:
    """Fit the model of ``fold`` into ``run`` from the TFRecords; returns the TrainResult."""
    from training.tfenv import keras
    from training.train import fit

    keras.utils.set_random_seed(cfg.fit.seed)  # before the data, as cross_validate does for each fold
    train, val, train_ds = _fold_data(cfg, fold, determinism)
    return fit(cfg, train, val, run, train_ds)


def cmd_train(args: argparse.Namespace) -> int:
    """Train one model on the development folds except --fold, validating on --fold."""
    cfg = _load_training(args)
    _apply_determinism(args.determinism)
    res = train_fold(cfg, args.fold, _run_dir(cfg, args), args.determinism)
    print(json.dumps({"run_dir": str(res.run_dir), "best_val_auc": res.best_val_auc, "epochs": res.epochs_run}))
    return 0


# --------------------------------------------------------------------------- cv


def _args_cv(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="experiment TOML")
    p.add_argument("--precision", choices=["auto", "float32", "mixed_bfloat16", "mixed_float16"], default=None)
    p.add_argument("--epochs", type=int, default=None, help="override fit.epochs")
    p.add_argument("--resume", action="store_true",
                   help="keep folds finished by an earlier run of the same config (fit_result.json + cv_row.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar over the folds")
    _add_determinism(p)


def cmd_cv(args: argparse.Namespace) -> int:
    """k-fold cross-validation over the development patients: per-fold and mean +- sd validation AUC."""
    from training.train import cross_validate

    cfg = _load_training(args)
    _, splits = _splits(cfg)
    _apply_determinism(args.determinism)
    summary = cross_validate(cfg, lambda k: _fold_data(cfg, k, args.determinism), splits.k, resume=args.resume,
                             progress=False if args.no_progress else None)
    for row in summary["folds"]:
        print(f"fold {row['fold']}: validation AUC {row['val_auc']:.4f} ({row['n_val']} samples)")
    print(f"mean {summary['val_auc_mean']:.4f} +- {summary['val_auc_sd']:.4f} (sd over {splits.k} folds)")
    return 0


# --------------------------------------------------------------------------- evaluate


def _args_evaluate(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--run", type=Path, default=None, help="run directory (default output_dir/name/fold-K)")


def evaluate_run(cfg: Any, fold: int, run: Path) -> dict[str, Any]:
    """Threshold on validation fold ``fold``, metrics on the test split; writes ``run/evaluation``."""
    from training.data.splits import SplitsError
    from training.evaluate import evaluate_scores
    from training.train import Split, load_trained_model, predict_split

    d, splits = _splits(cfg)
    if not splits.test:
        raise SplitsError(f"{d / 'splits.json'} holds no test patients (a LUNA16 subset split without "
                          "--test-subsets): nothing to evaluate; `split --by luna16-subset --test-subsets 9` "
                          "holds one out")
    model = load_trained_model(run)
    _, val_p = splits.fold(fold)
    parts = []
    for patients in (val_p, splits.test):
        split = Split.from_tfrecords(d, patients)
        parts.append((split.series_ids, split.labels, predict_split(model, split)))
    ev = cfg.evaluate
    return evaluate_scores(parts[0], parts[1], None if cfg.preprocess.mode == "3d" else ev.aggregation,
                           run / "evaluation", threshold_rule=ev.threshold_rule,
                           target_sensitivity=ev.target_sensitivity, n_boot=ev.bootstrap, bins=ev.calibration_bins)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Threshold on the validation fold, metrics + plots on the test split; writes RUN/evaluation/."""
    cfg = _load(args)
    run = _run_dir(cfg, args)
    report = evaluate_run(cfg, args.fold, run)
    t = report["test_series"]
    print(f"test AUC {t['auc']:.4f} (95% CI {t['auc_ci95'][0]:.4f}-{t['auc_ci95'][1]:.4f}); "
          f"sensitivity {t['confusion']['sensitivity']:.3f}, specificity {t['confusion']['specificity']:.3f} "
          f"at threshold {report['threshold']:.4f} (chosen on validation); report {run / 'evaluation'}")
    return 0


# --------------------------------------------------------------------------- export


def _args_export(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--run", type=Path, default=None, help="run directory (default output_dir/name/fold-K)")
    p.add_argument("--out", type=Path, required=True, help="model directory to write (e.g. models/<name>)")
    p.add_argument("--modes", nargs="+", default=None,
                   help="subset of saved_model fp32 fp16 dynamic int8 qat_int8 (default: export.modes)")
    p.add_argument("--default", default=None, help="artifact mode the node serves (default: export.default)")


def export_run(cfg: Any, fold: int, run: Path, out: Path, modes: tuple[str, ...] | None = None,
               default: str | None = None) -> Any:
    """Export ``run`` to ``out`` with the threshold/metrics of its evaluation report; returns ExportResult."""
    from training.export.bundle import export_model
    from training.export.tflite import ExportError
    from training.train import Split, load_trained_model

    report_path = run / "evaluation" / "report.json"
    if not report_path.is_file():
        raise ExportError(f"{report_path} not found: run `medclf-train evaluate` first (the threshold is chosen "
                          "on validation there)")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    t = report["test_series"]
    metrics = {"test_auc": t["auc"], "test_auc_ci95_low": t["auc_ci95"][0], "test_auc_ci95_high": t["auc_ci95"][1],
               "test_sensitivity": t["confusion"]["sensitivity"], "test_specificity": t["confusion"]["specificity"],
               "val_auc": report["validation_series"]["auc"], "test_brier": t["calibration"]["brier"]}
    d, splits = _splits(cfg)
    train_p, _ = splits.fold(fold)
    model = load_trained_model(run)
    return export_model(cfg, model, out, holdout=Split.from_tfrecords(d, splits.test),
                        train=Split.from_tfrecords(d, train_p), threshold=float(report["threshold"]),
                        metrics=metrics, modes=modes, default=default)


def cmd_export(args: argparse.Namespace) -> int:
    """SavedModel / TFLite artifacts + parity and AUC checks + manifest.json the node loads."""
    from training.export.bundle import ARTIFACT_NAMES

    bad = [m for m in (args.modes or []) if m not in ARTIFACT_NAMES]
    if bad:
        print(f"unknown export mode(s) {bad}; choose from {list(ARTIFACT_NAMES)}", file=sys.stderr)
        return 2
    cfg = _load(args)
    result = export_run(cfg, args.fold, _run_dir(cfg, args), args.out,
                        tuple(args.modes) if args.modes else None, args.default)
    _print_checks(result)
    return 0 if result.ok else 1


def _print_checks(result: Any) -> None:
    for mode, c in result.checks.items():
        stat = c.get("tolerance_statistic", "max")
        measured = c.get(f"{stat}_abs_diff_vs_keras", c["max_abs_diff_vs_keras"])
        print(f"{mode}: {stat} |tflite - keras| {measured:.2e} (tol {c['tolerance']:.0e}"
              f"{', max ' + format(c['max_abs_diff_vs_keras'], '.2e') if stat != 'max' else ''}) "
              f"{'ok' if c['ok'] else 'FAIL'}; test AUC {c['holdout_auc']:.4f} "
              f"(delta vs fp32 {c['auc_delta_vs_fp32_keras']:+.4f}); {c['size_bytes'] / 1024:.0f} kB")
    print(f"wrote {result.model_dir}")


# --------------------------------------------------------------------------- pipeline


def _args_pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="experiment TOML (with an optional [pipeline] table)")
    p.add_argument("--force", action="store_true", help="redo every step instead of resuming")
    _add_determinism(p)


def _data_step(argv: list[str]) -> None:
    from training.cli import build_parser

    args = build_parser().parse_args(argv)
    rc = int(args.func(args))
    if rc != 0:
        raise RuntimeError(f"`medclf-train {' '.join(argv)}` failed with status {rc}")


def cmd_pipeline(args: argparse.Namespace) -> int:
    """synth (or read) -> convert -> split -> cv -> train -> evaluate -> export; finished steps are skipped.

    Resumable at every step and, inside cv, at the first unfinished fold (finished folds are kept,
    a partial one restarts cleanly).  LUNA16 (``source = "luna16"``): convert finds
    ``input_dir/annotations.csv`` and ``candidates.csv``; the split is the challenge's subset folds
    (fold k = subsetk) with the highest-numbered subset held out as the locked test split, so
    ``cv_folds`` and ``test_fraction`` are not used.
    """
    import shutil

    from training.data.splits import SPLITS_FILENAME, luna16_subset_of
    from training.train import DONE_FILE, _is_chief, cross_validate

    cfg = _load_training(args)
    _apply_determinism(args.determinism)
    pl = cfg.pipeline
    work = Path(pl.work_dir)
    tfr = Path(cfg.data.tfrecord_dir) if cfg.data.tfrecord_dir is not None else work / "tfr"
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"tfrecord_dir": tfr})})
    force = bool(args.force)

    def todo(marker: Path, step: str) -> bool:
        if marker.exists() and not force:
            log.info("pipeline: %s already done (%s), skipped", step, marker)
            return False
        log.info("pipeline: %s", step)
        return True

    if pl.source == "synth":
        cases = work / "dicom"
        if todo(cases / "synth_index.json", "synth"):
            _data_step(["synth", str(cases), "-n", str(pl.synth_count), "--seed", str(pl.synth_seed),
                        "--shape", "x".join(map(str, pl.synth_shape)),
                        *([] if pl.synth_positive_fraction is None
                          else ["--positive-fraction", str(pl.synth_positive_fraction)])])
    else:
        if pl.input_dir is None:
            raise FileNotFoundError("[pipeline] input_dir is required when source is not 'synth'")
        cases = Path(pl.input_dir)
    if todo(tfr / "dataset.json", "convert"):
        # no --no-progress: convert shows its bar only when stderr is a terminal
        _data_step(["convert", str(cases), str(tfr), "--config", str(args.config),
                    *([] if pl.source == "synth" else ["--format", pl.source])])
    if todo(tfr / SPLITS_FILENAME, "split"):
        if pl.source == "luna16":
            patients = json.loads((tfr / "dataset.json").read_text(encoding="utf-8"))["patients"]
            subsets = {luna16_subset_of(src) for info in patients.values() for src in info.get("sources", [])}
            last = max((s for s in subsets if s is not None), default=None)
            _data_step(["split", str(tfr), "--by", "luna16-subset",
                        *([] if last is None else ["--test-subsets", str(last)])])
        else:
            _data_step(["split", str(tfr), "-k", str(cfg.cv_folds), "--test-fraction", str(pl.test_fraction),
                        "--seed", str(cfg.fit.seed)])
    _, splits = _splits(cfg)
    if pl.run_cv and todo(Path(cfg.run_dir) / "cv.json", "cv"):
        summary = cross_validate(cfg, lambda k: _fold_data(cfg, k, args.determinism), splits.k, resume=not force)
        print(f"cv: validation AUC {summary['val_auc_mean']:.4f} +- {summary['val_auc_sd']:.4f}")
    run = Path(cfg.run_dir) / f"fold-{pl.fold}"
    if todo(run / DONE_FILE, f"train fold {pl.fold}"):
        if run.exists() and _is_chief():
            shutil.rmtree(run)  # a partial run from an interrupt: restart it cleanly
        train_fold(cfg, pl.fold, run, args.determinism)
    if todo(run / "evaluation" / "report.json", "evaluate"):
        evaluate_run(cfg, pl.fold, run)
    out = work / "model" / cfg.name
    result = None
    if todo(out / "manifest.json", "export"):
        result = export_run(cfg, pl.fold, run, out)
        _print_checks(result)
    print(f"pipeline done: model directory {out}")
    return 0 if result is None or result.ok else 1


def _reported(func: Command) -> Command:
    """Config and export errors become a message on stderr and exit status 2, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        from training.train_config import TrainConfigError

        try:
            return func(args)
        except TrainConfigError as exc:
            print(str(exc), file=sys.stderr)
            return 2
        except ValueError as exc:
            if type(exc).__name__ != "ExportError":
                raise
            print(f"export: {exc}", file=sys.stderr)
            return 2

    run.__doc__ = func.__doc__
    return run


COMMANDS: dict[str, tuple[Command, str]] = {
    "train": (_reported(cmd_train), "train one model (validation fold --fold)"),
    "cv": (_reported(cmd_cv), "k-fold cross-validation: per-fold and mean +- sd AUC"),
    "evaluate": (_reported(cmd_evaluate), "AUC + bootstrap CI, operating point, calibration, plots on the test split"),
    "export": (_reported(cmd_export), "SavedModel/TFLite artifacts, parity checks and the node's manifest"),
    "pipeline": (_reported(cmd_pipeline), "synth/read -> convert -> split -> cv -> train -> evaluate -> export"),
}

ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "train": _args_train,
    "cv": _args_cv,
    "evaluate": _args_evaluate,
    "export": _args_export,
    "pipeline": _args_pipeline,
}
