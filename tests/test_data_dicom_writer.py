"""Synthetic CT series: dciodvfy-clean, byte-exact fast path, round trip through the node."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medclf_node.config import VolumeSection
from medclf_node.ingest.volume import assemble_volume
from medclf_node.synthetic.dicom_writer import TRANSFER_SYNTAXES, default_origin, hu_to_stored, write_ct_series
from medclf_node.synthetic.phantoms import Phantom, make_phantom
from training.data.truth import read_truth, truth_for_phantom, write_truth

SHAPE = (12, 64, 64)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(3, shape=SHAPE, spacing=(2.5, 5.6, 5.6), nodules=1)


def _expected_hu(hu: np.ndarray) -> np.ndarray:
    return hu_to_stored(hu).astype(np.float32) - 1024.0


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
@pytest.mark.parametrize("name", sorted(TRANSFER_SYNTAXES))
def test_dciodvfy_clean(phantom: Phantom, tmp_path: Path, name: str) -> None:
    paths = write_ct_series(
        phantom.hu[:3],
        phantom.spacing,
        tmp_path,
        patient_id=phantom.patient_id,
        transfer_syntax=TRANSFER_SYNTAXES[name],
    )
    assert len(paths) == 3
    for p in paths:
        res = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True, timeout=60)
        report = res.stdout + res.stderr
        assert "Error" not in report, report
        assert "CTImage" in report


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_fast_path_bytes_equal_pydicom(phantom: Phantom, tmp_path: Path, ts: str) -> None:
    (path,) = write_ct_series(phantom.hu[:1], phantom.spacing, tmp_path, patient_id="P1", transfer_syntax=ts)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ts
    ref = tmp_path / "ref.dcm"
    ds.save_as(ref, enforce_file_format=True)
    assert ref.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("name", sorted(TRANSFER_SYNTAXES))
def test_round_trip_through_assemble_volume(phantom: Phantom, tmp_path: Path, name: str) -> None:
    paths = write_ct_series(
        phantom.hu, phantom.spacing, tmp_path, patient_id=phantom.patient_id, transfer_syntax=TRANSFER_SYNTAXES[name]
    )
    rng = np.random.default_rng(0)
    vol = assemble_volume([paths[i] for i in rng.permutation(len(paths))], VolumeSection())
    assert vol.shape == SHAPE
    assert vol.spacing == pytest.approx(phantom.spacing)
    np.testing.assert_array_equal(vol.array, _expected_hu(phantom.hu))
    assert [r.sop_instance_uid for r in vol.slice_refs] == [pydicom.dcmread(p).SOPInstanceUID for p in paths]


def test_truth_coordinates_match_node_affine(phantom: Phantom, tmp_path: Path) -> None:
    origin = default_origin(SHAPE, phantom.spacing)
    paths = write_ct_series(phantom.hu, phantom.spacing, tmp_path / "s", patient_id=phantom.patient_id)
    vol = assemble_volume(paths, VolumeSection())
    truth = read_truth(write_truth(truth_for_phantom(phantom, origin=origin), tmp_path / "truth.json"))
    assert truth.label == 1 and len(truth.nodules) == 1 and truth.patient_id == phantom.patient_id
    n = truth.nodules[0]
    lps = vol.affine @ np.array([*n.center_zyx, 1.0])
    np.testing.assert_allclose(lps[:3], n.center_lps_mm, atol=1e-3)
    assert list(truth.slice_labels) == phantom.slice_labels.tolist()


def test_uid_seed_is_reproducible(phantom: Phantom, tmp_path: Path) -> None:
    a = write_ct_series(phantom.hu[:2], phantom.spacing, tmp_path / "a", patient_id="P", uid_seed="s1")
    b = write_ct_series(phantom.hu[:2], phantom.spacing, tmp_path / "b", patient_id="P", uid_seed="s1")
    c = write_ct_series(phantom.hu[:2], phantom.spacing, tmp_path / "c", patient_id="P", uid_seed="s2")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    da, dc = pydicom.dcmread(a[0]), pydicom.dcmread(c[0])
    assert da.SeriesInstanceUID != dc.SeriesInstanceUID and da.SOPInstanceUID != dc.SOPInstanceUID
    assert pydicom.dcmread(a[1]).SOPInstanceUID != da.SOPInstanceUID


def test_truth_rejects_inconsistent_sidecar(phantom: Phantom, tmp_path: Path) -> None:
    truth = truth_for_phantom(phantom, origin=(0.0, 0.0, 0.0))
    data = truth.model_dump(mode="json", by_alias=True)
    data["slice_labels"] = data["slice_labels"][:-1]
    bad = tmp_path / "bad.json"
    import json

    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="slice labels"):
        read_truth(bad)


def test_rejects_unsupported_transfer_syntax(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported transfer syntax"):
        write_ct_series(
            np.zeros((1, 8, 8)), (1, 1, 1), tmp_path, patient_id="P", transfer_syntax="1.2.840.10008.1.2.4.50"
        )
