"""Orthanc as the PACS: Orthanc pushes studies to the node; the SR and SC come back into the same study.

Everything goes through the interfaces an admin would use: synthetic CT series are uploaded to
Orthanc over REST, Orthanc C-STOREs each study to the node (declared in Orthanc as modality
``medclf``), the node (Orthanc declared as its peer, result destination and an accepted calling AE)
classifies the series with the tiny int8 test model and C-STOREs SR + SC back to Orthanc.  The
result is checked through Orthanc's REST API and by reading the stored SR back with highdicom.

Needs a loopback-only network namespace (see tests/orthanc.py): ``tools/netns-loopback``.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from conftest import NODE_AE, free_port
from fixtures_models import phantom_volume, tiny_models_dir  # noqa: F401  (fixture)
from orthanc import ORTHANC_AE, REQUIRE_ENV, Orthanc, require_orthanc, running_orthanc

from medclf_node.synthetic.dicom_writer import write_ct_series

SHAPE = (24, 96, 96)
SPACING = (2.5, 3.5, 3.5)
NODULE = (30.0, 168.0, 100.0, 12.0)
PRESENT, ABSENT = "52101004", "2667000"
SC_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture Image Storage
}
RESULT_TIMEOUT = 60.0


def _series_by_modality(orthanc: Orthanc, study_id: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for series_id in orthanc.get_json(f"/studies/{study_id}")["Series"]:
        info = orthanc.get_json(f"/series/{series_id}")
        out[info["MainDicomTags"].get("Modality", "?")] = info
    return out


def _only_instance(orthanc: Orthanc, series: dict[str, Any]) -> pydicom.Dataset:
    (instance_id,) = series["Instances"]
    return pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance_id)))


def _finding(sr: pydicom.Dataset) -> tuple[str, float]:
    """The coded answer (SCT code value) and the probability of the SR's one measurement group."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    (group,) = report.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations()
    answer = evaluation.value
    assert isinstance(answer, hd.sr.CodedConcept)
    (prob,) = group.get_measurements()
    return str(answer.value), float(prob.value)


def test_orthanc_pushes_study_and_receives_sr_and_sc_in_same_study(
    node_factory: Any, tiny_models_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    require_orthanc()  # before starting a node for nothing
    dicom_port, http_port = free_port(), free_port()
    node = node_factory(
        peers=[{"name": "orthanc", "ae_title": ORTHANC_AE, "host": "127.0.0.1", "port": dicom_port}],
        accept={"calling_ae_titles": [ORTHANC_AE]},
        results={"destinations": ["orthanc"]},
        models={"directory": str(tiny_models_dir)},
        rules=[{"name": "ct", "models": ["test-2p5d-int8"], "min_slices": 3}],
        pipeline={"enabled": True},
        completion={"on_release": True, "quiet_seconds": 30.0},
        dispatch={"initial_backoff_seconds": 0.2},
    )
    modalities = {"medclf": (NODE_AE, "127.0.0.1", node.port)}
    with running_orthanc(tmp_path / "orthanc", dicom_port=dicom_port, http_port=http_port,
                         modalities=modalities) as orthanc:
        # Orthanc -> node C-ECHO, and the node's admin command against Orthanc
        assert orthanc.post_json("/modalities/medclf/echo", {}) == {}
        peers = subprocess.run([sys.executable, "-m", "medclf_node.cli", "peers", "--config", str(node.config)],
                               capture_output=True, text=True, timeout=60)
        assert peers.returncode == 0, peers.stdout + peers.stderr
        (row,) = [line for line in peers.stdout.splitlines() if line.startswith("orthanc ")]
        assert ORTHANC_AE in row and f"127.0.0.1:{dicom_port}" in row and row.endswith("ok")

        studies: dict[str, tuple[str, pydicom.Dataset]] = {}
        for name, nodule in (("pos", True), ("neg", False)):
            hu = phantom_volume(SHAPE, SPACING, NODULE if nodule else None, seed=5)
            paths = write_ct_series(hu, SPACING, tmp_path / name, patient_id=f"P-{name}", uid_seed=name)
            answers = orthanc.upload(paths)
            assert {a["Status"] for a in answers} == {"Success"}
            (study_id,) = {a["ParentStudy"] for a in answers}
            studies[name] = (study_id, pydicom.dcmread(paths[0], stop_before_pixels=True))
            # Orthanc C-STOREs the whole study to the node; synchronous: returns when sent
            job = orthanc.post_json("/modalities/medclf/store",
                                    {"Resources": [study_id], "Synchronous": True}, timeout=120)
            assert job["InstancesCount"] == len(paths) and job["FailedInstancesCount"] == 0, job

        def results_arrived() -> bool:
            return all(len(orthanc.get_json(f"/studies/{sid}")["Series"]) >= 3 for sid, _ in studies.values())

        assert orthanc.wait_for(results_arrived, RESULT_TIMEOUT), node.log()[-4000:]

        for name, (study_id, src) in studies.items():
            series = _series_by_modality(orthanc, study_id)
            assert len(orthanc.get_json(f"/studies/{study_id}")["Series"]) == 3, "CT + SR + SC, nothing else"
            assert "CT" in series and "SR" in series, sorted(series)
            assert len(series["CT"]["Instances"]) == SHAPE[0]
            (sc_modality,) = set(series) - {"CT", "SR"}

            sr = _only_instance(orthanc, series["SR"])
            assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
            assert sr.SeriesInstanceUID != src.SeriesInstanceUID
            answer, probability = _finding(sr)
            assert answer == (PRESENT if name == "pos" else ABSENT), (name, probability)
            assert (probability >= 0.5) == (name == "pos")

            sc = _only_instance(orthanc, series[sc_modality])
            assert sc.SOPClassUID in SC_SOP_CLASSES
            assert sc.PatientID == src.PatientID
            assert sc.StudyInstanceUID == src.StudyInstanceUID
            assert sc.SeriesInstanceUID not in {src.SeriesInstanceUID, sr.SeriesInstanceUID}


_GUARD_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import pytest
from orthanc import require_orthanc
try:
    require_orthanc()
except pytest.fail.Exception as exc:
    print(exc); sys.exit(3)
except pytest.skip.Exception as exc:
    print(exc); sys.exit(4)
sys.exit(0)
"""


def _probe_guard(extra_interface: bool, require: bool) -> subprocess.CompletedProcess[str]:
    """Run ``require_orthanc`` in a fresh network namespace (lo only, or lo + a veth pair)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2)")
    setup = "ip link set lo up" + (" && ip link add v0 type veth peer name v1" if extra_interface else "")
    env = {**os.environ, REQUIRE_ENV: "1" if require else "0"}
    script = f'{setup} || exit 99; exec "$@"'
    cmd = ["unshare", "--net", "--map-root-user", "sh", "-c", script, "sh",
           sys.executable, "-c", _GUARD_PROBE, str(Path(__file__).parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    if proc.returncode not in (0, 3, 4):
        pytest.skip(f"cannot create a network namespace here: {proc.stderr.strip()[-300:]}")
    return proc


def test_orthanc_guard_refuses_a_namespace_with_other_interfaces() -> None:
    skipped = _probe_guard(extra_interface=True, require=False)
    assert skipped.returncode == 4 and "netns-loopback" in skipped.stdout, skipped
    failed = _probe_guard(extra_interface=True, require=True)
    assert failed.returncode == 3 and REQUIRE_ENV in failed.stdout, failed


@pytest.mark.skipif(shutil.which("Orthanc") is None, reason="Orthanc not installed")
def test_orthanc_guard_allows_a_loopback_only_namespace() -> None:
    allowed = _probe_guard(extra_interface=False, require=True)
    assert allowed.returncode == 0, allowed
