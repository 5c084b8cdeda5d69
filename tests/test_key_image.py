"""The Secondary Capture key image reads right: precision, heat scale, orientation, position, scale.

A radiologist glancing at it must not take a negative study's heat map for a finding, nor a
0.996 for certainty, and must know which side is which, where the slice is and how big
things are.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.dataset import Dataset
from test_reporting import COLS, IDENTITY, KEY, ROWS, ct_series, hot_heatmap, key_hu, model_result

from medclf_node.domain import ModelResult, SliceRef, Volume
from medclf_node.reporting import build_sc, slice_info_from_volume
from medclf_node.reporting.sc import (
    SliceInfo,
    banner_lines,
    format_probability,
    key_image_layout,
    orientation_marks,
    render_key_image,
    sc_series_description,
    slice_info_from_source,
)


def _picture(sc: Dataset) -> npt.NDArray[np.uint8]:
    return np.asarray(sc.pixel_array, dtype=np.uint8)


def _slice_pixels(img: npt.NDArray[np.uint8], result: ModelResult) -> npt.NDArray[np.uint8]:
    layout = key_image_layout((ROWS, COLS), result)
    ys, xs = layout.image_box(ROWS, COLS)
    return img[ys, xs][:: layout.scale, :: layout.scale]


def _coloured(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Pixels that are not grey (R, G, B differ): the heat overlay."""
    c = rgb.astype(int)
    return (np.abs(c[..., 0] - c[..., 1]) > 8) | (np.abs(c[..., 1] - c[..., 2]) > 8)


@pytest.mark.parametrize(("p", "text"), [
    (0.996, "0.996"), (0.99609375, "0.996"), (0.9994, "0.999"), (0.9996, "> 0.999"), (1.0, "> 0.999"),
    (0.5, "0.500"), (0.273, "0.273"), (0.0004, "< 0.001"), (0.0, "< 0.001"),
])
def test_probability_printed_with_its_precision(p: float, text: str) -> None:
    assert format_probability(p) == text
    assert f"p = {text}" in banner_lines(model_result(p))[0]


def test_banner_never_rounds_to_certainty() -> None:
    line = banner_lines(model_result(0.996))[0]
    assert "1.00" not in line and "0.996" in line


def test_negative_study_is_not_painted() -> None:
    """p below threshold: no overlay at all, whatever the map holds, and the picture says so."""
    strong = hot_heatmap()  # peak 1.0 where the model looked
    neg = replace(model_result(0.273), heatmap=strong)
    img = _slice_pixels(render_key_image(key_hu(), neg), neg)
    assert not _coloured(img).any()
    sc = build_sc(ct_series()[KEY], key_hu(), neg, IDENTITY)
    assert "no heat map: p below threshold" in sc.ImageComments


def test_heat_is_on_an_absolute_scale() -> None:
    """A weak map (drop 0.15 at most) stays uncoloured: the map is not stretched to its own peak."""
    weak = replace(model_result(0.93), heatmap=(0.15 * hot_heatmap()).astype(np.float32))
    assert not _coloured(_slice_pixels(render_key_image(key_hu(), weak), weak)).any()
    strong = replace(model_result(0.93), heatmap=(0.9 * hot_heatmap()).astype(np.float32))
    coloured = _coloured(_slice_pixels(render_key_image(key_hu(), strong), strong))
    assert coloured.any()
    ys, xs = np.nonzero(coloured)  # the colour sits where the map is hot
    assert abs(ys.mean() - 20) < 2 and abs(xs.mean() - 40) < 2


def test_orientation_marks_from_patient_orientation() -> None:
    assert orientation_marks(("L", "P")) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert orientation_marks(("R", "A")) == {"left": "L", "right": "R", "top": "P", "bottom": "A"}
    assert orientation_marks(("LP", "F")) == {"left": "RA", "right": "LP", "top": "H", "bottom": "F"}


def _margin_patch(img: npt.NDArray[np.uint8], result: ModelResult, side: str) -> npt.NDArray[np.uint8]:
    layout = key_image_layout((ROWS, COLS), result)
    ys, xs = layout.image_box(ROWS, COLS)
    m = layout.margin
    cy, cx = (ys.start + ys.stop) // 2, (xs.start + xs.stop) // 2
    if side == "left":
        return img[cy - m: cy + m, 0:m]
    if side == "right":
        return img[cy - m: cy + m, xs.stop: xs.stop + m]
    if side == "top":
        return img[ys.start - m: ys.start, cx - m: cx + m]
    return img[ys.stop: ys.stop + m, cx - m: cx + m]


def test_orientation_letters_are_drawn_beside_the_slice() -> None:
    r = model_result()
    lp = render_key_image(key_hu(), r, orientation=("L", "P"))
    rp = render_key_image(key_hu(), r, orientation=("R", "P"))
    for side in ("left", "right", "top", "bottom"):
        assert (_margin_patch(lp, r, side).max(axis=-1) > 200).sum() > 10, side  # a letter is there
    # ("L","P") shows "R" on the left; ("R","P") shows "R" on the right: the same glyph
    assert np.array_equal(_margin_patch(lp, r, "left"), _margin_patch(rp, r, "right"))
    assert not np.array_equal(_margin_patch(lp, r, "left"), _margin_patch(lp, r, "right"))
    # the slice's own pixels carry no marks
    assert np.array_equal(_slice_pixels(lp, r), _slice_pixels(render_key_image(key_hu(), r), r))


def test_slice_number_position_and_spacing_from_the_source() -> None:
    info = slice_info_from_source(ct_series()[KEY], KEY)
    assert info == SliceInfo(number=KEY + 1, instance_number=KEY + 1, position_mm=-100.0 + 2.5 * KEY,
                             pixel_spacing=(5.0, 5.0))
    coronal = ct_series()[KEY]
    coronal.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    info = slice_info_from_source(coronal, KEY)
    assert info.position_mm is None and info.pixel_spacing is None  # not the displayed slice's geometry


def test_scale_bar_length_matches_pixel_spacing() -> None:
    r = model_result()
    layout = key_image_layout((ROWS, COLS), r)
    img = render_key_image(key_hu(), r, info=SliceInfo(number=4, position_mm=-92.5, pixel_spacing=(5.0, 5.0)))
    ys, xs = layout.image_box(ROWS, COLS)
    footer = img[ys.stop + layout.margin:]
    white = (footer.min(axis=-1) > 240)
    longest = max(_longest_run(row) for row in white)
    # 64 px at 5 mm, enlarged x8: 0.625 mm per picture pixel; a 50 mm bar is 80 px long
    assert layout.scale == 8 and longest == 80
    without = render_key_image(key_hu(), r, info=SliceInfo(number=4))
    assert max(_longest_run(row) for row in without[ys.stop + layout.margin:].min(axis=-1) > 240) < 40


def _longest_run(row: npt.NDArray[np.bool_]) -> int:
    best = run = 0
    for v in row:
        run = run + 1 if v else 0
        best = max(best, run)
    return best


def test_series_description_is_shortened_at_a_word_boundary() -> None:
    desc = sc_series_description(model_result())
    assert desc == "AI result \u2014 not for primary diagnosis key image"  # was "...key image (nodule-2p5d-i"
    assert len(desc.encode()) <= 64
    short = replace(model_result(), model_name="n3d")
    assert sc_series_description(short) == "AI result \u2014 not for primary diagnosis key image (n3d)"


def _dciodvfy(ds: Dataset, path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(("Error", "Warning"))]


@pytest.mark.parametrize("p", [0.996, 0.273])
def test_key_image_validates_without_errors_or_warnings(p: float, tmp_path: Path) -> None:
    sc = build_sc(ct_series()[KEY], key_hu(), model_result(p), IDENTITY, orientation=("L", "P"))
    assert _dciodvfy(sc, tmp_path / "sc.dcm") == []
    assert sc.PatientOrientation == ["L", "P"]
    assert sc.SeriesNumber == 9902


def test_slice_info_from_the_volume_geometry() -> None:
    """The pipeline's way: exact for any acquisition plane, from the canonical volume's affine."""
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, -2.5)  # slice index runs toward the feet
    affine[:3, 1] = (0.0, 0.8, 0.0)
    affine[:3, 2] = (0.7, 0.0, 0.0)
    affine[:3, 3] = (-180.0, -160.0, 40.0)
    refs = tuple(SliceRef("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{i}") for i in range(10))
    vol = Volume(np.zeros((10, 4, 4), np.float32), (2.5, 0.8, 0.7), affine, refs, "1.2.3", "1.2.3.4")
    assert slice_info_from_volume(vol, 4) == SliceInfo(number=5, position_mm=30.0, pixel_spacing=(0.8, 0.7))
