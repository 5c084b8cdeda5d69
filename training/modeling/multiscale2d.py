"""Multi-scale 2D network: a full-resolution path and a 2x-downsampled path, fused feature-wise.

The downsampled path sees more context per filter; the full-resolution path keeps small detail.
Both reach the same feature-map size and are concatenated before the head.  2D average pooling is a
TFLite builtin, so the net converts to every TFLite mode.
"""

from __future__ import annotations

import logging

from training.modeling.common import conv_bn_relu, global_pool, layers, model_head, num_stages
from training.modeling.config import ModelConfig
from training.tfenv import keras

log = logging.getLogger(__name__)


def build_multiscale2d(input_shape: tuple[int, int, int], cfg: ModelConfig) -> keras.Model:
    """Full-res path with ``n`` stride-2 stages, half-res path with ``n - 1``; concat; conv; GAP."""
    rows, cols = input_shape[:2]
    stages = max(2, num_stages(input_shape[:2], cfg.min_feature_size, cfg.max_stages))
    factor = 2**stages
    if rows % factor or cols % factor:
        raise ValueError(
            f"multiscale2d needs input rows/cols divisible by {factor} so both paths align; got {rows}x{cols}"
        )
    inputs = keras.Input(shape=input_shape, name="image")
    full = conv_bn_relu(inputs, cfg.base_filters, 3, 1, "full_stem")
    for i in range(stages):
        full = conv_bn_relu(full, cfg.base_filters * 2 ** (i + 1), 3, 2, f"full_stage{i}")
    half = layers.AveragePooling2D(2, name="half_pool")(inputs)
    half = conv_bn_relu(half, cfg.base_filters, 5, 1, "half_stem")
    for i in range(stages - 1):
        half = conv_bn_relu(half, cfg.base_filters * 2 ** (i + 1), 5, 2, f"half_stage{i}")
    x = layers.Concatenate(name="fuse_concat")([full, half])
    x = conv_bn_relu(x, cfg.base_filters * 2**stages, 1, 1, "fuse")
    x = global_pool(x, cfg.head_pooling, dims=2)
    outputs = model_head(x, cfg)
    return keras.Model(inputs, outputs, name="multiscale2d")
