"""End to end for 2D image models: RGB JPEG (YBR_FULL_422) OP photographs sent by DCMTK storescu to
the node (a subprocess), routed by an OP rule to the tiny ordinal grading model, reported per image
and summarised (worst grade) in an SR and an SC that reach a destination SCP and pass dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from conftest import SENDER_AE, free_port, needs_dcmtk, storescu
from fixtures_image_models import GRADES, coloured, image_models_dir, op_image  # noqa: F401  (fixture)
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from stores import open_test_store

from medclf_node.net.receiver import StoringReceiver


def _dciodvfy(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(("Error", "Warning"))]


@pytest.fixture
def receiver(tmp_path: Path) -> Any:
    r = StoringReceiver("PACS", free_port(), tmp_path / "pacs")
    yield r
    r.stop()


@needs_dcmtk
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
def test_storescu_fundus_pair_to_graded_sr_and_key_image(
    node_factory: Any, image_models_dir: Path, receiver: StoringReceiver, tmp_path: Path  # noqa: F811
) -> None:
    node = node_factory(
        peers=[
            {"name": "scanner", "ae_title": SENDER_AE, "host": "127.0.0.1", "port": free_port()},
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": receiver.port},
        ],
        results={"destinations": ["pacs"]},
        models={"directory": str(image_models_dir)},
        rules=[
            {"name": "ct", "models": ["test-findings"], "modality": ["CT"]},
            {"name": "fundus", "models": ["test-dr-grade"], "modality": ["OP"], "laterality": ["R", "L"],
             "body_part_examined": ["EYE"]},
        ],
        pipeline={"enabled": True},
        completion={"on_release": True, "quiet_seconds": 30.0},
        dispatch={"initial_backoff_seconds": 0.2},
    )
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / "op"
    folder.mkdir()
    right = op_image(folder / "r.dcm", coloured((0.5, 0.3, 0.2), size=96, seed=1), study_uid=study,
                     series_uid=series, laterality="R", instance=1)  # grade 2
    left = op_image(folder / "l.dcm", coloured((0.8, 0.3, 0.2), size=96, seed=2), study_uid=study,
                    series_uid=series, laterality="L", instance=2)  # grade 3
    proc = storescu(node.port, folder, extra=["-xy"])  # propose JPEG baseline: the files go as they are
    assert proc.returncode == 0, proc.stderr
    assert "JPEG Baseline -> JPEG Baseline" in proc.stdout + proc.stderr  # sent as stored

    assert receiver.wait_for(lambda r: len(r.counts) >= 2, timeout=90), node.log()
    (sr_ds,) = receiver.of_modality("SR")
    (sc_ds,) = [d for d in receiver.datasets.values() if d.Modality != "SR"]
    sr = hd.sr.srread(receiver.paths[str(sr_ds.SOPInstanceUID)])
    assert sr.StudyInstanceUID == study and sr.SeriesInstanceUID != series
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = list(report.get_image_measurement_groups())
    grades = []
    for g in groups:
        (evaluation,) = g.get_qualitative_evaluations()
        assert isinstance(evaluation.value, hd.sr.CodedConcept)
        grades.append(evaluation.value.value)
        assert len(g.get_measurements()) == len(GRADES)
    assert grades == [GRADES[2].value, GRADES[3].value, GRADES[3].value]  # right, left, series summary (worst)
    uids = {p.name: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (right, left)}
    assert [g.source_images[0].referenced_sop_instance_uid for g in groups] == [uids["r.dcm"], uids["l.dcm"],
                                                                                 uids["l.dcm"]]
    sc = pydicom.dcmread(receiver.paths[str(sc_ds.SOPInstanceUID)])
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == uids["l.dcm"] and sc.Laterality == "L"
    assert "Severe nonproliferative diabetic retinopathy" in sc.ImageComments
    for path in receiver.paths.values():
        assert _dciodvfy(path) == [], f"{path.name} does not validate"
    index = open_test_store(node.data_dir)
    try:
        (row,) = index.results(series)
    finally:
        index.close()
    assert (row.model_name, row.positive, row.key_slice_index) == ("test-dr-grade", True, 1)
    assert row.details["task"] == "multiclass" and [i["class"] for i in row.details["images"]] == [
        GRADES[2].meaning, GRADES[3].meaning]


@needs_dcmtk
def test_a_palette_colour_photograph_fails_its_series_with_a_reason_and_the_node_goes_on(
    node_factory: Any, image_models_dir: Path, receiver: StoringReceiver, tmp_path: Path  # noqa: F811
) -> None:
    node = node_factory(
        peers=[{"name": "scanner", "ae_title": SENDER_AE, "host": "127.0.0.1", "port": free_port()},
               {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": receiver.port}],
        results={"destinations": ["pacs"]},
        models={"directory": str(image_models_dir)},
        rules=[{"name": "photos", "models": ["test-dr-grade"], "modality": ["OP"]}],
        pipeline={"enabled": True},
        completion={"on_release": True, "quiet_seconds": 30.0},
    )
    palette = pydicom.dcmread(get_testdata_file("examples_palette.dcm", download=False))
    palette.Modality = "OP"  # an ultrasound file relabelled: what matters is its PALETTE COLOR pixels
    palette.StudyInstanceUID, palette.SeriesInstanceUID = generate_uid(), generate_uid()
    palette.SOPInstanceUID = palette.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    bad = tmp_path / "palette.dcm"
    palette.save_as(bad, enforce_file_format=True)
    assert storescu(node.port, bad).returncode == 0  # stored: decoding is the pipeline's business
    good_series = generate_uid()
    good = op_image(tmp_path / "good.dcm", coloured((0.5, 0.3, 0.2), size=64), study_uid=generate_uid(),
                    series_uid=good_series)
    assert storescu(node.port, good, extra=["-xy"]).returncode == 0
    assert receiver.wait_for(lambda r: len(r.of_modality("SR")) == 1, timeout=90), node.log()
    index = open_test_store(node.data_dir)
    try:
        row = index.get_series(str(palette.SeriesInstanceUID))
        assert row is not None and row.state == "failed" and row.reason_code == "unsupported_photometric"
        assert row.reason_text is not None and "PALETTE COLOR" in row.reason_text
        assert index.results(good_series)[0].positive
    finally:
        index.close()
