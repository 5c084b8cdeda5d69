"""Pipeline orchestration without a network: spool -> complete -> process -> outbox.

Every failure path ends in a precise state and reason, and re-processing yields the same
result UIDs (so a resend after a crash is recognised as a duplicate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from fixtures_models import phantom_volume, tiny_models_dir  # noqa: F401  (fixture)
from stores import open_test_store, walk

from medclf_node.config import Config, parse_config
from medclf_node.inference.registry import ModelRegistry
from medclf_node.ingest.spool import Spool
from medclf_node.pipeline import Pipeline, WorkerPool
from medclf_node.store import Store
from medclf_node.synthetic.dicom_writer import write_ct_series

SHAPE = (24, 96, 96)
SPACING = (2.5, 3.5, 3.5)
NODULE = (30.0, 168.0, 100.0, 12.0)  # z, y, x, radius mm: inside the left lung of phantom_volume


def _config(tmp_path: Path, models_dir: Path, **sections: Any) -> Config:
    data: dict[str, Any] = {
        "node": {"data_dir": str(tmp_path / "data")},
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        "results": {"destinations": ["pacs"]},
        "models": {"directory": str(models_dir)},
        "rules": [{"name": "ct", "models": ["test-2p5d-int8"], "min_slices": 3}],
    }
    data.update(sections)
    return parse_config(data)


def _spool_series(spool: Spool, paths: list[Path], calling_ae: str = "PACS") -> str:
    series_uid = ""
    for p in paths:
        stored = spool.store(p.read_bytes(), calling_ae=calling_ae, assoc_id="assoc-1")
        series_uid = stored.record.series_uid
    return series_uid


@pytest.fixture
def setup(tmp_path: Path, tiny_models_dir: Path) -> Any:  # noqa: F811
    def make(**sections: Any) -> tuple[Config, Store, Spool, Pipeline]:
        cfg = _config(tmp_path, tiny_models_dir, **sections)
        index = open_test_store(cfg.node.data_dir)
        spool = Spool(cfg.node.data_dir, index)
        registry = ModelRegistry.from_config(cfg)
        return cfg, index, spool, Pipeline(cfg, index, registry)

    return make


def _series(tmp_path: Path, name: str, nodule: bool, **kw: Any) -> list[Path]:
    hu = phantom_volume(SHAPE, SPACING, NODULE if nodule else None, seed=3)
    return write_ct_series(hu, SPACING, tmp_path / name, patient_id=f"PAT-{name}", uid_seed=name, **kw)


def test_positive_and_negative_series_are_reported_with_sr_and_sc(setup: Any, tmp_path: Path) -> None:
    cfg, index, spool, pipeline = setup()
    uids = {}
    for name, nodule in (("pos", True), ("neg", False)):
        uid = _spool_series(spool, _series(tmp_path, name, nodule))
        assert index.mark_complete(uid, "forced")
        uids[name] = uid
    pool = WorkerPool(pipeline, workers=1, poll_seconds=0.1, wake=__import__("threading").Event())
    assert pool.run_until_idle() == 2
    probs = {}
    for name, uid in uids.items():
        row = index.get_series(uid)
        assert row is not None and row.state == "reported", row
        assert row.rule == "ct"
        assert {"headers", "volume", "total"} <= set(row.timings)
        (result,) = index.results(uid)
        probs[name] = result.probability
        items = index.outbox_items(uid)
        assert sorted(i.kind for i in items) == ["SC", "SR"]
        assert all(i.destination == "pacs" and i.state == "queued" for i in items)
        sr_item = next(i for i in items if i.kind == "SR")
        sr = hd.sr.srread(cfg.node.data_dir / sr_item.path)
        assert sr.StudyInstanceUID == pydicom.dcmread(index.series_paths(uid)[0]).StudyInstanceUID
        assert sr.SeriesInstanceUID != uid
        sc = pydicom.dcmread(cfg.node.data_dir / next(i for i in items if i.kind == "SC").path)
        assert sc.Modality in ("OT", "SC") or sc.SOPClassUID.name.startswith("Secondary")
    assert probs["pos"] > probs["neg"]
    assert index.results(uids["pos"])[0].positive
    assert not index.results(uids["neg"])[0].positive


def test_reprocessing_gives_the_same_object_uids(setup: Any, tmp_path: Path) -> None:
    _, index, spool, pipeline = setup()
    uid = _spool_series(spool, _series(tmp_path, "again", True))
    index.mark_complete(uid, "forced")
    row = index.claim_next_complete("w")
    assert row is not None and pipeline.process(row) == "reported"
    first = sorted((i.object_uid, i.kind) for i in index.outbox_items(uid))
    # a crash after processing: the series is processed again on restart
    walk(index, uid, "complete")
    row = index.claim_next_complete("w")
    assert row is not None and pipeline.process(row) == "reported"
    again = sorted((i.object_uid, i.kind) for i in index.outbox_items(uid))
    assert again == first, "same UIDs, no second set of outbox items"


def test_localizer_only_series_is_skipped_with_reason(setup: Any, tmp_path: Path) -> None:
    _, index, spool, pipeline = setup()
    paths = _series(tmp_path, "scout", False, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    uid = _spool_series(spool, paths)
    index.mark_complete(uid, "forced")
    row = index.claim_next_complete("w")
    assert row is not None and pipeline.process(row) == "skipped"
    got = index.get_series(uid)
    assert got is not None and got.reason_code == "no_rule"
    assert "LOCALIZER" in (got.reason_text or "")
    assert index.outbox_items(uid) == []


def test_gap_with_refuse_policy_fails_with_volume_code(setup: Any, tmp_path: Path) -> None:
    _, index, spool, pipeline = setup(volume={"uneven_spacing": "refuse"})
    paths = _series(tmp_path, "gap", True)
    del paths[10]
    uid = _spool_series(spool, paths)
    index.mark_complete(uid, "forced")
    row = index.claim_next_complete("w")
    assert row is not None and pipeline.process(row) == "failed"
    got = index.get_series(uid)
    assert got is not None and got.reason_code in ("gap", "uneven_spacing")
    assert "PAT-gap" not in (got.reason_text or ""), "no patient data in reasons"


def test_rule_naming_an_unloaded_model_fails_precisely(setup: Any, tmp_path: Path) -> None:
    cfg, index, spool, _ = setup()
    registry = ModelRegistry.from_config(cfg)
    rules = [{"name": "other", "models": ["not-there"]}]
    cfg2 = cfg.model_copy(update={"rules": parse_config({"rules": rules}).rules})
    pipeline = Pipeline(cfg2, index, registry)
    uid = _spool_series(spool, _series(tmp_path, "nomodel", False))
    index.mark_complete(uid, "forced")
    row = index.claim_next_complete("w")
    assert row is not None and pipeline.process(row) == "failed"
    got = index.get_series(uid)
    assert got is not None and got.reason_code == "model_unavailable"


def test_corrupt_spooled_file_fails_series_but_not_the_worker(setup: Any, tmp_path: Path) -> None:
    _, index, spool, pipeline = setup()
    uid = _spool_series(spool, _series(tmp_path, "corrupt", False))
    victim = index.series_paths(uid)[5]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated on disk after acknowledgement (disk fault)
    good = _spool_series(spool, _series(tmp_path, "fine", False))
    index.mark_complete(uid, "forced")
    index.mark_complete(good, "forced")
    pool = WorkerPool(pipeline, workers=1, poll_seconds=0.1, wake=__import__("threading").Event())
    assert pool.run_until_idle() == 2
    bad_row, good_row = index.get_series(uid), index.get_series(good)
    assert bad_row is not None and bad_row.state == "failed"
    assert bad_row.reason_code in ("unreadable", "decode_failed", "internal_error")
    assert good_row is not None and good_row.state == "reported"


def test_volume_slices_match_sr_evidence(setup: Any, tmp_path: Path) -> None:
    cfg, index, spool, pipeline = setup()
    paths = _series(tmp_path, "evid", True)
    rng = np.random.default_rng(0)
    uid = _spool_series(spool, [paths[i] for i in rng.permutation(len(paths))])  # arrival order random
    index.mark_complete(uid, "forced")
    row = index.claim_next_complete("w")
    assert row is not None and pipeline.process(row) == "reported"
    sr_item = next(i for i in index.outbox_items(uid) if i.kind == "SR")
    sr = pydicom.dcmread(cfg.node.data_dir / sr_item.path)
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
