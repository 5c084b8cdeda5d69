"""The heat map lands on the finding: a nodule at a known voxel, the map's peak within 5 mm of it.

Two kinds of model.  A stand-in runtime whose P(positive) is the visible fraction of a bright
blob tests the geometry alone (resampling, crop, pad, anisotropic pixels, resample_z, 3D
windows) independently of any training.  The shipped 2.5D model on the synthetic chest CT of
the demo tests the real thing.  Distances are in-plane, on the displayed (key) slice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from medclf_node.domain import SliceRef, Volume
from medclf_node.inference.manifest import load_manifest
from medclf_node.inference.predict import predict_series
from medclf_node.inference.registry import LoadedModel, load_model
from medclf_node.preprocess import PreprocessSpec, Window
from medclf_node.synthetic.phantoms import make_phantom

REPO = Path(__file__).resolve().parents[1]
SHIPPED_2P5D = REPO / "models" / "nodule-2p5d-int8"
TOLERANCE_MM = 5.0
F32 = npt.NDArray[np.float32]


class BlobRuntime:
    """P(positive) = fraction of the blob's pixels still visible (bright in the first channel)."""

    def __init__(self, input_shape: tuple[int, ...], blob_pixels: float) -> None:
        self._shape = input_shape
        self._blob = blob_pixels

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._shape

    def predict(self, batch: F32) -> F32:
        x = np.asarray(batch, np.float32)
        bright = x[..., 0] > 0.7  # lung window: soft tissue ~0.92, lung ~0.33, air 0
        per_plane = bright.reshape(x.shape[0], -1, x.shape[-3] * x.shape[-2]).sum(axis=2).max(axis=1)
        return np.clip(per_plane / self._blob, 0.0, 1.0).astype(np.float32)[:, None]


def _volume(hu: F32, spacing: tuple[float, float, float]) -> Volume:
    refs = tuple(SliceRef("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{i}") for i in range(hu.shape[0]))
    return Volume(hu, spacing, np.eye(4), refs, "1.2.3", "1.2.3.4")


def _sphere_volume(shape: tuple[int, int, int], sp: tuple[float, float, float],
                   centre_vox: tuple[float, float, float], r_mm: float) -> F32:
    """Lung-density slab (-850 HU) with a soft-tissue sphere centred on voxel ``centre_vox``."""
    z, y, x = (np.arange(n, dtype=np.float32) for n in shape)
    d2 = (((z[:, None, None] - centre_vox[0]) * sp[0]) ** 2 + ((y[None, :, None] - centre_vox[1]) * sp[1]) ** 2
          + ((x[None, None, :] - centre_vox[2]) * sp[2]) ** 2)
    vol = np.full(shape, -850.0, np.float32)
    vol[d2 <= r_mm * r_mm] = 30.0
    return vol


def _stand_in(spec: PreprocessSpec, blob_pixels: float) -> LoadedModel:
    man = load_manifest(SHIPPED_2P5D)
    update: dict[str, object] = {"preprocessing": spec, "threshold": 0.5}
    if spec.mode == "3d":
        update["aggregation"] = None
    man = man.model_copy(update=update)
    shape = (*spec.input_shape, spec.channels)
    return LoadedModel(man, BlobRuntime(shape, blob_pixels), SHIPPED_2P5D, "stand-in", 0.0)


def _peak_distance_mm(heat: F32, centre_vox: tuple[float, float, float], sp: tuple[float, float, float]) -> float:
    py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return float(np.hypot((py - centre_vox[1]) * sp[1], (px - centre_vox[2]) * sp[2]))


LUNG = (Window(center=-600.0, width=1500.0),)
SPEC_2P5D = PreprocessSpec(mode="2.5d", windows=LUNG, input_shape=(96, 96), target_spacing=(3.5, 3.5, 3.5),
                           resample_z=True, context_slices=1)
SPEC_3D = PreprocessSpec(mode="3d", windows=LUNG, input_shape=(8, 96, 96), target_spacing=(5.0, 3.5, 3.5))

CASES = {
    # name: (spec, shape, spacing, nodule centre voxel (z, y, x), radius mm)
    "512px-0.7mm-cropped": (SPEC_2P5D, (40, 512, 512), (2.5, 0.7, 0.7), (20.0, 303.0, 157.0), 10.0),
    "small-fov-padded": (SPEC_2P5D, (30, 90, 110), (2.0, 2.4, 2.2), (15.0, 30.0, 71.0), 9.0),
    "anisotropic-pixels": (SPEC_2P5D, (30, 300, 420), (3.0, 1.1, 0.8), (12.0, 180.0, 120.0), 11.0),
    "no-z-resampling": (SPEC_2P5D.model_copy(update={"resample_z": False}), (24, 256, 256), (5.0, 1.3, 1.3),
                        (11.0, 97.0, 190.0), 9.0),
    "3d-window": (SPEC_3D, (16, 400, 400), (5.0, 0.9, 0.9), (8.0, 140.0, 290.0), 10.0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_peak_on_known_nodule_voxel(name: str) -> None:
    spec, shape, sp, centre, r = CASES[name]
    blob = np.pi * (r / 3.5) ** 2  # the sphere's largest cross-section in model pixels
    res = predict_series(_stand_in(spec, blob), _volume(_sphere_volume(shape, sp, centre, r), sp))
    assert res.positive and res.heatmap is not None and res.heatmap.shape == shape[1:]
    key_z_mm = abs(res.key_slice_index - centre[0]) * sp[0]
    assert key_z_mm <= r, (res.key_slice_index, centre)  # the displayed slice cuts the nodule
    dist = _peak_distance_mm(res.heatmap, centre, sp)
    assert dist <= TOLERANCE_MM, f"{name}: heat-map peak {dist:.1f} mm from the nodule centre"
    # absolute probability scale: the map's peak is the drop in probability, at most the probability
    assert 0.0 < float(res.heatmap.max()) <= res.probability + 1e-6


@pytest.fixture(scope="module")
def shipped() -> LoadedModel:
    return load_model(SHIPPED_2P5D)


@pytest.mark.parametrize("seed", [3, 4, 6])
def test_shipped_model_peak_on_phantom_nodule(shipped: LoadedModel, seed: int) -> None:
    sp = (2.5, 0.7, 0.7)
    ph = make_phantom(seed, shape=(60, 512, 512), spacing=sp, nodules=1, radius_range_mm=(8.0, 12.0))
    centre = tuple(float(c) for c in ph.nodules[0].center_zyx)
    res = predict_series(shipped, _volume(ph.hu, ph.spacing))
    assert res.positive and res.heatmap is not None
    dist = _peak_distance_mm(res.heatmap, (centre[0], centre[1], centre[2]), sp)
    assert dist <= TOLERANCE_MM, f"seed {seed}: heat-map peak {dist:.1f} mm from the nodule centre"


def test_shipped_model_negative_study_stays_cold(shipped: LoadedModel) -> None:
    """No normalisation per image: a negative study's map never reaches the top of the scale."""
    ph = make_phantom(2, shape=(60, 512, 512), spacing=(2.5, 0.7, 0.7), nodules=0)
    res = predict_series(shipped, _volume(ph.hu, ph.spacing))
    assert not res.positive and res.heatmap is not None
    assert float(res.heatmap.max()) <= res.probability + 1e-6 < res.threshold

