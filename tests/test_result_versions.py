"""Result versions: every generation of a series' results gets its own UIDs and names its predecessor.

A PACS keeps the first object stored under a SOP Instance UID (Orthanc's default), so a
result recomputed after late instances must come under new UIDs, and the SR must say which
SR it replaces (Predecessor Documents Sequence, PS3.3 C.17.2.3).  A re-run of the same
generation (crash, restart) must rebuild the very same objects.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fixtures_models import phantom_volume, tiny_models_dir  # noqa: F401  (fixture)
from pydicom.dataset import Dataset
from stores import open_test_store, walk

from medclf_node.config import Config, parse_config
from medclf_node.inference.registry import ModelRegistry
from medclf_node.ingest.spool import Spool
from medclf_node.pipeline import Pipeline
from medclf_node.reporting.uids import (
    Predecessor,
    ResultVersion,
    derive_uid,
    is_valid_uid,
    label_version,
    result_uids,
)
from medclf_node.store import SqliteStore, Store
from medclf_node.synthetic.dicom_writer import write_ct_series

SHAPE = (24, 96, 96)
SPACING = (2.5, 3.5, 3.5)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


# --- UIDs ------------------------------------------------------------------------------
def test_generation_zero_keeps_the_uids_of_earlier_releases() -> None:
    base = ("1.2.3", "m", "1.0", "sr")
    legacy = (derive_uid(*base, "series"), derive_uid(*base, "instance"))
    got = result_uids("1.2.3", "m", "1.0", "sr")
    assert (got.series_instance_uid, got.sop_instance_uid) == legacy
    assert result_uids("1.2.3", "m", "1.0", "sr", generation=0) == got


def test_each_generation_has_its_own_deterministic_uids() -> None:
    seen: set[str] = set()
    for gen in range(4):
        for kind in ("sr", "sc"):
            u = result_uids("1.2.3", "m", "1.0", kind, generation=gen)
            assert u == result_uids("1.2.3", "m", "1.0", kind, generation=gen)
            assert is_valid_uid(u.sop_instance_uid) and is_valid_uid(u.series_instance_uid)
            seen |= {u.sop_instance_uid, u.series_instance_uid}
    assert len(seen) == 16, "new SOP Instance and Series Instance UIDs per generation and kind"
    assert result_uids("1.2.3", "m", "1.1", "sr", generation=1) != result_uids("1.2.3", "m", "1.0", "sr", generation=1)
    with pytest.raises(ValueError):
        result_uids("1.2.3", "m", "1.0", "sr", generation=-1)


def test_version_labels_and_predecessor_dataset() -> None:
    pre = Predecessor("1.1", "1.2", SR_CLASS, "1.3", version=1)
    v2 = ResultVersion(generation=3, number=2, predecessor=pre)
    (item,) = v2.predecessor_datasets()
    assert (item.StudyInstanceUID, item.SeriesInstanceUID, item.SOPClassUID, item.SOPInstanceUID) == (
        "1.1", "1.2", SR_CLASS, "1.3")
    assert ResultVersion().predecessor_datasets() == []

    first = Dataset()
    first.Modality, first.SeriesDescription = "SR", "AI result \u2014 not for primary diagnosis (nodule-2p5d-int8)"
    label_version(first, ResultVersion())
    assert first.SeriesDescription == "AI result \u2014 not for primary diagnosis (nodule-2p5d-int8)"

    sr = Dataset()
    sr.Modality, sr.SeriesDescription = "SR", "AI result \u2014 not for primary diagnosis (nodule-2p5d-int8-extra)"
    label_version(sr, v2)
    assert sr.SeriesDescription.endswith(" v2") and len(sr.SeriesDescription.encode()) <= 64
    assert "ImageComments" not in sr
    assert sr.SeriesDescription[:-3] == "AI result \u2014 not for primary diagnosis", "cut at a word boundary"

    sc = Dataset()
    sc.Modality, sc.SeriesDescription = "OT", "AI key image"
    label_version(sc, v2)
    label_version(sc, v2)  # idempotent
    assert sc.SeriesDescription == "AI key image v2"
    assert sc.ImageComments == "Result version 2; replaces version 1 (SOP Instance UID 1.3)"


# --- pipeline: partial, then all ---------------------------------------------------------
def _config(tmp_path: Path, models_dir: Path) -> Config:
    return parse_config({
        "node": {"data_dir": str(tmp_path / "data")},
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        "results": {"destinations": ["pacs"]},
        "models": {"directory": str(models_dir)},
        "rules": [{"name": "ct", "models": ["test-2p5d-int8"], "min_slices": 3}],
    })


@pytest.fixture
def env(tmp_path: Path, tiny_models_dir: Path) -> Any:  # noqa: F811
    cfg = _config(tmp_path, tiny_models_dir)
    index = open_test_store(cfg.node.data_dir)
    spool = Spool(cfg.node.data_dir, index)
    pipeline = Pipeline(cfg, index, ModelRegistry.from_config(cfg))
    hu = phantom_volume(SHAPE, SPACING, None, seed=3)
    paths = write_ct_series(hu, SPACING, tmp_path / "ct", patient_id="PAT-V", uid_seed="versions")
    yield cfg, index, spool, pipeline, paths
    index.close()


def _store(spool: Spool, paths: list[Path], assoc: str) -> str:
    uid = ""
    for p in paths:
        uid = spool.store(p.read_bytes(), calling_ae="PACS", assoc_id=assoc).record.series_uid
    return uid


def _process(index: Store, pipeline: Pipeline, uid: str) -> str:
    index.mark_complete(uid, "forced")
    row = index.claim_next_complete("w")
    assert row is not None and row.series_uid == uid
    return pipeline.process(row)


def _objects(cfg: Config, index: Store, uid: str) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {"SR": [], "SC": []}
    for item in index.outbox_items(uid):
        out[item.kind].append(pydicom.dcmread(cfg.node.data_dir / item.path))
    return out


def _evidence_uids(sr: pydicom.Dataset) -> set[str]:
    return {str(i.ReferencedSOPInstanceUID) for st in sr.CurrentRequestedProcedureEvidenceSequence
            for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}


def _dciodvfy(path: Path, ds: pydicom.Dataset) -> tuple[list[str], list[str]]:
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def test_late_instances_give_a_second_version_that_names_the_first(env: Any) -> None:
    cfg, index, spool, pipeline, paths = env
    uid = _store(spool, paths[:14], "a1")
    assert _process(index, pipeline, uid) == "reported"
    first = _objects(cfg, index, uid)
    (sr1,), (sc1,) = first["SR"], first["SC"]
    assert "PredecessorDocumentsSequence" not in sr1
    for item in index.outbox_items(uid):
        index.mark_sent(item.id)  # the PACS has version 1

    _store(spool, paths, "a2")  # all 24 again: 10 are new and re-open the series (generation 1)
    row = index.get_series(uid)
    assert row is not None and (row.state, row.generation) == ("received", 1)
    assert _process(index, pipeline, uid) == "reported"
    objs = _objects(cfg, index, uid)
    assert len(objs["SR"]) == 2 and len(objs["SC"]) == 2, "version 1 stays in the outbox as sent"
    (sr2,) = [d for d in objs["SR"] if d.SOPInstanceUID != sr1.SOPInstanceUID]
    (sc2,) = [d for d in objs["SC"] if d.SOPInstanceUID != sc1.SOPInstanceUID]
    assert sr2.SeriesInstanceUID != sr1.SeriesInstanceUID and sc2.SeriesInstanceUID != sc1.SeriesInstanceUID
    assert sr2.StudyInstanceUID == sr1.StudyInstanceUID
    assert len(_evidence_uids(sr1)) == 14 and len(_evidence_uids(sr2)) == 24
    (pre_study,) = sr2.PredecessorDocumentsSequence
    (pre_series,) = pre_study.ReferencedSeriesSequence
    (pre_sop,) = pre_series.ReferencedSOPSequence
    assert pre_study.StudyInstanceUID == sr1.StudyInstanceUID
    assert pre_series.SeriesInstanceUID == sr1.SeriesInstanceUID
    assert (pre_sop.ReferencedSOPClassUID, pre_sop.ReferencedSOPInstanceUID) == (SR_CLASS, sr1.SOPInstanceUID)
    assert sr2.SeriesDescription.endswith(" v2") and not sr1.SeriesDescription.endswith(" v1")
    assert sc2.SeriesDescription.endswith(" v2")
    assert f"replaces version 1 (SOP Instance UID {sc1.SOPInstanceUID})" in sc2.ImageComments
    assert {i.state for i in index.outbox_items(uid) if i.object_uid == sr1.SOPInstanceUID} == {"sent"}
    assert [(r.kind, r.version) for r in index.reports(uid)] == [("SC", 1), ("SC", 2), ("SR", 1), ("SR", 2)]
    if shutil.which("dciodvfy") is not None:  # the new version is exactly as valid as the first
        for old, new in ((sr1, sr2), (sc1, sc2)):
            errors, warnings = _dciodvfy(cfg.node.data_dir / f"{new.SOPInstanceUID}.check.dcm", new)
            _, warnings_before = _dciodvfy(cfg.node.data_dir / f"{old.SOPInstanceUID}.check.dcm", old)
            assert errors == [] and len(warnings) <= len(warnings_before), (errors, warnings)

    # a crash after processing: the same generation runs again and rebuilds identical objects
    before = sorted((i.object_uid, i.state) for i in index.outbox_items(uid))
    walk(index, uid, "complete")
    row = index.claim_next_complete("w")
    assert row is not None and pipeline.process(row) == "reported"
    assert sorted((i.object_uid, i.state) for i in index.outbox_items(uid)) == before
    (again,) = [d for d in _objects(cfg, index, uid)["SR"] if d.SOPInstanceUID == sr2.SOPInstanceUID]
    assert again.PredecessorDocumentsSequence == sr2.PredecessorDocumentsSequence
    assert again.SeriesDescription == sr2.SeriesDescription


def test_generation_reopened_while_processing_sends_nothing(env: Any) -> None:
    """Objects computed from an outdated instance set are not queued; the newer generation has no predecessor."""
    cfg, index, spool, pipeline, paths = env
    uid = _store(spool, paths[:14], "a1")
    index.mark_complete(uid, "forced")
    row = index.claim_next_complete("w")
    assert row is not None and row.generation == 0
    _store(spool, paths[14:], "a2")  # late instances arrive while generation 0 is being processed
    pipeline.process(row)
    assert index.outbox_items(uid) == [] and index.reports(uid) == []
    assert _process(index, pipeline, uid) == "reported"
    objs = _objects(cfg, index, uid)
    (sr,) = objs["SR"]
    assert "PredecessorDocumentsSequence" not in sr and len(_evidence_uids(sr)) == 24
    assert sr.SOPInstanceUID == result_uids(uid, "test-2p5d-int8", _model_version(index, uid), "sr",
                                            generation=1).sop_instance_uid
    assert not sr.SeriesDescription.endswith(" v2"), "the first version sent is version 1"


def _model_version(index: Store, uid: str) -> str:
    (r,) = index.results(uid)
    return r.model_version


def test_index_of_an_older_release_is_migrated(tmp_path: Path) -> None:
    """A database without the new columns opens; its received series keep working."""
    db = tmp_path / "index.sqlite"
    with sqlite3.connect(db) as c:
        c.executescript("""
        CREATE TABLE series (series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, calling_ae TEXT NOT NULL,
            state TEXT NOT NULL, generation INTEGER NOT NULL DEFAULT 0, first_at REAL NOT NULL,
            last_at REAL NOT NULL, completed_at REAL, completion TEXT, reason_code TEXT, reason_text TEXT,
            n_instances INTEGER NOT NULL DEFAULT 0, worker TEXT, rule TEXT, timings_json TEXT,
            updated_at REAL NOT NULL);
        INSERT INTO series VALUES ('5.1', '1.2', 'S', 'received', 0, 100.0, 100.0, NULL, NULL, NULL, NULL,
            1, NULL, NULL, NULL, 100.0);
        """)
    index = SqliteStore(tmp_path)  # the SQLite file format of an older release
    row = index.get_series("5.1")
    assert row is not None and (row.opened_at, row.sender_state) == (100.0, None)
    assert index.due_for_completion(5, 1000, now=110.0) == [("5.1", "quiet")]
    index.close()


def test_record_report_is_idempotent_and_thread_safe(env: Any) -> None:
    _cfg, index, spool, _pipeline, paths = env
    uid = _store(spool, paths[:3], "a1")
    from medclf_node.store import ReportRecord

    rec = ReportRecord("9.9", uid, "m", "SR", 0, 1, "1.2", "1.3", SR_CLASS, None)
    threads = [threading.Thread(target=index.record_report, args=(rec,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert index.reports(uid) == [rec]
    assert index.report_version(uid, "m", "SR", "9.9") == (1, None)
    assert index.report_version(uid, "m", "SR", "9.10") == (2, rec)
    assert not index.record_report(rec, generation=5), "refused for a generation the series is not at"
