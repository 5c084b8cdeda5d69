"""No patient data in any log, the audit trail, the metrics or the index (issue 15).

Studies carry a distinctive marker (``ZQX``) in every demographic field, in invalid dates and
in invalid UIDs; they go through the whole node (DCMTK storescu -> intake -> selection ->
volume -> inference -> SR/SC -> folder destination) at log level DEBUG.  Afterwards the marker
may appear only in DICOM objects (spool, outbox, results), nowhere else.  Before the fix the
node logged ``... not a valid UID: 'ZQXPRIVID4713'`` at WARNING.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import needs_dcmtk, storescu
from fixtures_models import tiny_models_dir  # noqa: F401  (fixture)
from intake_series import write_ct_series

from medclf_node.redact import RedactingFilter, describe, scrub

MARK = "ZQX"
PHI = {
    "PatientName": "ZQXDOE^ZQXJOHN",
    "PatientID": "ZQXPID4713",
    "PatientBirthDate": "19230417",  # dates cannot carry the marker: this one is grepped for too
    "PatientSex": "O",  # highdicom checks the enumeration; the invalid-values series below carries ZQXSEX
    "PatientAge": "ZQX1Y",
    "PatientAddress": "ZQX 1 Main Street",
    "PatientTelephoneNumbers": "ZQX555-0100",
    "OtherPatientIDs": "ZQXOTHERID",
    "PatientComments": "ZQX comment",
    "PatientBirthName": "ZQXMAIDEN",
    "PatientMotherBirthName": "ZQXMOTHER",
    "EthnicGroup": "ZQXETHNIC",
    "AccessionNumber": "ZQXACC123",
    "StudyID": "ZQXSTUDY",
    "StudyDescription": "ZQX study of ZQXDOE",
    "SeriesDescription": "ZQX series of ZQXDOE",
    "ReferringPhysicianName": "ZQXREFERRER",
    "PerformingPhysicianName": "ZQXPERFORMER",
    "OperatorsName": "ZQXOPERATOR",
    "InstitutionName": "ZQXHOSPITAL",
    "InstitutionAddress": "ZQX Hospital Road",
    "StationName": "ZQXSTATION",
    "AdmittingDiagnosesDescription": "ZQXDIAGNOSIS",
}


def _with_phi(paths: list[Path], **overrides: str) -> list[Path]:
    for p in paths:
        ds = pydicom.dcmread(p)
        for key, value in {**PHI, **overrides}.items():
            setattr(ds, key, value)
        if "SOPInstanceUID" in overrides:
            ds.file_meta.MediaStorageSOPInstanceUID = overrides["SOPInstanceUID"]
        ds.save_as(p, enforce_file_format=False)
    return paths


def _leaks(text: str) -> list[str]:
    return [line[:300] for line in text.splitlines() if MARK.lower() in line.lower() or "19230417" in line]


@needs_dcmtk
def test_no_patient_data_in_logs_audit_metrics_or_index(
    node_factory: Any, tiny_models_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    out = tmp_path / "results"
    node = node_factory(
        node={"log_level": "DEBUG"},
        folders=[{"name": "out", "path": str(out)}],
        results={"destinations": ["out"]},
        models={"directory": str(tiny_models_dir)},
        rules=[{"name": "ct", "models": ["test-2p5d-int8"], "min_slices": 3,
                "series_description_regex": "^Z.X (series|dates)"}],
        pipeline={"enabled": True},
        completion={"on_release": True},
        metrics={"port": 0},
    )
    good = _with_phi(write_ct_series(tmp_path / "good", 6, 64, 64, seed=7))
    bad_uids = [
        _with_phi(write_ct_series(tmp_path / f"bad{i}", 1, 32, 32, seed=8 + i), **{key: "ZQXPRIVID4713"})
        for i, key in enumerate(("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"))
    ]
    # invalid dates and codes, stored as received: the pipeline meets them (pydicom and highdicom quote
    # such values in their warnings and exceptions; the series fails, its reason is recorded)
    bad_dates = _with_phi(write_ct_series(tmp_path / "dates", 4, 32, 32, seed=12),
                          PatientBirthDate="ZQXBIRTH", PatientSex="ZQXSEX", StudyDate="ZQXDATE", SeriesDate="ZQX",
                          ContentDate="ZQXC", SeriesDescription="ZQX dates")
    sent = storescu(node.port, good)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    # a series no rule selects: the skip reason names SeriesDescription, by kind and length only
    skipped = _with_phi(write_ct_series(tmp_path / "skipped", 3, 32, 32, seed=13), SeriesDescription="ZQX other")
    assert storescu(node.port, bad_dates).returncode == 0
    assert storescu(node.port, skipped).returncode == 0
    for paths in bad_uids:
        storescu(node.port, paths, extra=["-nh"])  # refused (0xC210) or aborted; either way no leak
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.rglob("*.dcm")):
        time.sleep(0.5)
    assert list(out.rglob("*.dcm")), node.log()[-3000:]
    time.sleep(1.0)
    assert "SeriesDescription <text: 9 chars" in (node.data_dir / "audit.jsonl").read_text(), "the skip was recorded"
    metrics_port = int((node.data_dir / "metrics.port").read_text().strip())
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    log_text = node.log()
    assert "not a valid UID" in log_text, "the invalid UIDs were refused (and said so)"
    assert "DEBUG" in log_text, "the node logged at DEBUG"
    audit = (node.data_dir / "audit.jsonl").read_text()
    con = sqlite3.connect(node.data_dir / "index.sqlite")
    index_dump = "\n".join(con.iterdump())
    con.close()
    other_logs = "\n".join(p.read_text(errors="replace") for p in node.data_dir.rglob("*")
                           if p.is_file() and p.suffix in (".log", ".jsonl", ".txt", ".json"))
    leaks = {name: _leaks(text) for name, text in
             (("node log", log_text), ("audit", audit), ("metrics", metrics), ("index", index_dump),
              ("other files", other_logs))}
    assert not any(leaks.values()), leaks
    # and the results really carry the patient (the marker was not lost before the logs were read)
    result = pydicom.dcmread(next(out.rglob("*.dcm")), stop_before_pixels=True)
    assert MARK in str(result.PatientName)


# --- the pieces ------------------------------------------------------------------------------
@pytest.mark.parametrize("value,expected", [
    ("PRIVID4713", "<text: 10 chars, letters+digits>"),
    ("", "<empty>"),
    (None, "<none>"),
    (b"\x00\x01", "<bytes: 2>"),
    ("1.2.3", "<text: 5 chars, digits+dots/spaces>"),
])
def test_describe_gives_kind_and_length_only(value: object, expected: str) -> None:
    assert describe(value) == expected


def test_scrub_replaces_quoted_values_and_keeps_the_rest() -> None:
    text = "SOPInstanceUID missing or not a valid UID: 'ZQXPRIVID4713'; Invalid value for VR DA: \"ZQXBIRTH\" b'ZQX'"
    scrubbed = scrub(text)
    assert MARK not in scrubbed
    assert scrubbed.startswith("SOPInstanceUID missing or not a valid UID: <text: 13 chars, letters+digits>")
    assert scrub("the node's own log can't change") == "the node's own log can't change"


def test_filter_scrubs_messages_arguments_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("pydicom.test_phi")
    caplog.handler.addFilter(RedactingFilter())
    try:
        logger.warning("Invalid value for VR UI: %r", "ZQXPRIVID4713")
        try:
            raise ValueError("bad value 'ZQXDOE^JOHN'")
        except ValueError:
            logger.exception("failed")
    finally:
        caplog.handler.filters.clear()
    assert MARK not in caplog.text and "Invalid value for VR UI" in caplog.text and "ValueError" in caplog.text
