"""The 3D recipe (training.recipes.model_3d): window labels, and scoring identical to the node's predictor.

The recipe picks its threshold and reports AUCs from its own window scoring; that is only honest if
it scores a series exactly as ``medclf_node.inference.predict`` does (same windows, same max).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medclf_node.inference.manifest import Artifact, sha256_path, write_manifest
from medclf_node.synthetic.phantoms import make_phantom
from training.recipes.model_3d import (
    FP16_FILE,
    SPEC,
    WINDOW_DEPTH,
    _manifest,
    series_probability,
    window_labels,
    window_starts,
)
from training.recipes.series_eval import EvalSeries


def test_window_starts_cover_every_slice_and_end_flush() -> None:
    for nz in (WINDOW_DEPTH + 1, 37, 60, 61):
        starts = window_starts(nz)
        assert starts[0] == 0 and starts[-1] == nz - WINDOW_DEPTH
        assert all(0 < b - a <= 2 for a, b in zip(starts, starts[1:], strict=False))
    assert window_starts(WINDOW_DEPTH - 2) == [-1]  # shorter than a window: centre-padded, as volume_3d does


def test_window_labels_positive_inside_ambiguous_at_edges() -> None:
    dz = 5.0
    starts = [0, 2, 4, 6, 8, 10, 20]
    # one nodule, radius 6 mm, centre at z = 50 mm = model slice 10
    y, amb = window_labels([(50.0, 6.0)], starts, dz)
    # window s covers slices s..s+7; positive when 10 is in [s+1, s+6]: s in 4..9
    assert y.tolist() == [0, 0, 1, 1, 1, 0, 0]
    # s=2 (ends one slice before the centre) and s=10 (centre on its first slice) are ambiguous; s=0 ends at
    # 35 mm, 15 mm from the centre: more than radius + margin away -> clean negative; s=20 too
    assert amb.tolist() == [False, True, False, False, False, True, False]
    y0, amb0 = window_labels([], starts, dz)
    assert y0.sum() == 0 and not amb0.any()


def test_recipe_series_score_equals_node_predictor(tmp_path: Path) -> None:
    """An (untrained) cnn3d_cbam exported to fp16: recipe scoring == registry + predict_series."""
    pytest.importorskip("tensorflow")
    from medclf_node.inference.predict import predict_series
    from medclf_node.inference.registry import load_model
    from medclf_node.inference.runtime import LiteRTRuntime
    from training.export.tflite import convert
    from training.modeling.config import ModelConfig
    from training.modeling.factory import build_model

    model = build_model(ModelConfig(family="cnn3d_cbam", base_filters=2, max_stages=2, min_feature_size=1), SPEC)
    (tmp_path / FP16_FILE).write_bytes(convert(model, "fp16"))
    art = Artifact(path=FP16_FILE, format="tflite", precision="fp16", sha256=sha256_path(tmp_path / FP16_FILE))
    write_manifest(_manifest([art], 0.5, {}, "test", 0, "test"), tmp_path)
    rt = LiteRTRuntime(tmp_path / FP16_FILE, threads=1)
    loaded = load_model(tmp_path, threads=1)
    # many windows; then a slab thinner than one window (32 mm -> 6 model slices: centre-padded)
    for seed, shape, spacing in ((11, (60, 96, 96), None), (12, (8, 80, 80), (4.0, 4.5, 4.5))):
        ph = make_phantom(seed, shape=shape, spacing=spacing, nodules=1 if seed % 2 else 0)
        es = EvalSeries(ph.patient_id, seed, ph.label, np.rint(ph.hu).astype(np.int16), ph.spacing,
                        np.zeros(1, np.uint8), np.zeros(1, bool))
        ours = series_probability(rt.predict, es)
        node = predict_series(loaded, es.volume(), heatmap=False).probability
        assert ours == pytest.approx(node, abs=1e-6)
