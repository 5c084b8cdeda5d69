"""Export: SavedModel, TFLite, manifest."""
