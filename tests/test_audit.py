"""Audit trail: JSON lines, allow-listed fields, no patient data, safe under threads."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from medclf_node.audit import INVALID_UID, AuditFieldError, AuditLog, NullAuditLog, build_record, open_audit_log
from medclf_node.config import parse_config


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _patient() -> Dataset:
    ds = Dataset()
    ds.PatientName = "Doe^Johnathan"
    ds.PatientID = "PID-4711-XYZ"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    return ds


def test_every_event_kind_is_one_json_line(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    audit = AuditLog(log_path)
    ds = _patient()
    audit.association(accepted=True, calling_ae="ORTHANC", peer="127.0.0.1:50123", called_ae="MEDCLF")
    audit.association(accepted=False, calling_ae="INTRUDER", peer="10.0.0.9:4000", reason="calling AE not allowed")
    audit.series("received", series_uid=ds.SeriesInstanceUID, study_uid=ds.StudyInstanceUID, calling_ae="ORTHANC")
    audit.series("completed", series_uid=ds.SeriesInstanceUID, n_instances=120, completion="release")
    audit.series("skipped", series_uid=ds.SeriesInstanceUID, reason_code="no_rule", reason="no rule matched")
    audit.model_run(series_uid=ds.SeriesInstanceUID, model="nodule-2p5d-int8", version="1.0.0", score=0.91,
                    positive=True, seconds=0.42)
    audit.result_object("sent", object_uid="1.2.3.4", destination="pacs", series_uid=ds.SeriesInstanceUID,
                        kind="sr", attempts=1)
    audit.result_object("dead_lettered", object_uid="1.2.3.5", destination="pacs", attempts=8,
                        reason="connection refused")
    audit.close()

    recs = _lines(log_path)
    assert [(r["event"], r.get("action")) for r in recs] == [
        ("association", "accepted"), ("association", "rejected"), ("series", "received"), ("series", "completed"),
        ("series", "skipped"), ("model_run", None), ("object", "sent"), ("object", "dead_lettered"),
    ]
    assert recs[1] == {**recs[1], "calling_ae": "INTRUDER", "peer": "10.0.0.9:4000", "reason": "calling AE not allowed"}
    assert recs[5]["score"] == 0.91 and recs[5]["positive"] is True and recs[5]["model"] == "nodule-2p5d-int8"
    assert all(str(r["ts"]).endswith("Z") for r in recs)
    text = log_path.read_text()
    assert "Doe" not in text and "PID-4711" not in text


def test_patient_fields_cannot_be_written(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    ds = _patient()
    for audit in (AuditLog(log_path), NullAuditLog()):  # disabled auditing still catches the bug
        with pytest.raises(AuditFieldError, match="PatientName"):
            audit.record("series", action="received", series_uid=ds.SeriesInstanceUID, PatientName=ds.PatientName)
        with pytest.raises(AuditFieldError, match="patient_id"):
            audit.record("model_run", series_uid=ds.SeriesInstanceUID, patient_id=ds.PatientID)
        with pytest.raises(AuditFieldError, match="scalar"):  # no dumping whole datasets into free text
            audit.record("series", action="failed", series_uid=ds.SeriesInstanceUID, reason=ds)
    # a patient ID smuggled into a UID field is replaced, not written
    rec = AuditLog(log_path).series("failed", series_uid=str(ds.PatientID), study_uid="Doe^Johnathan")
    assert rec["series_uid"] == INVALID_UID and rec["study_uid"] == INVALID_UID
    text = log_path.read_text()
    assert "Doe" not in text and "PID-4711" not in text


def test_unknown_event_or_action_is_rejected() -> None:
    with pytest.raises(AuditFieldError, match="unknown audit event"):
        build_record("login", {})
    with pytest.raises(AuditFieldError, match="action must be one of"):
        build_record("series", {"action": "deleted", "series_uid": "1.2"})


def test_network_values_are_sanitised_not_raised(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    audit = AuditLog(log_path, fsync=False)
    rec = audit.association(
        accepted=False, calling_ae="A_VERY_LONG_AE_TITLE_X\n", peer="1.2.3.4:5", reason="bad\nline\x00" + "x" * 900
    )
    assert rec["calling_ae"] == "A_VERY_LONG_AE_T"
    assert isinstance(rec["reason"], str) and "\n" not in rec["reason"] and len(rec["reason"]) == 500
    assert len(log_path.read_text().splitlines()) == 1  # control characters never split a line


def test_append_only_across_reopen_and_rotation(tmp_path: Path) -> None:
    log_path = tmp_path / "sub" / "audit.jsonl"
    a = AuditLog(log_path)
    a.series("received", series_uid="1.2.3")
    a.close()
    b = AuditLog(log_path)  # a restart appends, never truncates
    b.series("completed", series_uid="1.2.3")
    assert [r["action"] for r in _lines(log_path)] == ["received", "completed"]
    assert log_path.stat().st_mode & 0o777 == 0o640
    rotated = log_path.with_suffix(".jsonl.1")
    log_path.rename(rotated)
    b.reopen()
    b.series("failed", series_uid="1.2.3", reason_code="volume")
    b.close()
    assert [r["action"] for r in _lines(log_path)] == ["failed"]
    assert len(_lines(rotated)) == 2
    b.series("skipped", series_uid="1.2.3")  # closed: dropped and counted, not raised
    assert b.write_errors == 1


def test_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    audit = AuditLog(log_path, fsync=False)
    n_threads, per_thread = 8, 200

    def worker(t: int) -> None:
        for i in range(per_thread):
            audit.model_run(series_uid=f"1.2.{t}.{i}", model="m" * 50, version="1", score=i / per_thread,
                            positive=False)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    audit.close()
    recs = _lines(log_path)
    assert len(recs) == n_threads * per_thread
    assert len({r["series_uid"] for r in recs}) == n_threads * per_thread


def test_config_paths_and_disabled_log(tmp_path: Path) -> None:
    cfg = parse_config({"node": {"data_dir": "d"}}, base_dir=tmp_path)
    assert cfg.audit.enabled and cfg.audit.fsync
    assert cfg.audit_path() == (tmp_path / "d" / "audit.jsonl").resolve()
    cfg_abs = parse_config({"audit": {"path": str(tmp_path / "elsewhere.jsonl")}}, base_dir=tmp_path)
    assert cfg_abs.audit_path() == tmp_path / "elsewhere.jsonl"

    off = open_audit_log(False, tmp_path / "off.jsonl")
    assert isinstance(off, NullAuditLog)
    off.series("received", series_uid="1.2")
    assert not (tmp_path / "off.jsonl").exists()
    on = open_audit_log(True, tmp_path / "on.jsonl", fsync=True)
    on.series("received", series_uid="1.2")
    on.close()
    assert len(_lines(tmp_path / "on.jsonl")) == 1
