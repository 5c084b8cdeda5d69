"""Ordinal output for graded scales (e.g. DR 0-4): a cumulative-link (proportional-odds) head.

Why this form: a grade is ordered, so "grade 4 called 3" must cost less than "grade 4 called 0".
The head turns one learned score ``s`` into ``K - 1`` cumulative probabilities
``P(y > k) = sigmoid(s - theta_k)`` with cut-points ``theta_0 < theta_1 < ... < theta_{K-2}``
(ordered by construction: ``theta_k = theta_0 + sum softplus(delta)``), and emits the **class
probabilities** ``P(y = k) = P(y > k - 1) - P(y > k)``, which are non-negative and sum to 1.  Training
with categorical cross-entropy on these probabilities is maximum likelihood of the cumulative-link
model (the ordinal loss; CORAL's rank-consistent binary tasks with one shared score are the same
model).  Because the output is a plain probability vector, the node serves it like any multiclass
softmax; the decoding it reports is argmax, and :func:`expected_grade` gives the expected grade
(sum_k k P(y = k)) that the evaluation also scores.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from training.tfenv import keras, tf

log = logging.getLogger(__name__)


@keras.utils.register_keras_serializable(package="medclf")
class OrdinalProbabilities(keras.layers.Layer):
    """(batch, 1) score -> (batch, classes) probabilities through ordered learned cut-points."""

    def __init__(self, classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if classes < 3:
            raise ValueError("an ordinal head needs at least 3 classes")
        self.classes = int(classes)

    def build(self, input_shape: Any) -> None:
        k = self.classes - 1
        self.theta0 = self.add_weight(name="theta0", shape=(1,), initializer=keras.initializers.Constant(-1.0))
        # softplus(0.54) ~ 1: cut-points start one logit apart
        self.deltas = self.add_weight(name="deltas", shape=(k - 1,), initializer=keras.initializers.Constant(0.54))
        super().build(input_shape)

    def cutpoints(self) -> tf.Tensor:
        steps = tf.math.softplus(self.deltas)
        return tf.concat([self.theta0, self.theta0 + tf.cumsum(steps)], axis=0)

    def call(self, score: tf.Tensor) -> tf.Tensor:
        # Written as two constant matmuls + bias (FULLY_CONNECTED in TFLite) around a LOGISTIC so that
        # the int8 export keeps the whole head in float (training.export.tflite._HEAD_OPS); a concat of
        # differently scaled int8 tensors cannot be quantised.
        k = self.classes - 1
        s = tf.cast(score, tf.float32)
        z = tf.nn.bias_add(tf.matmul(s, tf.ones((1, k), tf.float32)), -self.cutpoints())
        above = tf.sigmoid(z)  # (B, K-1): P(y > k), decreasing in k
        # P(y = 0) = 1 - a_0, P(y = j) = a_{j-1} - a_j, P(y = K-1) = a_{K-2}
        diff = np.zeros((k, self.classes), np.float32)
        for j in range(k):
            diff[j, j] -= 1.0
            diff[j, j + 1] += 1.0
        first = np.zeros(self.classes, np.float32)
        first[0] = 1.0
        return tf.nn.bias_add(tf.matmul(above, tf.constant(diff)), tf.constant(first))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "classes": self.classes}


def ordinal_loss(y_true: tf.Tensor, y_prob: tf.Tensor) -> tf.Tensor:
    """Negative log-likelihood of integer grades ``y_true`` under the head's class probabilities."""
    y = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
    p = tf.gather(y_prob, y, axis=1, batch_dims=1)
    return -tf.math.log(tf.clip_by_value(p, 1e-7, 1.0))


def expected_grade(probs: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """sum_k k * P(y = k) per row."""
    p = np.asarray(probs, np.float64)
    return p @ np.arange(p.shape[1], dtype=np.float64)


__all__ = ["OrdinalProbabilities", "expected_grade", "ordinal_loss"]
