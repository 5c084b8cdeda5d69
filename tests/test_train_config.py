"""The experiment file drives augmentation of the training pipeline."""

from __future__ import annotations

import pytest

from training.train_config import TrainConfigError, parse_train_config

PRE = {"mode": "2.5d", "windows": [{"center": -600, "width": 1500}], "input_shape": [64, 64], "context_slices": 1}


def test_augmentation_is_on_by_default_and_configurable() -> None:
    default = parse_train_config({"preprocess": PRE})
    assert default.data.augment is not None and default.data.augment.elastic_alpha > 0
    cfg = parse_train_config({"preprocess": PRE, "data": {"augment": {"rotate_deg": 5, "elastic_alpha": 0}}})
    assert cfg.data.augment is not None
    assert cfg.data.augment.rotate_deg == 5 and cfg.data.augment.elastic_alpha == 0


def test_unknown_augmentation_key_names_the_key() -> None:
    with pytest.raises(TrainConfigError, match="augment"):
        parse_train_config({"preprocess": PRE, "data": {"augment": {"rotate": 5}}})
