"""SavedModel export with one fixed-shape ``serving_default`` signature (what the node's TF runtime loads)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from training.tfenv import keras, tf

log = logging.getLogger(__name__)


def export_saved_model(model: keras.Model, out_dir: Path) -> Path:
    """Write ``model`` as a SavedModel at ``out_dir`` (replaced if present); input batch axis is free."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name=model.input_names[0])

    @tf.function(input_signature=[spec])
    def serve(x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probability": tf.cast(model(x, training=False), tf.float32)}

    tf.saved_model.save(model, str(out_dir), signatures={"serving_default": serve})
    log.info("wrote SavedModel %s", out_dir)
    return out_dir
