"""The SR's image region lands on the finding in the source image, in every patient position.

The node's volume is canonical (slice toward the feet, rows posterior, columns left), so a
heat-map peak at canonical (k, r, c) must be mapped back into the pixels of the source image
that contains it: flipped for prone/feet-first, another image and axis for coronal/sagittal.
Each case puts one bright voxel at a known canonical position, writes the series as a scanner
would, and checks that the SR's SCOORD POINT (read back from the written file) names a source
image whose pixel under the point is that voxel, at the same patient position.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from test_orientation import DICOM_ACQUISITIONS, SHAPE, write_dicom
from test_reporting import IDENTITY, NODULE, dciodvfy_errors

from medclf_node.config import VolumeSection
from medclf_node.domain import ModelResult
from medclf_node.ingest.volume import assemble_volume
from medclf_node.reporting import build_sr

PEAK = (5, 31, 12)  # canonical (slice, row, column) of the finding: off-centre on every axis
BRIGHT = 2000.0


def _result(key: int, heat_shape: tuple[int, int], peak: tuple[int, int] | None) -> ModelResult:
    heat = None
    if peak is not None:
        yy, xx = np.mgrid[: heat_shape[0], : heat_shape[1]]
        heat = np.exp(-((yy - peak[0]) ** 2 + (xx - peak[1]) ** 2) / 8.0).astype(np.float32)
    return ModelResult(model_name="nodule-test", model_version="1", finding=NODULE, probability=0.97,
                       threshold=0.5, positive=True, key_slice_index=key, heatmap=heat)


def _scoord(sr: Dataset) -> tuple[Dataset, Dataset]:
    """(probability NUM, its INFERRED FROM SCOORD) of the SR's one measurement group."""
    (group,) = [it for it in sr.ContentSequence if it.ValueType == "CONTAINER"][0].ContentSequence
    (num,) = [it for it in group.ContentSequence if it.ValueType == "NUM"]
    (scoord,) = num.ContentSequence  # only the image region: what OHIF draws
    return num, scoord


def _pixel_lps(ds: Dataset, x: float, y: float) -> npt.NDArray[np.float64]:
    """Patient position of SCOORD (x, y) in ``ds`` (pixel centre at +0.5)."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    ps = [float(v) for v in ds.PixelSpacing]
    ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    return ipp + (x - 0.5) * ps[1] * iop[:3] + (y - 0.5) * ps[0] * iop[3:]


@pytest.mark.parametrize("name", list(DICOM_ACQUISITIONS))
def test_region_is_on_the_finding_in_the_source_image(name: str, tmp_path: Path) -> None:
    hu = np.full(SHAPE, -800.0, np.float32)
    hu[PEAK] = BRIGHT
    paths, _ = write_dicom(hu, name, tmp_path / "ct")
    volume = assemble_volume(paths, VolumeSection())
    assert volume.array[PEAK] == BRIGHT
    k, r, c = PEAK
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    sources.sort(key=lambda ds: int(ds.InstanceNumber))
    sr = build_sr(sources, _result(k, volume.shape[1:], (r, c)), IDENTITY,
                  key_ref=volume.slice_refs[k], volume=volume)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    num, scoord = _scoord(pydicom.dcmread(path))

    assert scoord.RelationshipType == "INFERRED FROM" and scoord.GraphicType == "POINT"
    (image,) = scoord.ContentSequence
    assert image.RelationshipType == "SELECTED FROM"
    uid = image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    (src_path,) = [p for p, ds in zip(paths, [pydicom.dcmread(p) for p in paths], strict=True)
                   if ds.SOPInstanceUID == uid]
    src = pydicom.dcmread(src_path)
    x, y = (float(v) for v in scoord.GraphicData)
    expected = (volume.affine @ np.array([k, r, c, 1.0]))[:3]
    np.testing.assert_allclose(_pixel_lps(src, x, y), expected, atol=1e-3, err_msg=name)
    stored = src.pixel_array[int(y), int(x)] * float(src.RescaleSlope) + float(src.RescaleIntercept)
    assert stored == BRIGHT, (name, x, y)
    assert "ContentSequence" not in num or len(num.ContentSequence) == 1  # no algorithm modifiers on the NUM
    if name == "HFS":
        assert dciodvfy_errors(sr, tmp_path, "sr_hfs.dcm") == []


def test_without_heatmap_the_region_is_the_key_slice_centre(tmp_path: Path) -> None:
    hu = np.full(SHAPE, -800.0, np.float32)
    paths, _ = write_dicom(hu, "HFP", tmp_path / "ct")
    volume = assemble_volume(paths, VolumeSection())
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    k = 3
    sr = build_sr(sources, _result(k, volume.shape[1:], None), IDENTITY, key_ref=volume.slice_refs[k],
                  volume=volume)
    _, scoord = _scoord(sr)
    src = next(ds for ds in sources if ds.SOPInstanceUID == volume.slice_refs[k].sop_instance_uid)
    x, y = (float(v) for v in scoord.GraphicData)
    centre = (volume.affine @ np.array([k, (SHAPE[1] - 1) / 2, (SHAPE[2] - 1) / 2, 1.0]))[:3]
    np.testing.assert_allclose(_pixel_lps(src, x, y), centre, atol=1e-3)


def test_without_geometry_the_canonical_slice_is_the_image() -> None:
    """No volume passed (or no source geometry): heat-map (row, col) taken as the image's pixel."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.5", "CT"
    ds.Rows, ds.Columns = 32, 40
    sr = build_sr([ds], _result(0, (32, 40), (7, 30)), IDENTITY)
    _, scoord = _scoord(sr)
    assert [float(v) for v in scoord.GraphicData] == [30.5, 7.5]
