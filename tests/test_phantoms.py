"""Synthetic CT phantoms: deterministic, anatomically plausible, ground truth matches pixels."""

from __future__ import annotations

import numpy as np
import pytest

from medclf_node.synthetic.phantoms import Phantom, default_spacing, make_phantom, slice_labels_for

SHAPE = (48, 96, 96)


@pytest.fixture(scope="module")
def positive() -> Phantom:
    return make_phantom(11, shape=SHAPE, nodules=3)


def test_deterministic_under_seed(positive: Phantom) -> None:
    again = make_phantom(11, shape=SHAPE, nodules=3)
    assert np.array_equal(positive.hu, again.hu)
    assert positive.nodules == again.nodules
    assert np.array_equal(positive.slice_labels, again.slice_labels)
    other = make_phantom(12, shape=SHAPE, nodules=3)
    assert not np.array_equal(positive.hu, other.hu)
    assert positive.patient_id != other.patient_id


def test_types_and_ranges(positive: Phantom) -> None:
    assert positive.hu.dtype == np.float32 and positive.shape == SHAPE
    assert positive.hu.min() >= -1024 and positive.hu.max() <= 3071
    assert positive.spacing == default_spacing(SHAPE)
    assert positive.slice_labels.dtype == np.uint8 and positive.slice_labels.shape == (SHAPE[0],)


def test_anatomy_present(positive: Phantom) -> None:
    hu = positive.hu
    mid = hu[SHAPE[0] // 2]
    assert np.median(mid[:4, :4]) < -950  # air outside the body
    lung_fraction = float(np.mean(mid < -700))
    assert 0.55 < lung_fraction < 0.9  # air around the body + lungs, not an empty or solid slice
    assert float(np.mean(hu > 300)) > 1e-4  # ribs / spine
    assert float(np.mean((mid > -150) & (mid < 100))) > 0.1  # soft tissue


def test_nodule_ground_truth_matches_pixels(positive: Phantom) -> None:
    assert positive.label == 1 and 1 <= len(positive.nodules) <= 3
    for n in positive.nodules:
        z, y, x = n.center_zyx
        core = float(positive.hu[z, y, x])
        if n.kind == "solid":
            assert -60 < core < 180, (n, core)
        else:
            assert -650 < core < -150, (n, core)
        assert positive.slice_labels[z] == 1
        # Lung surrounds the nodule: a ring just outside its radius is mostly parenchyma.
        r_px = int(np.ceil(n.radius_mm * 1.5 / positive.spacing[1])) + 2
        ring = np.concatenate(
            [positive.hu[z, y, max(x - r_px, 0)].ravel(), positive.hu[z, y, min(x + r_px, SHAPE[2] - 1)].ravel()]
        )
        assert np.min(ring) < -500, (n, ring)


def test_negative_phantom_has_no_labels() -> None:
    p = make_phantom(5, shape=SHAPE, nodules=0)
    assert p.label == 0 and p.nodules == () and int(p.slice_labels.sum()) == 0
    # Vessels make bright structures inside the lungs even without nodules.
    lungs_and_vessels = p.hu[SHAPE[0] // 2]
    assert float(np.mean(lungs_and_vessels > -300)) > 0.05


def test_label_from_seed_is_balanced() -> None:
    labels = [make_phantom(s, shape=(16, 32, 32), spacing=(18.0, 11.0, 11.0)).label for s in range(24)]
    assert 4 <= sum(labels) <= 20


def test_geometry_is_in_millimetres() -> None:
    """Same seed, finer in-plane grid: the nodule sits at the same physical place."""
    coarse = make_phantom(21, shape=(32, 64, 64), spacing=(9.0, 5.6, 5.6), nodules=1)
    fine = make_phantom(21, shape=(32, 128, 128), spacing=(9.0, 2.8, 2.8), nodules=1)
    (a,), (b,) = coarse.nodules, fine.nodules
    assert a.radius_mm == b.radius_mm and a.center_zyx[0] == b.center_zyx[0]
    for axis in (1, 2):
        mm_a = (a.center_zyx[axis] - (64 - 1) / 2) * 5.6
        mm_b = (b.center_zyx[axis] - (128 - 1) / 2) * 2.8
        assert abs(mm_a - mm_b) <= 5.6


def test_slice_labels_rule(positive: Phantom) -> None:
    n = positive.nodules[0]
    labels = slice_labels_for([n], SHAPE[0], positive.spacing[0])
    reach = n.radius_mm * np.sqrt(0.75)
    k = np.arange(SHAPE[0])
    assert np.array_equal(labels == 1, np.abs(k - n.center_zyx[0]) * positive.spacing[0] <= reach)


def test_rejects_bad_shape() -> None:
    with pytest.raises(ValueError):
        make_phantom(0, shape=(4, 64, 64))
