"""3D CNN with CBAM (convolutional block attention: channel, then spatial).

Downsampling uses stride-2 Conv3D only: TFLite has no MaxPool3D/AvgPool3D builtin, so a pooled net
would not convert.  Channel counts follow the input: the number of stages comes from the smallest
spatial size and filters double per stage from ``base_filters``; the attention MLP width is the
stage's channel count divided by the reduction ratio.
"""

from __future__ import annotations

import logging
from typing import Any

from training.modeling.common import conv_bn_relu, global_pool, layers, model_head, num_stages
from training.modeling.config import ModelConfig
from training.tfenv import keras, tf

log = logging.getLogger(__name__)


@keras.utils.register_keras_serializable(package="medclf")
class ChannelPool(layers.Layer):
    """Mean and max over the channel axis, concatenated: the input of CBAM's spatial attention."""

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        mean = tf.reduce_mean(inputs, axis=-1, keepdims=True)
        peak = tf.reduce_max(inputs, axis=-1, keepdims=True)
        return tf.concat([mean, peak], axis=-1)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return tuple(input_shape[:-1]) + (2,)


def cbam_block(x: tf.Tensor, reduction: int, name: str) -> tf.Tensor:
    """Channel attention (shared MLP over global avg and max) then spatial attention (7^3 conv)."""
    channels = int(x.shape[-1])
    hidden = max(1, channels // reduction)
    mlp_in = layers.Dense(hidden, activation="relu", name=f"{name}_mlp1")
    mlp_out = layers.Dense(channels, name=f"{name}_mlp2")
    avg = mlp_out(mlp_in(layers.GlobalAveragePooling3D(name=f"{name}_gap")(x)))
    peak = mlp_out(mlp_in(layers.GlobalMaxPooling3D(name=f"{name}_gmp")(x)))
    att = layers.Activation("sigmoid", name=f"{name}_ch_sigmoid")(layers.Add(name=f"{name}_ch_add")([avg, peak]))
    att = layers.Reshape((1, 1, 1, channels), name=f"{name}_ch_reshape")(att)
    x = layers.Multiply(name=f"{name}_ch_mul")([x, att])
    pooled = ChannelPool(name=f"{name}_chpool")(x)
    spatial = layers.Conv3D(1, 7, padding="same", activation="sigmoid", name=f"{name}_sp_conv")(pooled)
    return layers.Multiply(name=f"{name}_sp_mul")([x, spatial])


def build_cnn3d_cbam(input_shape: tuple[int, int, int, int], cfg: ModelConfig) -> keras.Model:
    """Stem conv, then per stage: stride-2 conv, conv, CBAM; global pooling (``head_pooling``); sigmoid.

    The first ``inplane_stages`` stages (and the stem) use 1x3x3 kernels and 1x2x2 strides.
    """
    inputs = keras.Input(shape=input_shape, name="volume")
    stages = num_stages(input_shape[:3], cfg.min_feature_size, cfg.max_stages)
    inplane = min(cfg.inplane_stages, stages)
    x = conv_bn_relu(inputs, cfg.base_filters, (1, 3, 3) if inplane else 3, 1, "stem", dims=3)
    for i in range(stages):
        filters = cfg.base_filters * 2 ** (i + 1)
        kernel, stride = ((1, 3, 3), (1, 2, 2)) if i < inplane else (3, 2)
        x = conv_bn_relu(x, filters, kernel, stride, f"stage{i}_down", dims=3)
        x = conv_bn_relu(x, filters, kernel, 1, f"stage{i}_conv", dims=3)
        x = cbam_block(x, cfg.cbam_reduction, f"stage{i}_cbam")
    x = global_pool(x, cfg.head_pooling, dims=3)
    outputs = model_head(x, cfg)
    log.debug("cnn3d_cbam: %d stages for input %s", stages, input_shape)
    return keras.Model(inputs, outputs, name="cnn3d_cbam")
