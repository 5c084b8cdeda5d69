"""Through the pipeline: result series numbers come from [results], and bad demographics in the
source series still give a reported series with a valid SR and SC (they used to cost the result:
internal_error after inference)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from fixtures_models import tiny_models_dir  # noqa: F401  (fixture)
from test_pipeline import _series, _spool_series, setup  # noqa: F401  (fixture)

from medclf_node.config import parse_config
from medclf_node.pipeline import WorkerPool

pytestmark = pytest.mark.filterwarnings("ignore:(Invalid value|The value length):UserWarning")


def _run(setup: Any, tmp_path: Path, name: str, results: dict[str, Any], **series_kw: Any  # noqa: F811
         ) -> tuple[Any, Any, str]:
    cfg, index, spool, pipeline = setup(results={"destinations": ["pacs"], **results})
    uid = _spool_series(spool, _series(tmp_path, name, True, **series_kw))
    assert index.mark_complete(uid, "forced")
    assert WorkerPool(pipeline, workers=1, poll_seconds=0.1, wake=threading.Event()).run_until_idle() == 1
    return cfg, index, uid


def _objects(cfg: Any, index: Any, uid: str) -> dict[str, pydicom.Dataset]:
    return {i.kind: pydicom.dcmread(cfg.node.data_dir / i.path) for i in index.outbox_items(uid)}


def test_series_numbers_default_and_configured(setup: Any, tmp_path: Path) -> None:  # noqa: F811
    assert (parse_config({}).results.sr_series_number, parse_config({}).results.sc_series_number) == (9901, 9902)
    cfg, index, uid = _run(setup, tmp_path, "num", {"sr_series_number": 801, "sc_series_number": 802})
    objs = _objects(cfg, index, uid)
    assert (objs["SR"].SeriesNumber, objs["SC"].SeriesNumber) == (801, 802)


def test_multivalued_patient_name_still_gives_a_result(setup: Any, tmp_path: Path) -> None:  # noqa: F811
    cfg, index, uid = _run(setup, tmp_path, "pn", {}, patient_name="Doe\\Jane^Q", study_date="2020-01-01",
                           accession_number="ACC-1234567890-TOO-LONG")
    row = index.get_series(uid)
    assert row is not None and row.state == "reported", (row.state, row.reason_code, row.reason_text)
    objs = _objects(cfg, index, uid)
    assert sorted(objs) == ["SC", "SR"]
    for ds in objs.values():
        assert ds.PatientName == "Doe^" and ds.StudyDate == "20200101" and len(ds.AccessionNumber) <= 16
    assert hd.sr.srread(cfg.node.data_dir / next(i.path for i in index.outbox_items(uid) if i.kind == "SR"))
