"""The commented example experiment shipped in training/examples/ is valid for every command, and the
README's training section shows exactly that file."""

from __future__ import annotations

import re
from pathlib import Path

from training.data.config import load_convert_config
from training.train_config import load_train_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "training" / "examples" / "experiment.toml"


def test_example_experiment_validates_with_the_real_loaders() -> None:
    cfg = load_train_config(EXAMPLE)
    assert cfg.preprocess.mode == "2.5d" and cfg.pipeline.source == "synth"
    assert cfg.data.tfrecord_dir == (EXAMPLE.parent / "work" / "tfr").resolve()
    assert cfg.data.augment is not None and cfg.data.augment.rotate_deg == 10.0
    conv = load_convert_config(EXAMPLE)
    assert conv.preprocess == cfg.preprocess and conv.convert.samples.negative_slice_stride == 2


def test_readme_shows_the_shipped_example() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    assert EXAMPLE.read_text(encoding="utf-8") in blocks
