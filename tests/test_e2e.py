"""End to end through the CLI: DCMTK storescu -> node -> SR + SC at a real destination SCP.

The node runs as a subprocess (`medclf-node serve`) with the tiny test models; the destination
is a pynetdicom SCP in this process.  Results are read back with highdicom and validated with
dciodvfy and dsrdump, as a PACS and a viewer would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from conftest import SENDER_AE, free_port, needs_dcmtk, storescu
from fixtures_models import phantom_volume, tiny_models_dir  # noqa: F401  (fixture)

from medclf_node.net.receiver import StoringReceiver
from medclf_node.synthetic.dicom_writer import write_ct_series

SHAPE = (24, 96, 96)
SPACING = (2.5, 3.5, 3.5)
NODULE = (30.0, 168.0, 100.0, 12.0)
PRESENT, ABSENT = "52101004", "2667000"


def dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture
def receiver(tmp_path: Path) -> Any:
    r = StoringReceiver("PACS", free_port(), tmp_path / "pacs")
    yield r
    r.stop()


def _node(node_factory: Any, models: Path, receiver: StoringReceiver, **extra: Any) -> Any:
    return node_factory(
        peers=[
            {"name": "scanner", "ae_title": SENDER_AE, "host": "127.0.0.1", "port": free_port()},
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": receiver.port},
        ],
        results={"destinations": ["pacs"]},
        models={"directory": str(models)},
        rules=[{"name": "ct", "models": ["test-2p5d-int8"], "min_slices": 3}],
        pipeline={"enabled": True},
        completion={"on_release": True, "quiet_seconds": 30.0},
        dispatch={"initial_backoff_seconds": 0.2},
        **extra,
    )


@needs_dcmtk
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
def test_storescu_to_sr_and_sc_at_destination(
    node_factory: Any, tiny_models_dir: Path, receiver: StoringReceiver, tmp_path: Path  # noqa: F811
) -> None:
    node = _node(node_factory, tiny_models_dir, receiver)
    series: dict[str, list[Path]] = {}
    for name, nodule in (("pos", True), ("neg", False)):
        hu = phantom_volume(SHAPE, SPACING, NODULE if nodule else None, seed=5)
        series[name] = write_ct_series(hu, SPACING, tmp_path / name, patient_id=f"P-{name}", uid_seed=name)
        proc = storescu(node.port, tmp_path / name)
        assert proc.returncode == 0, proc.stderr

    assert receiver.wait_for(lambda r: len(r.counts) >= 4, timeout=90), node.log()
    srs, scs = receiver.of_modality("SR"), [d for d in receiver.datasets.values() if d.Modality != "SR"]
    assert len(srs) == 2 and len(scs) == 2
    assert all(n == 1 for n in receiver.counts.values()), "each object delivered once"

    for name, paths in series.items():
        src = pydicom.dcmread(paths[0], stop_before_pixels=True)
        (sr_ds,) = [d for d in srs if d.PatientID == src.PatientID]
        sr = hd.sr.srread(receiver.paths[str(sr_ds.SOPInstanceUID)])
        assert sr.StudyInstanceUID == src.StudyInstanceUID, "result goes into the source study"
        assert sr.SeriesInstanceUID != src.SeriesInstanceUID
        evidence = {
            i.ReferencedSOPInstanceUID
            for st in sr.CurrentRequestedProcedureEvidenceSequence
            for se in st.ReferencedSeriesSequence
            for i in se.ReferencedSOPSequence
        }
        assert evidence == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
        report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
        assert isinstance(report, hd.sr.MeasurementReport)
        (group,) = report.get_image_measurement_groups()
        (evaluation,) = group.get_qualitative_evaluations()
        answer = evaluation.value
        assert isinstance(answer, hd.sr.CodedConcept)
        assert answer.value == (PRESENT if name == "pos" else ABSENT)
        (prob,) = group.get_measurements()
        assert 0.0 <= prob.value <= 1.0
        assert (prob.value >= 0.5) == (name == "pos")
        (key_ref,) = group.source_images
        assert key_ref.referenced_sop_instance_uid in evidence

    for uid, path in receiver.paths.items():
        assert dciodvfy_errors(path) == [], f"{uid} does not validate"
    for ds in srs:
        dump = subprocess.run(["dsrdump", str(receiver.paths[str(ds.SOPInstanceUID)])],
                              capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0 and "Pulmonary nodule" in dump.stdout

    rejected = subprocess.run(["echoscu", "-aet", "STRANGER", "-aec", "MEDCLF", "127.0.0.1", str(node.port)],
                              capture_output=True, text=True, timeout=30)
    assert rejected.returncode != 0, "an unknown calling AE title is rejected"
    _check_metrics_and_audit(node, n_instances=sum(len(p) for p in series.values()))

    jobs = subprocess.run([sys.executable, "-m", "medclf_node.cli", "jobs", "--config", str(node.config)],
                          capture_output=True, text=True, timeout=60)
    assert jobs.returncode == 0, jobs.stderr
    assert jobs.stdout.count("sent") >= 2
    assert "test-2p5d-int8" in jobs.stdout


def _check_metrics_and_audit(node: Any, n_instances: int) -> None:
    """The operator's view of the same run: Prometheus counters moved, the audit trail tells the
    story, and neither contains patient data."""
    from prometheus_client.parser import text_string_to_metric_families

    port = int((node.data_dir / "metrics.port").read_text())
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{base}/readyz", timeout=10) as rsp:
        assert rsp.status == 200
    with opener.open(f"{base}/metrics", timeout=10) as rsp:
        text = rsp.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text) for s in fam.samples
    }
    assert samples[("medclf_instances_received_total", ())] == n_instances
    assert samples[("medclf_associations_total", (("reason", "ok"), ("result", "accepted")))] >= 2
    assert samples[("medclf_associations_total", (("reason", "calling_ae_not_allowed"), ("result", "rejected")))] == 1
    assert samples[("medclf_series_state", (("state", "sent"),))] == 2
    assert samples[("medclf_stage_seconds_count", (("stage", "inference"),))] == 2
    assert samples[("medclf_models_loaded", ())] == 1

    audit_text = (node.data_dir / "audit.jsonl").read_text()
    events = [json.loads(line) for line in audit_text.splitlines()]
    kinds = [(e["event"], e.get("action")) for e in events]
    assert ("association", "accepted") in kinds
    rejected = [e for e in events if e["event"] == "association" and e["action"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["calling_ae"] == "STRANGER"
    assert kinds.count(("series", "received")) == 2
    assert kinds.count(("series", "completed")) == 2
    assert kinds.count(("model_run", None)) == 2
    assert kinds.count(("object", "sent")) == 4
    assert "P-pos" not in audit_text and "P-neg" not in audit_text, "no patient IDs in the audit trail"


def test_serve_refuses_to_start_when_a_rule_names_a_missing_model(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[node]\nport = 0\ndata_dir = "{tmp_path / "data"}"\n'
        f'[models]\ndirectory = "{tmp_path / "models"}"\n'
        '[[rules]]\nname = "ct"\nmodels = ["nope"]\n'
    )
    (tmp_path / "models").mkdir()
    proc = subprocess.run([sys.executable, "-m", "medclf_node.cli", "serve", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no model named ['nope']" in proc.stderr
