"""predict_series: 2.5D and 3D tiny models find the nodule, place the key slice and heat map on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_models import phantom_volume, random_nodule, tiny_models_dir  # noqa: F401

from medclf_node.domain import ModelResult, SliceRef, Volume
from medclf_node.inference.manifest import Aggregation, OutputSpec
from medclf_node.inference.predict import aggregate, key_index, output_to_probability, predict_series
from medclf_node.inference.registry import LoadedModel, load_model


def _volume(hu: np.ndarray, spacing: tuple[float, float, float]) -> Volume:
    z = hu.shape[0]
    refs = tuple(SliceRef("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{i}") for i in range(z))
    return Volume(hu, spacing, np.eye(4), refs, "1.2.3", "1.2.3.4")


@pytest.fixture(scope="module")
def model_2d(tiny_models_dir: Path) -> LoadedModel:  # noqa: F811
    return load_model(tiny_models_dir / "test-2p5d-int8")


@pytest.fixture(scope="module")
def model_3d(tiny_models_dir: Path) -> LoadedModel:  # noqa: F811
    return load_model(tiny_models_dir / "test-3d")


def _case(seed: int, positive: bool, shape: tuple[int, int, int], sp: tuple[float, float, float]
          ) -> tuple[Volume, tuple[float, float, float, float] | None]:
    rng = np.random.default_rng(seed)
    nod = random_nodule(shape, sp, rng) if positive else None
    return _volume(phantom_volume(shape, sp, nod, seed=seed), sp), nod


def _check_localisation(res: ModelResult, nod: tuple[float, float, float, float],
                        sp: tuple[float, float, float], shape: tuple[int, int, int], z_tol_mm: float) -> None:
    nz, ny, nx, r = nod
    assert abs((res.key_slice_index + 0.5) * sp[0] - nz) <= z_tol_mm
    assert res.heatmap is not None and res.heatmap.shape == shape[1:] and res.heatmap.dtype == np.float32
    # absolute scale (drop in probability when occluded), not normalised per image
    assert float(res.heatmap.min()) >= 0.0 and 0.0 < float(res.heatmap.max()) <= res.probability + 1e-6
    py, px = np.unravel_index(int(np.argmax(res.heatmap)), res.heatmap.shape)
    dist = np.hypot((py + 0.5) * sp[1] - ny, (px + 0.5) * sp[2] - nx)
    assert dist <= r, (dist, r)  # on the nodule (two-stage occlusion: no longer a coarse cell centre)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_2p5d_positive_and_negative(model_2d: LoadedModel, seed: int) -> None:
    shape, sp = (36, 150, 170), (2.0, 2.2, 2.0)  # geometry unlike training: resampled to 5 mm in-plane
    vol, nod = _case(seed, True, shape, sp)
    assert nod is not None
    res = predict_series(model_2d, vol)
    assert res.positive and res.probability > 0.9 and res.threshold == 0.5
    assert res.model_name == "test-2p5d-int8" and res.finding.meaning == "Pulmonary nodule"
    assert res.slice_scores is not None and res.slice_scores.shape == (36,)
    assert res.probability == pytest.approx(float(res.slice_scores.max()))
    _check_localisation(res, nod, sp, shape, z_tol_mm=nod[3])
    # slices far from the nodule score low
    far = np.abs((np.arange(36) + 0.5) * sp[0] - nod[0]) > nod[3] + 8
    assert float(res.slice_scores[far].max(initial=0.0)) < 0.5
    assert res.inference_seconds > 0
    neg = predict_series(model_2d, _case(seed + 10, False, shape, sp)[0])
    assert not neg.positive and neg.probability < 0.5


def test_2p5d_big_fov_is_cropped_and_heatmap_maps_back(model_2d: LoadedModel) -> None:
    # 512x512 at 0.7 mm -> 72x72 at 5 mm, centre-cropped to 64: the heat map must still land on the nodule
    shape, sp = (12, 512, 512), (2.5, 0.7, 0.7)
    vol, nod = _case(4, True, shape, sp)
    assert nod is not None
    nod = (15.0, nod[1], nod[2], nod[3])
    vol = _volume(phantom_volume(shape, sp, nod, seed=4), sp)
    res = predict_series(model_2d, vol)
    assert res.positive
    _check_localisation(res, nod, sp, shape, z_tol_mm=nod[3])


def test_2p5d_resample_z_reports_per_source_slice(model_2d: LoadedModel) -> None:
    man = model_2d.manifest
    spec = man.preprocessing.model_copy(update={"resample_z": True})  # model slices every 2.5 mm
    resampled = LoadedModel(man.model_copy(update={"preprocessing": spec}), model_2d.runtime,
                            model_2d.directory, model_2d.artifact_path, 0.0)
    shape, sp = (60, 120, 120), (1.0, 3.0, 3.0)
    vol, nod = _case(7, True, shape, sp)
    assert nod is not None
    res = predict_series(resampled, vol, heatmap=False)
    assert res.slice_scores is not None and res.slice_scores.shape == (60,)
    assert res.heatmap is None and res.positive
    assert abs((res.key_slice_index + 0.5) * sp[0] - nod[0]) <= nod[3] + 2.5


@pytest.mark.parametrize("seed", [0, 1])
def test_3d_sliding_window(model_3d: LoadedModel, seed: int) -> None:
    shape, sp = (100, 128, 128), (2.5, 2.5, 2.5)  # 250 mm: 31 slices at 8 mm > 16 -> 3 windows
    vol, nod = _case(seed, True, shape, sp)
    assert nod is not None
    res = predict_series(model_3d, vol)
    assert res.positive and res.slice_scores is None
    _check_localisation(res, nod, sp, shape, z_tol_mm=8 * 8.0)  # half a window
    neg = predict_series(model_3d, _case(seed + 10, False, shape, sp)[0])
    assert not neg.positive


def test_3d_short_series_is_padded(model_3d: LoadedModel) -> None:
    shape, sp = (20, 100, 100), (2.5, 3.0, 3.0)  # 50 mm < 16 * 8 mm: one padded window
    vol = _volume(phantom_volume(shape, sp, (25.0, 150.0, 90.0, 14.0), seed=3), sp)
    res = predict_series(model_3d, vol)
    assert res.positive and 0 <= res.key_slice_index < 20


def test_output_semantics() -> None:
    raw = np.array([[0.0], [2.0]], np.float32)
    np.testing.assert_allclose(output_to_probability(raw, OutputSpec(kind="logit")), [0.5, 0.880797], atol=1e-5)
    two = np.array([[1.0, 1.0], [0.0, np.log(3.0)]], np.float32)
    np.testing.assert_allclose(output_to_probability(two, OutputSpec(kind="logit", positive_index=1)),
                               [0.5, 0.75], atol=1e-5)
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    np.testing.assert_allclose(output_to_probability(probs, OutputSpec(positive_index=1)), [0.1, 0.8])
    with pytest.raises(ValueError, match="positive_index 2"):
        output_to_probability(probs, OutputSpec(positive_index=2))


def test_aggregation_and_key_slice() -> None:
    s = np.array([0.1, 0.9, 0.2, 0.6, 0.8, 0.1], np.float32)
    assert aggregate(s, Aggregation(method="max")) == (pytest.approx(0.9), 1)
    p, key = aggregate(s, Aggregation(method="topk_mean", k=3))
    assert p == pytest.approx((0.9 + 0.8 + 0.6) / 3) and key == 1
    assert aggregate(s, Aggregation(method="topk_mean", k=50))[0] == pytest.approx(float(s.mean()))
    # saturated run: the key slice is the middle of the longest tied run, not its first slice
    sat = np.array([0.0, 0.996, 0.996, 0.996, 0.996, 0.996, 0.2, 0.996], np.float32)
    assert key_index(sat) == 3
