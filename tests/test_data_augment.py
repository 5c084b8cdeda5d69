"""Augmentation ops: shape/dtype kept, deterministic under a seed, a real and smooth elastic field."""

from __future__ import annotations

import numpy as np
import pytest

from training.data.augment import AugmentConfig, augment, elastic_field, rotate, warp
from training.tfenv import tf

RNG = np.random.default_rng(0)
IMG2D = RNG.random((48, 40, 3)).astype(np.float32)
IMG3D = RNG.random((8, 32, 24, 2)).astype(np.float32)
FULL = AugmentConfig(flip_axes=(-1, 0), rotate_deg=15, elastic_alpha=2.0, elastic_sigma=6.0, elastic_prob=1.0)


def _seed(a: int, b: int = 0) -> tf.Tensor:
    return tf.constant([a, b], tf.int64)


@pytest.mark.parametrize("img", [IMG2D, IMG3D], ids=["2d", "3d"])
def test_shape_dtype_and_determinism(img: np.ndarray) -> None:
    fn = tf.function(lambda x, s: augment(x, s, FULL))
    a = fn(tf.constant(img), _seed(1)).numpy()
    b = fn(tf.constant(img), _seed(1)).numpy()
    c = fn(tf.constant(img), _seed(2)).numpy()
    assert a.shape == img.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.isfinite(a).all()


def test_all_off_is_identity() -> None:
    off = AugmentConfig(flip_prob=0, rotate_deg=0, contrast=0, brightness=0, elastic_alpha=0)
    np.testing.assert_array_equal(augment(tf.constant(IMG3D), _seed(3), off).numpy(), IMG3D)


def test_flip_is_a_real_flip() -> None:
    cfg = AugmentConfig(flip_axes=(-1,), flip_prob=1.0, rotate_deg=0, contrast=0, brightness=0, elastic_alpha=0)
    np.testing.assert_array_equal(augment(tf.constant(IMG2D), _seed(4), cfg).numpy(), IMG2D[:, ::-1])


def test_rotation_zero_identity_and_inverse() -> None:
    np.testing.assert_allclose(rotate(tf.constant(IMG2D), tf.constant(0.0)).numpy(), IMG2D, atol=1e-6)
    yy, xx = np.mgrid[0:48, 0:48].astype(np.float32)
    smooth = np.sin(yy / 7.0)[..., None] + np.cos(xx / 9.0)[..., None]
    there = rotate(tf.constant(smooth), tf.constant(0.2))
    back = rotate(there, tf.constant(-0.2)).numpy()
    centre = (slice(14, 34), slice(14, 34))
    assert np.abs(back[centre] - smooth[centre]).max() < 0.05
    assert np.abs(there.numpy()[centre] - smooth[centre]).max() > 0.2  # it did rotate


def test_warp_zero_field_is_exact_identity() -> None:
    np.testing.assert_array_equal(warp(tf.constant(IMG3D), tf.zeros((8, 32, 24, 3))).numpy(), IMG3D)
    field = elastic_field((48, 40), 0.0, 6.0, _seed(5))
    np.testing.assert_array_equal(warp(tf.constant(IMG2D), field).numpy(), IMG2D)


def test_warp_samples_at_displaced_positions() -> None:
    """Linear ramp: (bi)linear interpolation is exact, so out(p) = ramp(p + d(p)) away from the borders."""
    field = elastic_field((40, 40), 1.5, 6.0, _seed(6)).numpy()
    yy, xx = np.mgrid[0:40, 0:40].astype(np.float32)
    ramp = (0.3 * yy + 0.7 * xx)[..., None]
    out = warp(tf.constant(ramp), tf.constant(field)).numpy()[..., 0]
    expect = 0.3 * (yy + field[..., 0]) + 0.7 * (xx + field[..., 1])
    inner = (slice(8, 32), slice(8, 32))
    np.testing.assert_allclose(out[inner], expect[inner], atol=1e-4)


@pytest.mark.parametrize("shape", [(64, 64), (16, 48, 48)], ids=["2d", "3d"])
def test_elastic_field_is_smooth_and_folding_free(shape: tuple[int, ...]) -> None:
    alpha, sigma = 1.0, 8.0
    d = elastic_field(shape, alpha, sigma, _seed(7), z=True).numpy()
    assert d.shape == (*shape, len(shape))
    for c in range(len(shape)):
        assert np.std(d[..., c]) == pytest.approx(alpha, rel=0.01)
    grads = np.stack([np.gradient(d[..., c], axis=a) for c in range(len(shape)) for a in range(len(shape))])
    # Smoothed noise: derivatives ~ alpha / (sigma * sqrt(2)) in std; bound the maximum loosely.
    assert np.abs(grads).max() < 5 * alpha / sigma
    rough = np.abs(np.diff(np.random.default_rng(0).normal(0, alpha, shape), axis=0)).max()
    assert np.abs(grads).max() < rough / 4  # far smoother than white noise of the same amplitude
    # Jacobian of p -> p + d(p) stays positive: the deformation does not fold (invertible).
    n = len(shape)
    jac = np.empty((*shape, n, n))
    for c in range(n):
        for a in range(n):
            jac[..., c, a] = (c == a) + np.gradient(d[..., c], axis=a)
    assert np.linalg.det(jac).min() > 0.2


def test_elastic_3d_in_plane_only_by_default() -> None:
    d = elastic_field((8, 24, 24), 2.0, 4.0, _seed(8), z=False).numpy()
    assert d.shape == (8, 24, 24, 2) and np.abs(d).max() > 0.5
    # An in-plane field moves pixels within their slice only: each slice keeps its own content.
    img = np.zeros((8, 24, 24, 1), np.float32)
    img[3] = 1.0
    out = warp(tf.constant(img), tf.constant(d)).numpy()
    np.testing.assert_allclose(out[3], 1.0, atol=1e-6)
    assert np.all(np.delete(out, 3, axis=0) == 0.0)


def test_in_plane_warp_matches_full_warp_with_zero_z() -> None:
    d2 = elastic_field((8, 32, 24), 1.5, 4.0, _seed(9), z=False)
    d3 = tf.concat([tf.zeros_like(d2[..., :1]), d2], axis=-1)
    np.testing.assert_allclose(warp(tf.constant(IMG3D), d2).numpy(), warp(tf.constant(IMG3D), d3).numpy(), atol=1e-6)


def test_3d_with_z_deformation_and_rotation() -> None:
    cfg = AugmentConfig(rotate_deg=10, elastic_alpha=1.0, elastic_sigma=4.0, elastic_prob=1.0, elastic_z=True)
    out = tf.function(lambda x, s: augment(x, s, cfg))(tf.constant(IMG3D), _seed(10)).numpy()
    assert out.shape == IMG3D.shape and np.isfinite(out).all() and not np.array_equal(out, IMG3D)
