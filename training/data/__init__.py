"""Training data: readers, synthetic phantoms, TFRecords, splits, tf.data pipelines."""
