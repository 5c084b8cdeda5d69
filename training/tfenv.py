"""One place that imports TensorFlow for the training package, with tf-keras selected.

tensorflow-model-optimization only works with tf-keras (Keras 2), so ``TF_USE_LEGACY_KERAS=1`` must
be in the environment before TensorFlow is first imported.  Import ``tf`` and ``keras`` from here.

``TF_ENABLE_ONEDNN_OPTS=1``: TensorFlow turns its oneDNN kernels on by default only on CPUs with
AVX-512; on the AVX2 machines we run on it falls back to Eigen, and Conv3D training is ~8x slower
(cnn3d_cbam 8x64x64, batch 16, 2 threads: 0.257 s vs 0.017 s per window, measured 2026-11-25).
An explicit setting in the environment wins.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

log = logging.getLogger(__name__)

__all__ = ["tf", "keras", "gpu_available"]


def gpu_available() -> bool:
    """True when TensorFlow sees at least one GPU."""
    return bool(tf.config.list_physical_devices("GPU"))
