"""Training package: data, models, evaluation and export for medclf-node models."""
