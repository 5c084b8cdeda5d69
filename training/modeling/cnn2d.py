"""Small 2D / 2.5D CNN: fast to train on CPU and fully int8-quantizable (Conv2D, BN, ReLU, Dense)."""

from __future__ import annotations

import logging

from training.modeling.common import conv_bn_relu, global_pool, model_head, num_stages
from training.modeling.config import ModelConfig
from training.tfenv import keras

log = logging.getLogger(__name__)


def build_cnn2d(input_shape: tuple[int, int, int], cfg: ModelConfig) -> keras.Model:
    """Stages of (stride-2 conv, conv), filters doubling per stage, global average pooling."""
    inputs = keras.Input(shape=input_shape, name="image")
    stages = num_stages(input_shape[:2], cfg.min_feature_size, cfg.max_stages)
    x = conv_bn_relu(inputs, cfg.base_filters, 3, 1, "stem")
    for i in range(stages):
        filters = cfg.base_filters * 2 ** (i + 1)
        x = conv_bn_relu(x, filters, 3, 2, f"stage{i}_down")
        x = conv_bn_relu(x, filters, 3, 1, f"stage{i}_conv")
    x = global_pool(x, cfg.head_pooling, dims=2)
    outputs = model_head(x, cfg)
    log.debug("cnn2d: %d stages for input %s", stages, input_shape)
    return keras.Model(inputs, outputs, name="cnn2d")
