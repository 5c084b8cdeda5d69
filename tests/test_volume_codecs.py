"""Pixel decoding paths: compressed transfer syntaxes, big endian, pydicom's bundled CT files.

HU from :func:`assemble_volume` are compared with a reference decode through pydicom's own
``pixel_array`` + modality LUT (or, for synthetic series, with the HU the series was built from).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from ctseries import hu_phantom, make_enhanced, make_series, write_series
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from medclf_node.config import VolumeSection
from medclf_node.ingest.volume import VolumeError, assemble_volume

POLICY = VolumeSection()


def _bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return Path(str(path))


def _reference_hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    return arr[None] if arr.ndim == 2 else arr


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda u: u.name)
def test_compressed_series_equals_uncompressed(tmp_path: Path, syntax: pydicom.uid.UID) -> None:
    hu = hu_phantom(5, rows=32, cols=32)
    plain = make_series(hu)
    packed = make_series(hu)
    for d in packed:
        d.compress(syntax)
    ref = assemble_volume(write_series(plain, tmp_path / "plain"), POLICY)
    vol = assemble_volume(write_series(packed, tmp_path / "packed"), POLICY)
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_array_equal(vol.array, hu[::-1])


def test_compressed_enhanced_multiframe(tmp_path: Path) -> None:
    hu = hu_phantom(4, rows=32, cols=32)
    enh = make_enhanced(hu)
    enh.compress(RLELossless)
    vol = assemble_volume(write_series([enh], tmp_path / "e"), POLICY)
    np.testing.assert_array_equal(vol.array, hu[::-1])
    assert [r.frame_number for r in vol.slice_refs] == [4, 3, 2, 1]


def test_corrupt_compressed_pixels_refused(tmp_path: Path) -> None:
    ds = make_series(hu_phantom(2, rows=32, cols=32))
    for d in ds:
        d.compress(JPEGLSLossless)
    frames = pydicom.encaps.generate_frames(ds[1].PixelData, number_of_frames=1)
    junk = b"\xff\xd8" + b"\x13" * (len(next(iter(frames))) - 2)
    ds[1].PixelData = pydicom.encaps.encapsulate([junk])
    with pytest.raises(VolumeError) as info:
        assemble_volume(write_series(ds, tmp_path / "bad"), POLICY)
    assert info.value.code == "decode_failed"


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # CT, explicit little endian, signed
        "693_UNCI.dcm",  # CT 512x512, 14 of 16 bits stored, signed
        "693_UNCR.dcm",
        "693_J2KR.dcm",  # JPEG 2000 lossless
        "693_J2KI.dcm",  # JPEG 2000 lossy
        "MR_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR2_J2KR.dcm",
    ],
)
def test_bundled_files_match_pydicom_reference(name: str) -> None:
    path = _bundled(name)
    vol = assemble_volume([path], POLICY)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    # The reference in the node's canonical orientation (MR2_J2KR is an oblique sagittal slice).
    ref = hd.Volume.from_attributes(
        array=_reference_hu(path),
        image_position=[float(v) for v in ds.ImagePositionPatient],
        image_orientation=[float(v) for v in ds.ImageOrientationPatient],
        pixel_spacing=[float(v) for v in ds.PixelSpacing],
        spacing_between_slices=vol.spacing[int(np.argmax(np.array(vol.shape) == 1))],
        coordinate_system="PATIENT",
    ).to_patient_orientation("FPL")
    np.testing.assert_allclose(vol.array, ref.array, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)
    assert vol.spacing == pytest.approx(ref.spacing)


def test_big_endian_equals_little_endian() -> None:
    little = assemble_volume([_bundled("MR_small.dcm")], POLICY)
    big = assemble_volume([_bundled("MR_small_bigendian.dcm")], POLICY)
    np.testing.assert_array_equal(little.array, big.array)


def test_bundled_enhanced_ct_uses_functional_groups() -> None:
    path = _bundled("eCT_Supplemental.dcm")
    vol = assemble_volume([path], POLICY)
    ds = pydicom.dcmread(path)
    pvt = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    stored = ds.pixel_array.astype(np.float32)
    expected = stored * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)
    positions = [
        float(fg.PlanePositionSequence[0].ImagePositionPatient[2]) for fg in ds.PerFrameFunctionalGroupsSequence
    ]
    iop = [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient]
    assert iop[0] == -1.0  # columns run to the patient's right: the canonical array reverses them
    order = np.argsort([-p for p in positions], kind="stable")  # canonical: most superior slice first
    np.testing.assert_array_equal(vol.array, expected[order][:, :, ::-1])
    assert vol.spacing[1:] == pytest.approx((0.388672, 0.388672))
    assert [r.frame_number for r in vol.slice_refs] == [int(i) + 1 for i in order]


def test_files_without_geometry_refused() -> None:
    with pytest.raises(VolumeError) as info:
        assemble_volume([_bundled("JPEG-LL.dcm")], POLICY)  # secondary capture: no patient geometry
    assert info.value.code == "missing_geometry"
