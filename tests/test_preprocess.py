"""Behaviour of the shared preprocessing functions (windowing, resampling, crop/pad, 2D/2.5D/3D inputs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from medclf_node.preprocess import (
    PreprocessSpec,
    Window,
    apply_windows,
    crop_or_pad,
    resample,
    slices_2d,
    volume_3d,
)

LUNG = Window(center=-600, width=1500)
MEDI = Window(center=40, width=400)


def _ramp(z: int, y: int, x: int) -> np.ndarray:
    zz, yy, xx = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    return (100.0 * zz + 3.0 * yy + 0.5 * xx - 1000.0).astype(np.float32)


def test_apply_windows_values_and_channels() -> None:
    hu = np.array([[-2000.0, -600.0, 40.0, 3000.0]], dtype=np.float32)
    out = apply_windows(hu, [LUNG, MEDI])
    assert out.shape == (1, 4, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0], [0.0, 0.5, 1390 / 1500, 1.0], atol=1e-6)  # lung: -1350..150
    np.testing.assert_allclose(out[0, :, 1], [0.0, 0.0, 0.5, 1.0], atol=1e-6)  # mediastinum: -160..240
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_resample_linear_is_exact_on_linear_ramp() -> None:
    hu = _ramp(10, 20, 30)
    out = resample(hu, (2.0, 1.0, 1.0), (1.0, 0.5, 2.0))
    assert out.shape == (20, 40, 15)
    # origin-aligned: out[i] samples input coordinate i * target / source (clamped to the last voxel)
    zi = np.minimum(np.arange(20) * 0.5, 9)
    yi = np.minimum(np.arange(40) * 0.5, 19)
    xi = np.arange(15) * 2.0
    expect = 100.0 * zi[:, None, None] + 3.0 * yi[None, :, None] + 0.5 * xi[None, None, :] - 1000.0
    np.testing.assert_allclose(out, expect, atol=1e-3)


def test_resample_matches_scipy_linear() -> None:
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 300, (7, 33, 29)).astype(np.float32)
    out = resample(hu, (1.5, 0.7, 0.7), (1.0, 1.0, 1.3))
    grids = np.meshgrid(
        np.minimum(np.arange(out.shape[0]) * 1.0 / 1.5, 6),
        np.minimum(np.arange(out.shape[1]) * 1.0 / 0.7, 32),
        np.minimum(np.arange(out.shape[2]) * 1.3 / 0.7, 28),
        indexing="ij",
    )
    ref = ndimage.map_coordinates(hu, grids, order=1, mode="nearest")
    np.testing.assert_allclose(out, ref, atol=1e-3)
    cubic = resample(hu, (1.5, 0.7, 0.7), (1.0, 1.0, 1.3), order=3)
    assert cubic.shape == out.shape
    nearest = resample(hu, (1.5, 0.7, 0.7), (1.0, 1.0, 1.3), order=0)
    assert nearest.shape == out.shape and set(np.unique(nearest)).issubset(set(np.unique(hu)))


def test_resample_same_spacing_and_none_axes_untouched() -> None:
    hu = _ramp(4, 5, 6)
    assert resample(hu, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)) is hu
    out = resample(hu, (1.0, 1.0, 1.0), (None, 2.0, None))
    assert out.shape == (4, 3, 6)
    with pytest.raises(ValueError):
        resample(hu, (1.0, 1.0), (1.0, 1.0))


def test_crop_or_pad_centres_and_keeps_channels() -> None:
    a = np.arange(5 * 6, dtype=np.float32).reshape(5, 6)
    cropped = crop_or_pad(a, (3, 2), -1024)
    np.testing.assert_array_equal(cropped, a[1:4, 2:4])
    padded = crop_or_pad(a, (7, 9), -1024)
    assert padded.shape == (7, 9)
    np.testing.assert_array_equal(padded[1:6, 1:7], a)
    assert (padded[0] == -1024).all() and (padded[:, 8] == -1024).all()
    with_ch = crop_or_pad(np.ones((4, 4, 3), np.float32), (2, 6), 0.0)
    assert with_ch.shape == (2, 6, 3)
    assert with_ch[:, 0].sum() == 0 and with_ch[:, 1:5].sum() == 2 * 4 * 3


def test_slices_2d_one_input_per_slice_with_windows() -> None:
    hu = _ramp(6, 40, 40)
    spec = PreprocessSpec(mode="2d", windows=(LUNG, MEDI), input_shape=(32, 48), target_spacing=(1.0, 1.0, 1.0))
    out = slices_2d(hu, (2.0, 1.0, 1.0), spec)
    assert out.shape == (6, 32, 48, 2) and out.dtype == np.float32
    ref = apply_windows(crop_or_pad(hu, (6, 32, 48), -1024.0), (LUNG, MEDI))
    np.testing.assert_allclose(out, ref, atol=1e-6)
    half = slices_2d(hu, (2.0, 0.5, 0.5), spec)  # in-plane downsample by 2
    assert half.shape == (6, 32, 48, 2)
    pad = apply_windows(np.array(-1024.0, dtype=np.float32), (LUNG, MEDI))
    np.testing.assert_allclose(half[:, :, :4], np.broadcast_to(pad, (6, 32, 4, 2)))  # padded with -1024 HU


def test_slices_2p5d_neighbours_edge_replicated_slice_major() -> None:
    hu = np.stack([np.full((8, 8), v, np.float32) for v in (-900, -600, -300, 0, 300)])
    spec = PreprocessSpec(mode="2.5d", windows=(LUNG, MEDI), input_shape=(8, 8), context_slices=1)
    out = slices_2d(hu, (1.0, 1.0, 1.0), spec)
    assert out.shape == (5, 8, 8, 6)
    win = apply_windows(hu[:, 0, 0], (LUNG, MEDI))  # (5, 2)
    for k in range(5):
        nb = [max(k - 1, 0), k, min(k + 1, 4)]
        expect = np.concatenate([win[j] for j in nb])  # slice-major, window-minor
        np.testing.assert_allclose(out[k, 3, 3], expect, atol=1e-6)
    subset = slices_2d(hu, (1.0, 1.0, 1.0), spec, indices=[4, 0])
    np.testing.assert_array_equal(subset, out[[4, 0]])
    with pytest.raises(IndexError):
        slices_2d(hu, (1.0, 1.0, 1.0), spec, indices=[5])


def test_zscore_per_sample() -> None:
    rng = np.random.default_rng(1)
    hu = rng.normal(-300, 400, (3, 16, 16)).astype(np.float32)
    hu[2] = -1000.0  # constant slice: zeros, not NaN
    spec = PreprocessSpec(mode="2d", windows=(LUNG,), input_shape=(16, 16), normalization="zscore")
    out = slices_2d(hu, (1.0, 1.0, 1.0), spec)
    for k in range(2):
        assert abs(float(out[k].mean())) < 1e-4 and abs(float(out[k].std()) - 1.0) < 1e-3
    assert np.all(out[2] == 0.0)


def test_volume_3d_exact_shape() -> None:
    hu = _ramp(20, 30, 30)
    spec = PreprocessSpec(
        mode="3d", windows=(LUNG,), input_shape=(16, 32, 32), target_spacing=(2.0, 1.0, 1.0)
    )
    out = volume_3d(hu, (1.0, 1.0, 1.0), spec)
    assert out.shape == (16, 32, 32, 1) and out.dtype == np.float32
    res = resample(hu, (1.0, 1.0, 1.0), (2.0, 1.0, 1.0))  # (10, 30, 30) -> padded in z and yx
    np.testing.assert_allclose(out[..., 0], apply_windows(crop_or_pad(res, (16, 32, 32), -1024.0), (LUNG,))[..., 0])
    z = volume_3d(hu, (1.0, 1.0, 1.0), spec.model_copy(update={"normalization": "zscore"}))
    assert abs(float(z.mean())) < 1e-4


def test_mode_mismatch_raises() -> None:
    spec3 = PreprocessSpec(mode="3d", windows=(LUNG,), input_shape=(4, 4, 4))
    spec2 = PreprocessSpec(mode="2d", windows=(LUNG,), input_shape=(4, 4))
    hu = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(ValueError):
        slices_2d(hu, (1, 1, 1), spec3)
    with pytest.raises(ValueError):
        volume_3d(hu, (1, 1, 1), spec2)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 40),
    s_in=st.floats(0.3, 5.0),
    s_out=st.floats(0.3, 5.0),
)
def test_resample_length_and_range(n: int, s_in: float, s_out: float) -> None:
    rng = np.random.default_rng(n)
    a = rng.uniform(-1000, 1000, (n, 3, 3)).astype(np.float32)
    out = resample(a, (s_in, 1.0, 1.0), (s_out, 1.0, 1.0))
    assert out.shape[0] == max(1, math.floor(n * s_in / s_out + 0.5))
    # linear interpolation never leaves the input range
    assert out.min() >= a.min() - 1e-3 and out.max() <= a.max() + 1e-3
    np.testing.assert_allclose(out[0], a[0], atol=1e-4)  # origin-aligned


def test_slices_2d_subset_equals_full_with_resampling() -> None:
    rng = np.random.default_rng(5)
    hu = rng.normal(-400, 500, (9, 30, 26)).astype(np.float32)
    spec = PreprocessSpec(
        mode="2.5d", windows=(LUNG, MEDI), input_shape=(20, 24), target_spacing=(1.0, 1.1, 0.9), context_slices=2
    )
    full = slices_2d(hu, (2.0, 0.8, 0.8), spec)
    for idx in ([0], [8, 3], [4, 4, 1], []):
        np.testing.assert_array_equal(slices_2d(hu, (2.0, 0.8, 0.8), spec, indices=idx), full[idx])
    zspec = spec.model_copy(update={"resample_z": True})
    zfull = slices_2d(hu, (2.0, 0.8, 0.8), zspec)
    assert zfull.shape[0] == 18  # 9 slices at 2 mm -> 18 at 1 mm
    np.testing.assert_array_equal(slices_2d(hu, (2.0, 0.8, 0.8), zspec, indices=[17, 0]), zfull[[17, 0]])
