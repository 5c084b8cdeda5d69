"""Building blocks shared by the model families."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from training.modeling.config import ModelConfig
from training.tfenv import keras, tf

log = logging.getLogger(__name__)
layers = keras.layers


def classification_head(x: tf.Tensor, dropout: float, name: str = "head", *, kind: str = "binary",
                        classes: int = 1) -> tf.Tensor:
    """Dropout + the output layer, computed in float32 even under a mixed-precision policy.

    ``kind``: ``binary`` one sigmoid unit; ``multilabel`` ``classes`` independent sigmoid units;
    ``softmax`` ``classes`` softmax units; ``ordinal`` one score through ordered cut-points to
    ``classes`` probabilities (cumulative-link, :mod:`training.modeling.ordinal`).  A float32 output
    keeps the loss and probabilities numerically sane with bf16/fp16 bodies and gives the exported
    models a float32 output tensor.
    """
    if dropout > 0:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    if kind == "ordinal":
        from training.modeling.ordinal import OrdinalProbabilities

        score = layers.Dense(1, name=f"{name}_logit", dtype="float32")(x)
        return OrdinalProbabilities(classes, name="probability", dtype="float32")(score)
    units = 1 if kind == "binary" else classes
    x = layers.Dense(units, name=f"{name}_logit", dtype="float32")(x)
    act = "softmax" if kind == "softmax" else "sigmoid"
    return layers.Activation(act, name="probability", dtype="float32")(x)


def model_head(x: tf.Tensor, cfg: ModelConfig) -> tf.Tensor:
    """:func:`classification_head` as ``cfg`` (``head``, ``classes``, ``dropout``) asks."""
    return classification_head(x, cfg.dropout, kind=cfg.head, classes=cfg.classes)


def global_pool(x: tf.Tensor, pooling: str, dims: int, name: str = "gap") -> tf.Tensor:
    """Global average or max pooling over the spatial axes.

    Average pooling suits findings that fill the field; max pooling suits small objects (a nodule is
    one position of a 12 x 12 feature map: an average dilutes it ~100x, a max passes it and its
    gradient through unchanged, like multiple-instance learning).
    """
    if pooling == "max":
        pool = layers.GlobalMaxPooling2D if dims == 2 else layers.GlobalMaxPooling3D
        return pool(name=name.replace("gap", "gmp"))(x)
    pool = layers.GlobalAveragePooling2D if dims == 2 else layers.GlobalAveragePooling3D
    return pool(name=name)(x)


def num_stages(spatial: Sequence[int], min_feature_size: int, max_stages: int) -> int:
    """How many stride-2 stages fit before the smallest spatial size drops to ``min_feature_size``."""
    smallest = min(spatial)
    if smallest <= min_feature_size:
        return 1
    return max(1, min(max_stages, int(math.floor(math.log2(smallest / min_feature_size)))))


def conv_bn_relu(
    x: tf.Tensor,
    filters: int,
    kernel: int | tuple[int, ...],
    strides: int | tuple[int, ...],
    name: str,
    dims: int = 2,
) -> tf.Tensor:
    """Conv (no bias) -> BatchNorm -> ReLU; the pattern every converter and tfmot fold cleanly."""
    conv = layers.Conv2D if dims == 2 else layers.Conv3D
    x = conv(filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)
