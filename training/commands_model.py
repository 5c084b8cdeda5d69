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


def _fold_data(cfg: Any, fold: int) -> tuple[Any, Any, Any]:
    """(train Split, validation Split, the pipeline's batched+shuffled training dataset) of one fold."""
    from training.data.pipeline import make_dataset
    from training.train import Split

    d, splits = _splits(cfg)
    train_p, val_p = splits.fold(fold)
    train_ds, _ = make_dataset(d, patients=train_p, batch_size=cfg.fit.batch_size, training=True,
                               seed=cfg.fit.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                               augment_cfg=cfg.data.augment, balance=cfg.data.balance)
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


def train_fold(cfg: Any, fold: int, run: Path) -> Any:
    """Fit the model of ``fold`` into ``run`` from the TFRecords; returns the TrainResult."""
    from training.train import fit

    train, val, train_ds = _fold_data(cfg, fold)
    return fit(cfg, train, val, run, train_ds)


def cmd_train(args: argparse.Namespace) -> int:
    """Train one model on the development folds except --fold, validating on --fold."""
    cfg = _load_training(args)
    res = train_fold(cfg, args.fold, _run_dir(cfg, args))
    print(json.dumps({"run_dir": str(res.run_dir), "best_val_auc": res.best_val_auc, "epochs": res.epochs_run}))
    return 0


# --------------------------------------------------------------------------- cv


def _args_cv(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="experiment TOML")
    p.add_argument("--precision", choices=["auto", "float32", "mixed_bfloat16", "mixed_float16"], default=None)
    p.add_argument("--epochs", type=int, default=None, help="override fit.epochs")


def cmd_cv(args: argparse.Namespace) -> int:
    """k-fold cross-validation over the development patients: per-fold and mean +- sd validation AUC."""
    from training.train import cross_validate

    cfg = _load_training(args)
    _, splits = _splits(cfg)
    summary = cross_validate(cfg, lambda k: _fold_data(cfg, k), splits.k)
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
    from training.evaluate import evaluate_scores
    from training.train import Split, load_trained_model, predict_split

    d, splits = _splits(cfg)
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
        print(f"{mode}: max |tflite - keras| {c['max_abs_diff_vs_keras']:.2e} (tol {c['tolerance']:.0e}) "
              f"{'ok' if c['ok'] else 'FAIL'}; test AUC {c['holdout_auc']:.4f} "
              f"(delta vs fp32 {c['auc_delta_vs_fp32_keras']:+.4f}); {c['size_bytes'] / 1024:.0f} kB")
    print(f"wrote {result.model_dir}")


# --------------------------------------------------------------------------- pipeline


def _args_pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="experiment TOML (with an optional [pipeline] table)")
    p.add_argument("--force", action="store_true", help="redo every step instead of resuming")


def _data_step(argv: list[str]) -> None:
    from training.cli import build_parser

    args = build_parser().parse_args(argv)
    rc = int(args.func(args))
    if rc != 0:
        raise RuntimeError(f"`medclf-train {' '.join(argv)}` failed with status {rc}")


def cmd_pipeline(args: argparse.Namespace) -> int:
    """synth (or read) -> convert -> split -> cv -> train -> evaluate -> export; finished steps are skipped."""
    from training.data.splits import SPLITS_FILENAME
    from training.train import DONE_FILE, cross_validate

    cfg = _load_training(args)
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
        _data_step(["convert", str(cases), str(tfr), "--config", str(args.config), "--no-progress",
                    *([] if pl.source == "synth" else ["--format", pl.source])])
    if todo(tfr / SPLITS_FILENAME, "split"):
        _data_step(["split", str(tfr), "-k", str(cfg.cv_folds), "--test-fraction", str(pl.test_fraction),
                    "--seed", str(cfg.fit.seed)])
    _, splits = _splits(cfg)
    if pl.run_cv and todo(Path(cfg.run_dir) / "cv.json", "cv"):
        summary = cross_validate(cfg, lambda k: _fold_data(cfg, k), splits.k)
        print(f"cv: validation AUC {summary['val_auc_mean']:.4f} +- {summary['val_auc_sd']:.4f}")
    run = Path(cfg.run_dir) / f"fold-{pl.fold}"
    if todo(run / DONE_FILE, f"train fold {pl.fold}"):
        train_fold(cfg, pl.fold, run)
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
