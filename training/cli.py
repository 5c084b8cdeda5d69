"""`medclf-train` command line: the only place in the training package that reads argv.

Each subcommand is a ``cmd_<name>(args) -> int`` registered in :data:`COMMANDS` with an
argument builder in :data:`ARGUMENTS`; the work lives in library modules.  TensorFlow is
imported only by the subcommands that need it.  To add a subcommand, add one entry to each.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], int]


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _shape(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.lower().replace("x", ",").split(",") if p]
    if len(parts) != 3 or min(parts) < 8:
        raise argparse.ArgumentTypeError("shape is Z,Y,X (or ZxYxX), each >= 8, e.g. 64x128x128")
    return (parts[0], parts[1], parts[2])


# --------------------------------------------------------------------------- synth


def _args_synth(p: argparse.ArgumentParser) -> None:
    from medclf_node.synthetic.dicom_writer import TRANSFER_SYNTAXES

    p.add_argument("out_dir", type=Path, help="output folder (one sub-folder per patient)")
    p.add_argument("-n", "--count", type=int, default=20, help="number of phantoms (default 20)")
    p.add_argument("--seed", type=int, default=0, help="first seed; phantom i uses seed+i (default 0)")
    p.add_argument("--shape", type=_shape, default=(64, 128, 128), help="Z,Y,X voxels (default 64x128x128)")
    p.add_argument("--spacing-jitter", type=float, default=0.15, help="relative spacing variation (default 0.15)")
    p.add_argument(
        "--positive-fraction", type=float, default=None, help="exact share of positive phantoms (default: ~half)"
    )
    p.add_argument(
        "--transfer-syntax", choices=sorted(TRANSFER_SYNTAXES), default="explicit", help="encoding (default explicit)"
    )


def cmd_synth(args: argparse.Namespace) -> int:
    """Write synthetic CT phantoms as DICOM series with ground-truth sidecars."""
    from tqdm import tqdm

    from medclf_node.synthetic.dicom_writer import TRANSFER_SYNTAXES
    from training.data.synth import iter_synthesize, write_index

    cases = list(
        tqdm(
            iter_synthesize(
                args.out_dir,
                args.count,
                seed=args.seed,
                shape=args.shape,
                spacing_jitter=args.spacing_jitter,
                positive_fraction=args.positive_fraction,
                transfer_syntax=TRANSFER_SYNTAXES[args.transfer_syntax],
            ),
            total=args.count,
            unit="series",
            desc="synth",
            disable=None,  # a bar only when stderr is a terminal
        )
    )
    index = write_index(args.out_dir, cases)
    pos = sum(c.label for c in cases)
    print(f"wrote {len(cases)} series ({pos} positive, {len(cases) - pos} negative) to {args.out_dir}; index {index}")
    return 0


# --------------------------------------------------------------------------- convert


def _args_convert(p: argparse.ArgumentParser) -> None:
    from training.data.readers import FORMATS

    p.add_argument("input", type=Path, help="folder of cases")
    p.add_argument("out_dir", type=Path, help="folder for TFRecord shards and dataset.json")
    p.add_argument("--config", type=Path, required=True, help="TOML with [preprocess] and optional [convert]")
    p.add_argument("--format", choices=FORMATS, default="dicom", help="input format (default dicom)")
    p.add_argument("--annotations", type=Path, default=None,
                   help="LUNA16 annotations.csv (default: INPUT/annotations.csv when it exists)")
    p.add_argument("--candidates", type=Path, default=None,
                   help="LUNA16 candidates.csv (default: INPUT/candidates.csv when it exists)")
    p.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="labels.csv: NIfTI (file,patient_id,label) or DICOM (series_instance_uid or patient_id, label)",
    )
    p.add_argument("--shards", type=int, default=None, help="override convert.shards")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a bar when stderr is a terminal)")


def _luna16_csv(given: Path | None, root: Path, name: str) -> Path | None:
    """An explicit CSV, else ``root/name`` of a LUNA16 download when it is there (the challenge's layout)."""
    if given is not None:
        return given
    found = root / name
    if found.is_file():
        log.info("convert: using %s", found)
        return found
    return None


def cmd_convert(args: argparse.Namespace) -> int:
    """Preprocess cases with the node's preprocess module into patient-grouped TFRecord shards."""
    from training.data.config import load_convert_config
    from training.data.convert import convert
    from training.data.readers import iter_cases

    cfg = load_convert_config(args.config)
    if args.shards is not None:
        cfg = cfg.model_copy(update={"convert": cfg.convert.model_copy(update={"shards": args.shards})})
    annotations, candidates, total = args.annotations, args.candidates, None
    if args.format == "luna16":
        annotations = _luna16_csv(annotations, args.input, "annotations.csv")
        candidates = _luna16_csv(candidates, args.input, "candidates.csv")
        total = sum(1 for _ in args.input.rglob("*.mhd"))
    cases = iter_cases(
        args.format,
        args.input,
        annotations_csv=annotations,
        candidates_csv=candidates,
        labels_csv=args.labels,
    )
    summary = convert(cases, args.out_dir, cfg, total=total, progress=False if args.no_progress else None)
    print(json.dumps(summary["totals"], indent=1))
    return 0


# --------------------------------------------------------------------------- split


def _args_split(p: argparse.ArgumentParser) -> None:
    p.add_argument("tfrecord_dir", type=Path, help="folder written by `convert` (reads dataset.json)")
    p.add_argument("--by", choices=["stratified", "luna16-subset"], default="stratified",
                   help="stratified: shuffled, label-stratified k folds + test share (default); luna16-subset: the "
                   "LUNA16 challenge's folds, fold k = the scans of subsetk (-k, --test-fraction, --seed unused)")
    p.add_argument("-k", "--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of patients held out (default 0.2)")
    p.add_argument("--test-subsets", type=int, nargs="*", default=[], metavar="N",
                   help="luna16-subset: subsets held out as the test split (default none: all ten are folds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="splits file (default <tfrecord_dir>/splits.json)")


def cmd_split(args: argparse.Namespace) -> int:
    """Patient-level split of a converted dataset: stratified k-fold + test, or the LUNA16 subset folds."""
    from training.data.splits import (
        SPLITS_FILENAME,
        luna16_subset_splits,
        make_splits,
        patient_labels_from_summary,
    )

    summary = args.tfrecord_dir / "dataset.json"
    labels = patient_labels_from_summary(summary)
    if args.by == "luna16-subset":
        splits = luna16_subset_splits(summary, test_subsets=args.test_subsets)
    else:
        splits = make_splits(labels, k=args.folds, test_fraction=args.test_fraction, seed=args.seed)
    out = splits.save(args.out or args.tfrecord_dir / SPLITS_FILENAME)
    pos = sum(labels[p] for p in splits.test)
    held = f" [{', '.join(splits.test_names)}]" if splits.test_names else ""
    print(f"test: {len(splits.test)} patients ({pos} positive){held}")
    for i, f in enumerate(splits.folds):
        name = f" [{splits.fold_names[i]}]" if splits.fold_names else ""
        print(f"fold {i}: {len(f)} patients ({sum(labels[p] for p in f)} positive){name}")
    print(f"wrote {out}")
    return 0


COMMANDS: dict[str, tuple[Command, str]] = {
    "synth": (cmd_synth, "write synthetic CT phantoms as DICOM series + ground truth"),
    "convert": (cmd_convert, "cases -> preprocessed, patient-grouped TFRecord shards"),
    "split": (cmd_split, "patient-level split: stratified k-fold + test, or the LUNA16 subset folds"),
}

ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "synth": _args_synth,
    "convert": _args_convert,
    "split": _args_split,
}


# Model commands (train / cv / evaluate / export) live in training/commands_model.py.
from training import commands_model as _model_commands  # noqa: E402

COMMANDS.update(_model_commands.COMMANDS)
ARGUMENTS.update(_model_commands.ARGUMENTS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medclf-train", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=func.__doc__)
        p.set_defaults(func=func)
        extra = ARGUMENTS.get(name)
        if extra is not None:
            extra(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    from training.data.config import ConvertConfigError
    from training.data.splits import LeakageError, SplitsError

    try:
        return int(args.func(args))
    except (ConvertConfigError, LeakageError, SplitsError, FileNotFoundError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
