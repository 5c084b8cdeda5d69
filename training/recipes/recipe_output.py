"""What every shipped-model recipe writes beside its artifacts: ``evaluation.json`` and ``MODEL_CARD.md``.

Shared by the 2.5D (``default_models``) and 3D (``model_3d``) recipes, so both records have the
same split summary, the same JSON encoding and the same 10 MB check on every artifact.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from training.evaluate import json_default
from training.recipes.phantom_sets import SplitPlan

REPORT_FILE = "evaluation.json"
CARD_FILE = "MODEL_CARD.md"
MAX_MODEL_BYTES = 10 * 1024 * 1024


def split_summaries(plans: Mapping[str, SplitPlan]) -> dict[str, dict[str, Any]]:
    """Seed range, count, shapes and phantom parameters of each split (the card's data table)."""
    return {k: {"first_seed": p.first_seed, "count": p.count, "shapes": [list(s) for s in p.shapes],
                "spacing_jitter": p.spacing_jitter, "radius_range_mm": list(p.radius_range_mm)}
            for k, p in plans.items()}


def artifact_bytes(model_dir: Path, paths: Iterable[str]) -> dict[str, int]:
    """Size of each artifact: a file, or every file of a directory (a SavedModel)."""
    sizes = {}
    for name in paths:
        path = model_dir / name
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        sizes[name] = sum(p.stat().st_size for p in files)
    return sizes


def write_evaluation(model_dir: Path, report: Mapping[str, Any], card: str) -> None:
    """Write the evaluation record and the model card; refuse an artifact over 10 MB."""
    (model_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, default=json_default) + "\n", encoding="utf-8")
    (model_dir / CARD_FILE).write_text(card, encoding="utf-8")
    for name, n in report["artifact_bytes"].items():
        if n > MAX_MODEL_BYTES:
            raise RuntimeError(f"{name} is larger than 10 MB")


__all__ = ["CARD_FILE", "MAX_MODEL_BYTES", "REPORT_FILE", "artifact_bytes", "split_summaries",
           "write_evaluation"]
