"""Property: the volume never depends on the order in which instances arrived."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ctseries import axial_positions, hu_phantom, make_series, write_series
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medclf_node.config import VolumeSection
from medclf_node.domain import Volume
from medclf_node.ingest.volume import assemble_volume

POLICY = VolumeSection()


@pytest.fixture(scope="module")
def messy_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Volume]:
    """Tilted, one slice missing, a duplicate, and a second overlapping acquisition."""
    n = 9
    hu = hu_phantom(n, rows=12, cols=10, seed=3)
    positions = [(p[0], p[1] - 0.35 * k, p[2]) for k, p in enumerate(axial_positions(n))]
    main = make_series(hu, positions, acquisition_numbers=[1] * n)
    study, series, frame = main[0].StudyInstanceUID, main[0].SeriesInstanceUID, main[0].FrameOfReferenceUID
    extra = make_series(hu[2:4] + 7.0, positions[2:4], acquisition_numbers=[2, 2], study_uid=study, series_uid=series)
    dup = make_series(hu[6:7] + 3.0, positions[6:7], acquisition_numbers=[1], study_uid=study, series_uid=series)
    dup[0].InstanceNumber = 50
    for d in extra + dup:
        d.FrameOfReferenceUID = frame
    datasets = main[:4] + main[5:] + extra + dup  # slice 4 missing
    paths = write_series(datasets, tmp_path_factory.mktemp("messy"))
    return paths, assemble_volume(paths, POLICY)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_permutation_gives_identical_volume(messy_series: tuple[list[Path], Volume], data: st.DataObject) -> None:
    paths, baseline = messy_series
    perm = data.draw(st.permutations(paths))
    vol = assemble_volume(perm, POLICY)
    np.testing.assert_array_equal(vol.array, baseline.array)
    np.testing.assert_array_equal(vol.affine, baseline.affine)
    assert vol.spacing == baseline.spacing
    assert vol.slice_refs == baseline.slice_refs
    assert vol.notes == baseline.notes


def test_messy_series_baseline_is_sane(messy_series: tuple[list[Path], Volume]) -> None:
    _, vol = messy_series
    assert vol.shape == (9, 12, 10)
    joined = " ".join(vol.notes)
    assert "tilt" in joined and "resampled onto a regular" in joined and "kept acquisition 1" in joined
    assert "duplicating" in joined
