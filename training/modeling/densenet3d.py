"""3D DenseNet (DenseNet-121 layout by default) with a growth-rate setting and no 3D pooling.

Where DenseNet uses max pooling after the stem and average pooling in transitions, this version uses
stride-2 Conv3D (TFLite has no 3D pooling builtins), so it converts for fp32/fp16 LiteRT.
"""

from __future__ import annotations

import logging

from training.modeling.common import global_pool, layers, model_head
from training.modeling.config import ModelConfig
from training.tfenv import keras, tf

log = logging.getLogger(__name__)


def _bn_relu(x: tf.Tensor, name: str) -> tf.Tensor:
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _dense_layer(x: tf.Tensor, growth: int, name: str) -> tf.Tensor:
    """BN-ReLU-Conv1 (4k bottleneck) - BN-ReLU-Conv3 (k), concatenated onto the input."""
    y = _bn_relu(x, f"{name}_1")
    y = layers.Conv3D(4 * growth, 1, use_bias=False, name=f"{name}_1_conv")(y)
    y = _bn_relu(y, f"{name}_2")
    y = layers.Conv3D(growth, 3, padding="same", use_bias=False, name=f"{name}_2_conv")(y)
    return layers.Concatenate(name=f"{name}_concat")([x, y])


def _transition(x: tf.Tensor, compression: float, name: str) -> tf.Tensor:
    """BN-ReLU-Conv1 (compress channels) then a 2x2x2 stride-2 conv in place of average pooling."""
    channels = max(1, int(int(x.shape[-1]) * compression))
    x = _bn_relu(x, name)
    x = layers.Conv3D(channels, 1, use_bias=False, name=f"{name}_conv")(x)
    return layers.Conv3D(channels, 2, strides=2, padding="same", use_bias=False, name=f"{name}_down")(x)


def build_densenet3d(input_shape: tuple[int, int, int, int], cfg: ModelConfig) -> keras.Model:
    """Stem (7^3 stride 2, then 3^3 stride 2), dense blocks with transitions, BN-ReLU, GAP, sigmoid."""
    k = cfg.growth_rate
    inputs = keras.Input(shape=input_shape, name="volume")
    x = layers.Conv3D(2 * k, 7, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = _bn_relu(x, "stem")
    x = layers.Conv3D(2 * k, 3, strides=2, padding="same", use_bias=False, name="stem_down")(x)
    for b, n_layers in enumerate(cfg.block_config):
        for i in range(n_layers):
            x = _dense_layer(x, k, f"block{b}_layer{i}")
        if b != len(cfg.block_config) - 1:
            x = _transition(x, cfg.compression, f"transition{b}")
    x = _bn_relu(x, "final")
    x = global_pool(x, cfg.head_pooling, dims=3)
    outputs = model_head(x, cfg)
    return keras.Model(inputs, outputs, name="densenet3d")
