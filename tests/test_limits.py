"""[limits]: each limit refuses with a DICOM-appropriate answer, and the node keeps serving.

Real node subprocess (``node_factory``), real associations (pynetdicom requestor, DCMTK echoscu).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import NODE_AE, SENDER_AE, RunningNode, echoscu, needs_dcmtk
from fixtures_models import tiny_models_dir  # noqa: F401  (fixture)
from intake_series import write_ct_series
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from stores import open_test_store

from medclf_node.config import LimitsSection, VolumeSection, parse_config
from medclf_node.inference.registry import ModelRegistry
from medclf_node.ingest.spool import Spool
from medclf_node.ingest.volume import VolumeError, assemble_volume
from medclf_node.net.scu import Peer, send_files
from medclf_node.pipeline import Pipeline

STATUS_OUT_OF_RESOURCES = 0xA700


def _send(node: RunningNode, paths: list[Path]) -> list[int | None]:
    return [r.status for r in send_files(Peer(NODE_AE, "127.0.0.1", node.port), paths, local_ae=SENDER_AE)]


def _spooled(node: RunningNode) -> set[str]:
    return {p.stem for p in (node.data_dir / "spool").rglob("*.dcm")}


def _echo_ok(node: RunningNode) -> bool:
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(Verification, [ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return rsp is not None and int(rsp.Status) == 0
    finally:
        assoc.release()


@pytest.fixture
def held() -> Iterator[list[Any]]:
    """Associations a test holds open; released at teardown whatever happens."""
    assocs: list[Any] = []
    yield assocs
    for a in assocs:
        if a.is_established:
            a.release()


def _associate(port: int) -> Any:
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(Verification, [ImplicitVRLittleEndian])
    ae.network_timeout = 30
    return ae.associate("127.0.0.1", port, ae_title=NODE_AE)


def test_max_associations_rejects_with_local_limit_exceeded(
    node_factory: Callable[..., RunningNode], held: list[Any]
) -> None:
    node = node_factory(limits={"max_associations": 2})
    for _ in range(2):
        a = _associate(node.port)
        held.append(a)
        assert a.is_established
    extra = _associate(node.port)
    assert extra.is_rejected
    rj = extra.acceptor.primitive
    # PS3.8 9.3.4: result 2 (rejected-transient), source 3 (service-provider, presentation), reason 2
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    held.pop().release()
    time.sleep(0.3)  # the node notices the release
    assert _echo_ok(node), "a slot freed by a release is usable again"


def test_idle_association_and_silent_connection_are_timed_out(
    node_factory: Callable[..., RunningNode], held: list[Any]
) -> None:
    node = node_factory(limits={"idle_timeout_seconds": 1.0})
    idle = _associate(node.port)
    held.append(idle)
    assert idle.is_established
    # a TCP connection that never sends an A-ASSOCIATE-RQ
    raw = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    t0 = time.monotonic()
    try:
        while raw.recv(4096):  # the node may send an A-ABORT before closing
            pass
    finally:
        raw.close()
    assert time.monotonic() - t0 < 8
    deadline = time.monotonic() + 8
    while idle.is_established and time.monotonic() < deadline:
        time.sleep(0.1)
    assert idle.is_aborted, "the node aborts an association that stays silent"
    assert _echo_ok(node)


def test_stalled_pdus_do_not_hold_association_slots(
    node_factory: Callable[..., RunningNode], held: list[Any]
) -> None:
    """Slowloris: peers that stop in the middle of a PDU are cut off at the idle timeout."""
    from test_badinput import RQ, _read_pdu

    node = node_factory(limits={"idle_timeout_seconds": 1.5, "max_associations": 2})
    stalled = []
    try:
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", node.port), timeout=15)
            s.sendall(RQ)
            assert _read_pdu(s)[:1] == b"\x02"
            s.sendall(b"\x04\x00\x00\x00\x03\xe8abc")  # P-DATA-TF announcing 1000 bytes, 3 sent
            stalled.append(s)
        assert _associate(node.port).is_rejected, "both slots taken"
        t0 = time.monotonic()
        for s in stalled:
            while s.recv(4096):
                pass
        assert time.monotonic() - t0 < 10
    finally:
        for s in stalled:
            s.close()
    time.sleep(0.3)
    assert _echo_ok(node)


def test_max_instance_bytes_refuses_with_a700(node_factory: Callable[..., RunningNode], tmp_path: Path) -> None:
    node = node_factory(limits={"max_instance_bytes": 60_000})
    big = write_ct_series(tmp_path / "big", 1, 256, 256, seed=1)  # ~131 kB
    small = write_ct_series(tmp_path / "small", 1, 64, 64, seed=2)  # ~9 kB
    assert _send(node, big + small) == [STATUS_OUT_OF_RESOURCES, 0]
    assert _spooled(node) == {pydicom.dcmread(small[0]).SOPInstanceUID}
    assert "max_instance_bytes" in node.log()


def test_max_instances_per_series(node_factory: Callable[..., RunningNode], tmp_path: Path) -> None:
    node = node_factory(limits={"max_instances_per_series": 3})
    paths = write_ct_series(tmp_path / "s", 5, 32, 32, seed=3)
    assert _send(node, paths) == [0, 0, 0, STATUS_OUT_OF_RESOURCES, STATUS_OUT_OF_RESOURCES]
    assert _send(node, paths[:1]) == [0], "re-sending a stored instance is not a new instance"
    other = write_ct_series(tmp_path / "o", 1, 32, 32, seed=4)
    assert _send(node, other) == [0], "other series are not affected"
    assert len(_spooled(node)) == 4


def _absurd(src: Path, dst: Path, rows: int, cols: int, frames: int | None = None) -> Path:
    ds = pydicom.dcmread(src)
    ds.Rows, ds.Columns = rows, cols
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(dst, enforce_file_format=True)
    return dst


@needs_dcmtk
def test_absurd_dimensions_are_refused_at_intake(node_factory: Callable[..., RunningNode], tmp_path: Path) -> None:
    node = node_factory()  # default limits
    (src,) = write_ct_series(tmp_path / "src", 1, 16, 16, seed=5)
    wide = _absurd(src, tmp_path / "wide.dcm", 65535, 65535)
    deep = _absurd(src, tmp_path / "deep.dcm", 4096, 4096, frames=100)
    assert _send(node, [wide, deep, src]) == [STATUS_OUT_OF_RESOURCES, STATUS_OUT_OF_RESOURCES, 0]
    log = node.log()
    assert "max_frame_pixels" in log and "max_series_voxels" in log
    assert "Intake^Test" not in log and "INTAKE1" not in log, "no patient data in the log"
    assert echoscu(node.port).returncode == 0


def test_volume_stage_refuses_before_decoding(tmp_path: Path) -> None:
    (src,) = write_ct_series(tmp_path / "src", 1, 16, 16, seed=6)
    huge = _absurd(src, tmp_path / "huge.dcm", 60000, 60000)  # would be a 14 GB float32 buffer
    with pytest.raises(VolumeError) as info:
        assemble_volume([huge], VolumeSection())
    assert info.value.code == "too_large" and "max_frame_pixels" in info.value.message
    paths = write_ct_series(tmp_path / "s", 4, 32, 32, seed=7)
    with pytest.raises(VolumeError) as info:
        assemble_volume(paths, VolumeSection(), limits=LimitsSection(max_series_voxels=3 * 32 * 32))
    assert info.value.code == "too_large" and "max_series_voxels" in info.value.message
    vol = assemble_volume(paths, VolumeSection(), limits=LimitsSection(max_series_voxels=4 * 32 * 32))
    assert vol.array.shape == (4, 32, 32)


def test_pipeline_refuses_an_oversized_series_with_too_large(tmp_path: Path, tiny_models_dir: Path) -> None:  # noqa: F811
    """The worker records the refusal as the series' state and reason, no pixel decoded."""
    cfg = parse_config({
        "node": {"data_dir": str(tmp_path / "data")},
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        "results": {"destinations": ["pacs"]},
        "models": {"directory": str(tiny_models_dir)},
        "rules": [{"name": "ct", "models": ["test-2p5d-int8"], "min_slices": 3}],
        "limits": {"max_series_voxels": 5 * 32 * 32},
    })
    index = open_test_store(cfg.node.data_dir, durable=False)
    try:
        spool = Spool(cfg.node.data_dir, index, durable=False, limits=cfg.limits)
        for p in write_ct_series(tmp_path / "s", 6, 32, 32, seed=8):
            uid = spool.store(p.read_bytes(), calling_ae="PACS", assoc_id="a").record.series_uid
        index.mark_complete(uid, "forced")
        row = index.claim_next_complete("w")
        assert row is not None
        assert Pipeline(cfg, index, ModelRegistry.from_config(cfg)).process(row) == "failed"
        final = index.get_series(uid)
        assert final is not None and final.reason_code == "too_large"
        assert final.reason_text is not None and "max_series_voxels" in final.reason_text
    finally:
        index.close()
