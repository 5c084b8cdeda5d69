"""Partial, then full: the PACS (Orthanc, default configuration) ends holding the SR of the whole series.

Measured before this test existed: 60 of 100 slices sent, association aborted, all 100 re-sent.
The quiet timer completed the partial series, its SR/SC went out, the late instances re-opened
the series and the new SR/SC were sent under the same SOP Instance UIDs; Orthanc keeps the first
object stored under a UID, so it held an SR computed from 60 % of the scan while the node's
outbox said ``sent``.

Here the node runs as a real subprocess with Orthanc as its only result destination:

* abort case: the aborted partial send is not reported on the quiet timer; the re-send's clean
  release completes the series, and the one SR in the PACS references all 100 instances;
* release case: a partial send that *was* released is reported (version 1); the late instances
  give version 2 under new UIDs, which names version 1 as its predecessor, and the newest SR in
  the PACS (head of the predecessor chain, latest content time) references all 100.

Needs a loopback-only network namespace (tests/orthanc.py): ``tools/netns-loopback``.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import NODE_AE, SENDER_AE, RunningNode, free_port
from fixtures_models import phantom_volume, tiny_models_dir  # noqa: F401  (fixture)
from orthanc import ORTHANC_AE, Orthanc, require_orthanc, running_orthanc
from stores import query

from medclf_node.synthetic.dicom_writer import write_ct_series

N_SLICES, N_PARTIAL = 100, 60
SHAPE = (N_SLICES, 64, 64)
SPACING = (2.5, 5.0, 5.0)
QUIET = 1.0
TIMEOUT = 90.0


def _node(node_factory: Any, models: Path, orthanc_port: int) -> RunningNode:
    node: RunningNode = node_factory(
        peers=[
            {"name": "scanner", "ae_title": SENDER_AE, "host": "127.0.0.1", "port": free_port()},
            {"name": "orthanc", "ae_title": ORTHANC_AE, "host": "127.0.0.1", "port": orthanc_port},
        ],
        results={"destinations": ["orthanc"]},
        models={"directory": str(models)},
        rules=[{"name": "ct", "models": ["test-2p5d-int8"], "min_slices": 3}],
        pipeline={"enabled": True, "poll_seconds": 0.2},
        completion={"on_release": True, "quiet_seconds": QUIET, "max_wait_seconds": 300.0},
        dispatch={"initial_backoff_seconds": 0.2, "max_backoff_seconds": 1.0},
    )
    return node


def _send(port: int, paths: list[Path], *, abort: bool) -> None:
    """C-STORE ``paths`` on one association, then A-ABORT or A-RELEASE it."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        for p in paths:
            assert assoc.send_c_store(p).Status == 0
    finally:
        if abort:
            assoc.abort()
        else:
            assoc.release()


def _series_state(node: RunningNode) -> tuple[str, int] | None:
    rows = query(node.data_dir, "SELECT state, generation FROM series")
    return (str(rows[0][0]), int(rows[0][1])) if rows else None


def _wait(cond: Any, timeout: float = TIMEOUT, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


def _study_objects(orthanc: Orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """Every object Orthanc holds in the study, by modality."""
    found = json.loads(orthanc.request("POST", "/tools/lookup", study_uid.encode(), content_type="text/plain"))
    out: dict[str, list[pydicom.Dataset]] = {}
    for hit in found:
        if hit["Type"] != "Study":
            continue
        for series_id in orthanc.get_json(f"/studies/{hit['ID']}")["Series"]:
            series = orthanc.get_json(f"/series/{series_id}")
            modality = series["MainDicomTags"].get("Modality", "?")
            if modality == "CT":
                out.setdefault("CT", []).extend(pydicom.Dataset() for _ in series["Instances"])
                continue
            for inst in series["Instances"]:
                ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(inst)))
                out.setdefault(modality, []).append(ds)
    return out


def _evidence_uids(sr: pydicom.Dataset) -> set[str]:
    return {str(i.ReferencedSOPInstanceUID) for st in sr.CurrentRequestedProcedureEvidenceSequence
            for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}


def _predecessor_uids(sr: pydicom.Dataset) -> set[str]:
    return {str(i.ReferencedSOPInstanceUID) for st in sr.get("PredecessorDocumentsSequence", [])
            for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}


def _newest_sr(srs: list[pydicom.Dataset]) -> pydicom.Dataset:
    """The newest SR as a PACS user finds it: the one no other SR names as its predecessor.

    It must also be the one with the latest content date/time (the two ways agree).
    """
    replaced = set().union(*(_predecessor_uids(s) for s in srs))
    heads = [s for s in srs if str(s.SOPInstanceUID) not in replaced]
    assert len(heads) == 1, f"one current version, got {len(heads)} of {len(srs)} SRs not replaced by another"
    latest = max(srs, key=lambda s: (str(s.ContentDate), str(s.ContentTime)))
    assert latest.SOPInstanceUID == heads[0].SOPInstanceUID or len(srs) == 1
    return heads[0]


@pytest.fixture
def ct(tmp_path: Path) -> tuple[list[Path], pydicom.Dataset]:
    hu = phantom_volume(SHAPE, SPACING, None, seed=11)
    paths = write_ct_series(hu, SPACING, tmp_path / "ct", patient_id="P-PARTIAL", uid_seed="partial-then-full")
    return paths, pydicom.dcmread(paths[0], stop_before_pixels=True)


def test_aborted_partial_send_then_full_resend_pacs_holds_full_sr(
    node_factory: Any, tiny_models_dir: Path, tmp_path: Path, ct: tuple[list[Path], pydicom.Dataset],  # noqa: F811
) -> None:
    require_orthanc()
    paths, src = ct
    all_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    dicom_port, http_port = free_port(), free_port()
    node = _node(node_factory, tiny_models_dir, dicom_port)
    with running_orthanc(tmp_path / "orthanc", dicom_port=dicom_port, http_port=http_port) as orthanc:
        _send(node.port, paths[:N_PARTIAL], abort=True)
        time.sleep(3 * QUIET + 1.0)  # several quiet periods: the old node completed and reported here
        held = _series_state(node)
        _send(node.port, paths, abort=False)  # synchronous: every late instance is indexed when it returns
        assert _wait(lambda: (_series_state(node) or ("", 0))[0] == "sent"), (_series_state(node), node.log()[-3000:])
        srs = _study_objects(orthanc, str(src.StudyInstanceUID))["SR"]
    newest = _newest_sr(srs)
    assert _evidence_uids(newest) == all_uids, f"the PACS's SR references {len(_evidence_uids(newest))} of {N_SLICES}"
    assert held == ("received", 0), "the aborted partial send was not completed on the quiet timer"
    assert _series_state(node) == ("sent", 0) and len(srs) == 1, "one result version, nothing partial was reported"
    assert "not completed on the quiet timer" in node.log()


def test_released_partial_send_then_more_pacs_holds_new_version_naming_old(
    node_factory: Any, tiny_models_dir: Path, tmp_path: Path, ct: tuple[list[Path], pydicom.Dataset],  # noqa: F811
) -> None:
    require_orthanc()
    paths, src = ct
    all_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    dicom_port, http_port = free_port(), free_port()
    node = _node(node_factory, tiny_models_dir, dicom_port)
    study = str(src.StudyInstanceUID)
    with running_orthanc(tmp_path / "orthanc", dicom_port=dicom_port, http_port=http_port) as orthanc:
        _send(node.port, paths[:N_PARTIAL], abort=False)  # the sender said it was done: version 1
        assert _wait(lambda: _series_state(node) == ("sent", 0)), (_series_state(node), node.log()[-3000:])
        (first,) = _study_objects(orthanc, study)["SR"]
        assert len(_evidence_uids(first)) == N_PARTIAL
        _send(node.port, paths, abort=False)  # 40 late instances: generation 1, version 2
        assert _wait(lambda: _series_state(node) == ("sent", 1)), (_series_state(node), node.log()[-3000:])
        objs = _study_objects(orthanc, study)
    srs = objs["SR"]
    assert len(srs) == 2, "the PACS took the new version (new SOP Instance UID) instead of ignoring it"
    newest = _newest_sr(srs)
    assert _evidence_uids(newest) == all_uids, f"newest SR references {len(_evidence_uids(newest))} instances"
    assert _predecessor_uids(newest) == {str(first.SOPInstanceUID)}
    (pre_study,) = newest.PredecessorDocumentsSequence
    assert pre_study.StudyInstanceUID == first.StudyInstanceUID
    assert pre_study.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert newest.SeriesInstanceUID != first.SeriesInstanceUID
    assert str(newest.SeriesDescription).endswith(" v2")
    scs = [d for m, ds in objs.items() if m not in ("SR", "CT") for d in ds]
    assert len(scs) == 2 and len({d.SeriesInstanceUID for d in scs}) == 2
    assert sum(str(d.SeriesDescription).endswith(" v2") for d in scs) == 1
