"""Volume assembly on crafted CT series: ordering, spacing, tilt, duplicates, rescale, refusals."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from ctseries import axial_positions, hu_phantom, make_enhanced, make_series, write_series
from pydicom.dataset import Dataset

from medclf_node.config import RuleSection, VolumeSection
from medclf_node.ingest.selection import Selection, read_headers, select
from medclf_node.ingest.volume import VolumeError, assemble_volume, read_slice_headers

RESAMPLE = VolumeSection()
REFUSE = VolumeSection(uneven_spacing="refuse", gantry_tilt="refuse")


def _write(tmp_path: Path, datasets: list[Dataset], name: str = "s", shuffle: int | None = 7) -> list[Path]:
    paths = write_series(datasets, tmp_path / name)
    if shuffle is not None:
        random.Random(shuffle).shuffle(paths)
    return paths


def _refused(paths: list[Path], policy: VolumeSection, code: str) -> VolumeError:
    with pytest.raises(VolumeError) as info:
        assemble_volume(paths, policy)
    assert info.value.code == code, info.value.message
    assert len(info.value.message) > 20  # a sentence, not just the code
    return info.value


def test_shuffled_series_matches_highdicom_reference(tmp_path: Path) -> None:
    hu = hu_phantom(12)
    ds = make_series(hu)
    vol = assemble_volume(_write(tmp_path, ds), RESAMPLE)
    ref = hd.get_volume_from_series(ds)
    np.testing.assert_array_equal(vol.array, ref.array.astype(np.float32))
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-9)
    assert vol.spacing == pytest.approx(ref.spacing)
    assert "".join(v.value for v in ref.get_closest_patient_orientation()) == "FPL"  # HFS is canonical as is
    # index runs along -normal: the highest z first (head to feet for an axial series)
    np.testing.assert_array_equal(vol.array, hu[::-1])
    assert [r.sop_instance_uid for r in vol.slice_refs] == [d.SOPInstanceUID for d in ds[::-1]]
    assert vol.array.dtype == np.float32 and vol.notes == ()
    assert vol.series_instance_uid == ds[0].SeriesInstanceUID
    assert vol.study_instance_uid == ds[0].StudyInstanceUID


def test_oblique_orientation_matches_highdicom(tmp_path: Path) -> None:
    c, s = np.cos(0.3), np.sin(0.3)
    row = (c, s, 0.0)
    col = (0.0, 0.0, -1.0)  # a tilted coronal plane
    normal = np.cross(row, col)
    hu = hu_phantom(6)
    positions = [tuple(np.array([10.0, 20.0, 30.0]) + k * 3.0 * normal) for k in range(6)]
    ds = make_series(hu, positions, orientation=(*row, *col))
    vol = assemble_volume(_write(tmp_path, ds), RESAMPLE)
    # Oblique: taken to the nearest patient axes (feet, posterior, left) without resampling.
    ref = hd.get_volume_from_series(ds).to_patient_orientation("FPL")
    np.testing.assert_array_equal(vol.array, ref.array.astype(np.float32))
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)
    assert any("oblique" in note and "17.2 deg" in note for note in vol.notes)


def test_removed_slice_refused_or_interpolated(tmp_path: Path) -> None:
    hu = hu_phantom(10)
    ds = make_series(hu)
    del ds[4]
    paths = _write(tmp_path, ds)
    err = _refused(paths, REFUSE, "gap")
    assert "5.000 mm" in err.message
    vol = assemble_volume(paths, RESAMPLE)
    assert vol.shape == (10, 16, 20) and vol.spacing[0] == pytest.approx(2.5)
    expected = hu[::-1].copy()
    expected[5] = (hu[3] + hu[5]) / 2  # output index 5 is z index 4: mean of its neighbours
    np.testing.assert_allclose(vol.array, expected, atol=1e-3)
    assert any("resampled" in n for n in vol.notes)
    assert len(vol.slice_refs) == 10
    assert {r.sop_instance_uid for r in vol.slice_refs} <= {d.SOPInstanceUID for d in ds}


def test_gap_too_wide_refused_even_when_resampling(tmp_path: Path) -> None:
    ds = make_series(hu_phantom(12))
    del ds[3:7]  # four missing slices: 5 spacings > max_gap_slices=3
    _refused(_write(tmp_path, ds), RESAMPLE, "gap")


def test_uneven_spacing_refused_or_resampled_linearly(tmp_path: Path) -> None:
    zs = [0.0, 2.0, 4.5, 6.5, 9.0, 11.0, 13.5, 15.5, 18.0]
    hu = np.stack([np.full((8, 8), 10.0 * z - 500.0, np.float32) for z in zs])  # linear in z
    ds = make_series(hu, [(0.0, 0.0, z) for z in zs], intercept=-1024.0, slope=0.5)
    paths = _write(tmp_path, ds)
    _refused(paths, REFUSE, "uneven_spacing")
    vol = assemble_volume(paths, RESAMPLE)
    n = vol.shape[0]
    dz = vol.spacing[0]
    assert dz * (n - 1) == pytest.approx(18.0)
    grid = 18.0 - np.arange(n) * dz
    np.testing.assert_allclose(vol.array[:, 3, 3], 10.0 * grid - 500.0, atol=1e-2)
    np.testing.assert_allclose(vol.affine[:3, 3], (0.0, 0.0, 18.0))


def test_gantry_tilt_refused_or_sheared_back(tmp_path: Path) -> None:
    n, rows, cols = 6, 24, 20
    hu = np.full((n, rows, cols), -1000.0, np.float32)
    # A rod at fixed patient (x, y): the tilted stack sees it one row lower on each slice.
    positions = [(-50.0, -60.0 - 0.7 * k, -100.0 + 2.5 * k) for k in range(n)]
    for k in range(n):
        hu[k, 8 + k, 5] = 1000.0
    ds = make_series(hu, positions, pixel_spacing=(0.7, 0.8), gantry_tilt=15.0)
    paths = _write(tmp_path, ds)
    err = _refused(paths, REFUSE, "tilt")
    assert "in-plane" in err.message
    vol = assemble_volume(paths, RESAMPLE)
    assert vol.shape == (n, rows, cols)
    # After correction the rod sits in one voxel column through the whole stack.
    peaks = {np.unravel_index(np.argmax(vol.array[k]), (rows, cols)) for k in range(n)}
    assert len(peaks) == 1
    assert np.allclose(vol.array.max(axis=(1, 2)), 1000.0)
    aff = vol.affine[:3, :3]
    assert abs(float(aff[:, 0] @ aff[:, 1])) < 1e-9  # orthogonal grid
    np.testing.assert_allclose(vol.affine[:3, 3], positions[-1])  # first output slice anchors
    assert vol.spacing[0] == pytest.approx(2.5)
    assert any("tilt" in note for note in vol.notes)


def test_duplicate_positions_keep_lowest_instance_number(tmp_path: Path) -> None:
    hu = hu_phantom(8)
    ds = make_series(hu)
    dup = make_series(hu + 5.0, study_uid=ds[0].StudyInstanceUID, series_uid=ds[0].SeriesInstanceUID)
    for d in dup:
        d.FrameOfReferenceUID = ds[0].FrameOfReferenceUID
        d.InstanceNumber += 100
    vol = assemble_volume(_write(tmp_path, ds + dup[2:5]), RESAMPLE)
    np.testing.assert_array_equal(vol.array, hu[::-1])
    assert any("duplicating" in n for n in vol.notes)


def test_two_acquisitions_overlapping_keep_the_larger(tmp_path: Path) -> None:
    hu = hu_phantom(10)
    ds = make_series(hu, acquisition_numbers=[1] * 10)
    second = make_series(
        hu[2:8] + 50.0,
        axial_positions(10)[2:8],
        acquisition_numbers=[2] * 6,
        study_uid=ds[0].StudyInstanceUID,
        series_uid=ds[0].SeriesInstanceUID,
    )
    for d in second:
        d.FrameOfReferenceUID = ds[0].FrameOfReferenceUID
    vol = assemble_volume(_write(tmp_path, ds + second), RESAMPLE)
    np.testing.assert_array_equal(vol.array, hu[::-1])
    assert any("kept acquisition 1" in n for n in vol.notes)


def test_two_acquisitions_side_by_side_are_combined(tmp_path: Path) -> None:
    hu = hu_phantom(10)
    ds = make_series(hu, acquisition_numbers=[1] * 5 + [2] * 5)
    vol = assemble_volume(_write(tmp_path, ds), RESAMPLE)
    np.testing.assert_array_equal(vol.array, hu[::-1])
    assert any("combined 2" in n for n in vol.notes)


def test_orientation_mismatch_refused(tmp_path: Path) -> None:
    iops = [(1.0, 0.0, 0.0, 0.0, 1.0, 0.0)] * 6
    iops[3] = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    _refused(_write(tmp_path, make_series(hu_phantom(6), orientations=iops)), RESAMPLE, "orientation_mismatch")


def test_mixed_geometry_refused(tmp_path: Path) -> None:
    a = make_series(hu_phantom(3, rows=16))
    b = make_series(hu_phantom(3, rows=18), axial_positions(6)[3:], series_uid=a[0].SeriesInstanceUID)
    for d in b:
        d.FrameOfReferenceUID = a[0].FrameOfReferenceUID
    _refused(_write(tmp_path, a + b), RESAMPLE, "mixed_geometry")
    c = make_series(hu_phantom(4))
    c[2].PixelSpacing = [0.9, 0.8]
    _refused(_write(tmp_path, c, "c"), RESAMPLE, "mixed_geometry")


def test_mixed_series_refused(tmp_path: Path) -> None:
    _refused(_write(tmp_path, make_series(hu_phantom(2)) + make_series(hu_phantom(2))), RESAMPLE, "mixed_series")


def test_monochrome1_gives_the_same_hu(tmp_path: Path) -> None:
    hu = hu_phantom(4)
    m1 = assemble_volume(_write(tmp_path, make_series(hu, photometric="MONOCHROME1"), "m1"), RESAMPLE)
    m2 = assemble_volume(_write(tmp_path, make_series(hu), "m2"), RESAMPLE)
    np.testing.assert_array_equal(m1.array, m2.array)
    assert any("MONOCHROME1" in n for n in m1.notes)


def test_missing_rescale_assumptions(tmp_path: Path) -> None:
    hu = hu_phantom(3)
    unsigned = make_series(hu + 1024.0, slope=None, intercept=None, signed=False)
    vol = assemble_volume(_write(tmp_path, unsigned, "u"), RESAMPLE)
    np.testing.assert_array_equal(vol.array, hu[::-1])  # stored - 1024
    assert any("-1024" in n for n in vol.notes)
    signed = make_series(hu, slope=None, intercept=None, signed=True)
    vol = assemble_volume(_write(tmp_path, signed, "s"), RESAMPLE)
    np.testing.assert_array_equal(vol.array, hu[::-1])  # stored values are HU
    assert any("signed pixels taken as HU" in n for n in vol.notes)


def test_slope_and_intercept_per_slice(tmp_path: Path) -> None:
    hu = hu_phantom(3) * 2.0
    ds = make_series(hu, slope=2.0, intercept=-2048.0)
    ds[1].RescaleIntercept = -2000.0  # slice-specific intercept must be honoured
    vol = assemble_volume(_write(tmp_path, ds), RESAMPLE)
    expected = hu[::-1].copy()
    expected[1] += 48.0
    np.testing.assert_array_equal(vol.array, expected)


def test_bits_stored_below_allocated(tmp_path: Path) -> None:
    # signed 12-bit: sign extension from bit 11
    hu = np.array([[[-2048.0, -1.0], [0.0, 2047.0]]], np.float32)
    ds = make_series(hu, slope=1.0, intercept=0.0, signed=True, bits_stored=12)
    raw = np.frombuffer(ds[0].PixelData, np.int16) & 0x0FFF  # as a 12-bit writer leaves the top bits
    ds[0].PixelData = raw.astype(np.int16).tobytes()
    vol = assemble_volume(_write(tmp_path, ds, "s"), RESAMPLE)
    np.testing.assert_array_equal(vol.array[0], hu[0])
    # unsigned 12-bit with junk in the top bits (old overlay planes): masked off
    ds = make_series(np.array([[[-1024.0, 3071.0]]], np.float32), slope=1.0, intercept=-1024.0, bits_stored=12)
    junk = np.frombuffer(ds[0].PixelData, np.uint16) | 0xF000
    ds[0].PixelData = junk.astype(np.uint16).tobytes()
    vol = assemble_volume(_write(tmp_path, ds, "u"), RESAMPLE)
    np.testing.assert_array_equal(vol.array[0], [[-1024.0, 3071.0]])


def test_enhanced_multiframe_equals_single_frame_series(tmp_path: Path) -> None:
    hu = hu_phantom(7)
    order = [3, 0, 6, 1, 5, 2, 4]  # frames stored out of spatial order
    positions = [axial_positions(7)[i] for i in order]
    enh = make_enhanced(hu[order], positions)
    paths = write_series([enh], tmp_path / "e")
    vol = assemble_volume(paths, RESAMPLE)
    single = assemble_volume(_write(tmp_path, make_series(hu), "single"), RESAMPLE)
    np.testing.assert_array_equal(vol.array, single.array)
    np.testing.assert_allclose(vol.affine, single.affine)
    # frame numbers are 1-based and point back at the right frames
    expect_frames = [order.index(z) + 1 for z in range(6, -1, -1)]
    assert [r.frame_number for r in vol.slice_refs] == expect_frames
    assert {r.sop_instance_uid for r in vol.slice_refs} == {enh.SOPInstanceUID}
    assert len(read_slice_headers(paths)) == 7


def test_single_and_two_slice_series(tmp_path: Path) -> None:
    hu = hu_phantom(2)
    one = assemble_volume(_write(tmp_path, make_series(hu[:1]), "one"), RESAMPLE)
    assert one.shape == (1, 16, 20) and one.spacing[0] == 2.5  # SliceThickness
    assert any("single slice" in n for n in one.notes)
    two = assemble_volume(_write(tmp_path, make_series(hu, [(0, 0, 0), (0, 0, 3.0)]), "two"), RESAMPLE)
    assert two.shape == (2, 16, 20) and two.spacing[0] == pytest.approx(3.0)
    np.testing.assert_array_equal(two.array, hu[::-1])
    _refused(_write(tmp_path, make_series(hu), "few"), VolumeSection(min_slices=3), "too_few_slices")


def test_no_pixels_unreadable_and_truncated(tmp_path: Path) -> None:
    ds = make_series(hu_phantom(3))
    del ds[1].PixelData
    _refused(_write(tmp_path, ds, "np"), RESAMPLE, "no_pixels")
    bad = tmp_path / "garbage.dcm"
    bad.write_bytes(b"\x00" * 10)
    _refused([bad], RESAMPLE, "unreadable")
    ds = make_series(hu_phantom(3))
    paths = write_series(ds, tmp_path / "tr")
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:-100])
    _refused(paths, RESAMPLE, "decode_failed")


def test_missing_geometry_refused(tmp_path: Path) -> None:
    ds = make_series(hu_phantom(2))
    del ds[0].ImagePositionPatient
    _refused(_write(tmp_path, ds), RESAMPLE, "missing_geometry")


def test_volume_error_codes_are_checked() -> None:
    with pytest.raises(ValueError):
        VolumeError("not-a-code", "x")
    err = pickle.loads(pickle.dumps(VolumeError("gap", "a gap")))
    assert (err.code, err.message, str(err)) == ("gap", "a gap", "gap: a gap")


def test_headers_do_not_load_pixels(tmp_path: Path) -> None:
    ds = make_series(hu_phantom(2))
    paths = write_series(ds, tmp_path / "h")
    heads = read_slice_headers(paths)
    assert all(h.pixel_offset is not None and h.has_pixels for h in heads)
    raw = pydicom.dcmread(paths[0])
    assert heads[0].pixel_offset is not None
    n = raw.Rows * raw.Columns * 2
    with open(paths[0], "rb") as f:
        f.seek(heads[0].pixel_offset)
        assert f.read(n) == raw.PixelData


def test_near_identical_positions_are_duplicates(tmp_path: Path) -> None:
    hu = hu_phantom(5)
    ds = make_series(hu)
    extra = make_series(hu[2:3] + 9.0, [(-50.0, -60.0, -95.0 + 0.004)], series_uid=ds[0].SeriesInstanceUID)
    extra[0].FrameOfReferenceUID = ds[0].FrameOfReferenceUID
    extra[0].InstanceNumber = 99
    vol = assemble_volume(_write(tmp_path, ds + extra), REFUSE)  # not an "uneven" 0.004 mm step
    np.testing.assert_array_equal(vol.array, hu[::-1])


def test_localizer_mixed_in_is_dropped_by_selection_then_assembled(tmp_path: Path) -> None:
    hu = hu_phantom(6)
    ds = make_series(hu)
    scout = make_series(
        hu_phantom(1),
        [(-50.0, 0.0, 0.0)],
        orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0),  # a coronal scout
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        series_uid=ds[0].SeriesInstanceUID,
    )
    scout[0].FrameOfReferenceUID = ds[0].FrameOfReferenceUID
    paths = _write(tmp_path, ds + scout)
    _refused(paths, RESAMPLE, "orientation_mismatch")  # assembling everything would mis-stack
    choice = select(read_headers(paths), [RuleSection(name="ct", models=["m"])])
    assert isinstance(choice, Selection)
    vol = assemble_volume(list(choice.paths), RESAMPLE)
    np.testing.assert_array_equal(vol.array, hu[::-1])
