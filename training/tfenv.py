"""One place that imports TensorFlow for the training package, with tf-keras selected.

tensorflow-model-optimization only works with tf-keras (Keras 2), so ``TF_USE_LEGACY_KERAS=1`` must
be in the environment before TensorFlow is first imported.  Import ``tf`` and ``keras`` from here.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

log = logging.getLogger(__name__)

__all__ = ["tf", "keras", "gpu_available"]


def gpu_available() -> bool:
    """True when TensorFlow sees at least one GPU."""
    return bool(tf.config.list_physical_devices("GPU"))
