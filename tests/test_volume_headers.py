"""The fast header scan must agree with pydicom on everything it answers, and decline the rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from ctseries import hu_phantom, make_enhanced, make_series, write_series
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ImplicitVRLittleEndian, JPEGLSLossless, RLELossless, generate_uid

from medclf_node.config import VolumeSection
from medclf_node.ingest.dicom_scan import scan_header
from medclf_node.ingest.volume import assemble_volume
from medclf_node.ingest.volume_headers import WANTED, read_header_with_pydicom, read_slice_headers


def _nested_sequences(ds: Dataset) -> None:
    """Undefined-length sequences, nested two deep, before the attributes we need."""
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = generate_uid()
    inner = Dataset()
    inner.CodeValue = "1"
    inner.CodingSchemeDesignator = "99X"
    inner.CodeMeaning = "x"
    ref.PurposeOfReferenceCodeSequence = DicomSequence([inner])
    ds.ReferencedImageSequence = DicomSequence([ref, ref])
    ds.add_new(0x00091010, "OB", b"\x01" * 4000)  # a private binary blob
    ds.add_new(0x00091011, "SQ", DicomSequence([Dataset()]))  # an empty item


def _variants(tmp_path: Path) -> list[Path]:
    out: list[Path] = []
    plain = make_series(hu_phantom(1, 32, 32))[0]
    out += write_series([plain], tmp_path / "plain")
    seq = make_series(hu_phantom(1, 32, 32), photometric="MONOCHROME1", slope=None, intercept=None, signed=True)[0]
    _nested_sequences(seq)
    out += write_series([seq], tmp_path / "seq")
    implicit = make_series(hu_phantom(1, 32, 32))[0]
    _nested_sequences(implicit)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    out += write_series([implicit], tmp_path / "implicit")
    for i, syntax in enumerate((RLELossless, JPEGLSLossless)):
        packed = make_series(hu_phantom(1, 32, 32))[0]
        packed.compress(syntax)
        out += write_series([packed], tmp_path / f"packed{i}")
    return out


def test_fast_path_equals_pydicom_on_crafted_files(tmp_path: Path) -> None:
    for path in _variants(tmp_path):
        assert scan_header(path, WANTED) is not None, path
        assert read_slice_headers([path]) == read_header_with_pydicom(path), path


@pytest.mark.parametrize(
    "name",
    ["CT_small.dcm", "693_UNCI.dcm", "693_J2KR.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm",
     "MR_small_bigendian.dcm", "eCT_Supplemental.dcm", "MR2_UNCR.dcm", "JPEG-LL.dcm"],
)
def test_fast_path_equals_pydicom_on_bundled_files(name: str) -> None:
    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"{name} not installed")
    path = Path(str(found))
    assert read_slice_headers([path]) == read_header_with_pydicom(path)


def test_scan_declines_what_it_cannot_answer(tmp_path: Path) -> None:
    big_endian = get_testdata_file("MR_small_bigendian.dcm", download=False)
    assert big_endian is not None and scan_header(Path(str(big_endian)), WANTED) is None
    no_preamble = tmp_path / "raw.dcm"
    pydicom.dcmwrite(no_preamble, make_series(hu_phantom(1))[0], enforce_file_format=False, write_like_original=True)
    data = no_preamble.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[132:])  # strip preamble + DICM
    assert scan_header(tmp_path / "cut.dcm", WANTED) is None
    huge = make_series(hu_phantom(1))[0]
    huge.add_new(0x00091010, "OB", b"\x00" * 100_000)  # header longer than the first read
    path = write_series([huge], tmp_path / "huge")[0]
    assert scan_header(path, WANTED) is None
    assert read_slice_headers([path]) == read_header_with_pydicom(path)  # still correct via pydicom


def test_multiframe_goes_through_pydicom(tmp_path: Path) -> None:
    path = write_series([make_enhanced(hu_phantom(3))], tmp_path / "e")[0]
    heads = read_slice_headers([path])
    assert [h.frame_index for h in heads] == [0, 1, 2]
    assert heads == read_header_with_pydicom(path)


def test_volume_from_crafted_variants_matches_pydicom_decode(tmp_path: Path) -> None:
    for path in _variants(tmp_path):
        vol = assemble_volume([path], VolumeSection())
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array.astype(np.float32)
        slope = float(ds.get("RescaleSlope", 1.0))
        intercept = float(ds.get("RescaleIntercept", 0.0 if ds.PixelRepresentation == 1 else -1024.0))
        np.testing.assert_array_equal(vol.array[0], stored * slope + intercept)
