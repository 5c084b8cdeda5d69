"""The C-STORE fast path (net/fast_store.py + reactor.WakeableDUL._take_pdata).

It replaces pynetdicom's PDU -> primitive -> DIMSE message -> event chain for C-STORE
requests, so the tests compare it with that chain: the same command fields as pydicom
decodes, the same response bytes as pynetdicom sends, the same stored files and statuses
with the fast path on and off, and pynetdicom's behaviour for everything the fast path
hands back (other messages, odd fragmentation, protocol violations).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from intake_series import write_ct_series
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from stores import open_test_store

from medclf_node.config import Config, parse_config
from medclf_node.ingest.spool import Spool
from medclf_node.net import fast_store, part10, reactor
from medclf_node.net.scp import StoreSCP
from medclf_node.store import Store

SENDER, NODE = "SCANNER", "MEDCLF"


# --- helpers ---------------------------------------------------------------------------------
def _request(message_id: int = 7, sop_instance: str = "1.2.3.4.5", priority: int = 2,
             move_ae: str | None = None, dataset: bytes = b"\x08\x00\x16\x00\x00\x00\x00\x00") -> C_STORE:
    rq = C_STORE()
    rq.MessageID = message_id
    rq.AffectedSOPClassUID = CTImageStorage
    rq.AffectedSOPInstanceUID = sop_instance
    rq.Priority = priority
    if move_ae is not None:
        rq.MoveOriginatorApplicationEntityTitle = move_ae
        rq.MoveOriginatorMessageID = 3
    rq.DataSet = BytesIO(dataset)
    return rq


def _encoded(primitive: Any, max_pdu: int = 16384) -> tuple[bytes, bytes, list[tuple[int, bytes]]]:
    """(command set, data set, [(context id, PDV incl. control byte)]) as pynetdicom sends them."""
    msg = C_STORE_RQ() if primitive.MessageID is not None else C_STORE_RSP()
    msg.primitive_to_message(primitive)
    pdvs = [(cid, bytes(pdv)) for p in msg.encode_msg(1, max_pdu) for cid, pdv in p.presentation_data_value_list]
    command = b"".join(p[1:] for _, p in pdvs if p[0] & 1)
    data = b"".join(p[1:] for _, p in pdvs if not p[0] & 1)
    return command, data, pdvs


# --- pure functions ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {}, {"sop_instance": "1.2.3.45", "message_id": 65535, "priority": 0},
    {"sop_instance": "1." + "2" * 62, "priority": 1}, {"move_ae": "ARCHIVE"},
])
def test_store_request_fields_equal_pydicoms_decoding(kwargs: dict[str, Any]) -> None:
    command, _, _ = _encoded(_request(**kwargs))
    req = fast_store.decode_store_request(command, 5)
    ds = decode(BytesIO(command), True, True)
    assert req is not None
    assert (req.context_id, req.message_id, req.sop_class_uid, req.sop_instance_uid, req.priority) == (
        5, ds.MessageID, ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID, ds.Priority)


def test_other_commands_are_left_to_pynetdicom() -> None:
    command, _, _ = _encoded(_request())
    ds = decode(BytesIO(command), True, True)
    for change in ({"CommandField": 0x0030}, {"CommandDataSetType": 0x0101}, {"Priority": 3}):
        other = ds.copy()
        for k, v in change.items():
            setattr(other, k, v)
        assert fast_store.decode_store_request(encode(other, True, True) or b"", 1) is None, change
    missing = ds.copy()
    del missing.MessageID
    assert fast_store.decode_store_request(encode(missing, True, True) or b"", 1) is None
    assert fast_store.decode_store_request(command + b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00", 1) is None
    assert fast_store.decode_store_request(command[:-3], 1) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4))
def test_damaged_commands_are_decoded_as_pydicom_would_or_not_at_all(edits: list[tuple[int, int]]) -> None:
    command = bytearray(_encoded(_request(move_ae="ARCHIVE"))[0])
    for pos, value in edits:
        command[pos % len(command)] = value
    req = fast_store.decode_store_request(bytes(command), 1)
    if req is None:
        return
    ds = decode(BytesIO(bytes(command)), True, True)
    assert (ds.CommandField, ds.MessageID, ds.Priority) == (1, req.message_id, req.priority)
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID) == (req.sop_class_uid, req.sop_instance_uid)
    assert ds.CommandDataSetType != 0x0101


def test_pdvs_are_split_as_pynetdicom_splits_them() -> None:
    _, _, pdvs = _encoded(_request(dataset=bytes(range(256)) * 200), max_pdu=4096)
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[cid, pdv] for cid, pdv in pdvs]  # type: ignore[misc]
    pdu = P_DATA_TF(primitive).encode()
    ours = fast_store.split_pdvs(memoryview(pdu)[6:])
    assert ours is not None
    theirs = P_DATA_TF()
    theirs.decode(pdu)
    assert [(c, bytes([ctrl]) + bytes(f)) for c, ctrl, f in ours] == [
        (c, bytes(d)) for c, d in theirs.to_primitive().presentation_data_value_list]
    body = pdu[6:]
    assert fast_store.split_pdvs(memoryview(body[:-1])) is None  # last item runs past the end
    assert fast_store.split_pdvs(memoryview(b"\x00\x00\x00\x01\x01")) is None  # no control header
    assert fast_store.split_pdvs(memoryview(b"")) == []


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC210, 0xC211, 0xB000])
@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45"])
def test_response_pdu_is_byte_identical_to_pynetdicoms(status: int, sop_instance: str) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 9
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (primitive,) = list(msg.encode_msg(3, 16384))
    expected = P_DATA_TF(primitive).encode()
    req = fast_store.StoreRequest(context_id=3, message_id=9, sop_class_uid=CTImageStorage,
                                  sop_instance_uid=sop_instance, priority=2)
    assert fast_store.store_response_pdu(req, status) == expected


def test_a_huge_pdu_length_does_not_allocate_it() -> None:
    """A peer announcing 2 GiB and sending ten bytes costs ~1 MiB, not 2 GiB."""
    a, b = socket.socketpair()
    try:
        sock = reactor.BulkRecvSocket.__new__(reactor.BulkRecvSocket)
        sock.socket = a
        b.sendall(b"x" * 10)
        b.close()
        tracemalloc.start()
        got = sock.recv(2 << 30)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        a.close()
    assert bytes(got) == b"x" * 10
    assert peak < 8 << 20, peak


def test_a_large_pdu_arrives_whole() -> None:
    a, b = socket.socketpair()
    payload = bytes(range(256)) * 12_000  # 3 MB: the buffer grows twice
    try:
        sock = reactor.BulkRecvSocket.__new__(reactor.BulkRecvSocket)
        sock.socket = a
        sender = threading.Thread(target=b.sendall, args=(payload,))
        sender.start()
        got = sock.recv(len(payload))
        sender.join()
    finally:
        a.close()
        b.close()
    assert bytes(got) == payload


# --- through the node ----------------------------------------------------------------------
def _config(data_dir: Path) -> Config:
    return parse_config({"node": {"ae_title": NODE, "port": 0, "data_dir": str(data_dir)},
                         "accept": {"calling_ae_titles": [SENDER]}})


class _Counting(StoreSCP):
    fast_calls = 0

    def _fast_store(self, *args: Any) -> int:
        type(self).fast_calls += 1
        return super()._fast_store(*args)


def _node(tmp: Path, fast: bool) -> tuple[StoreSCP, Store]:
    index = open_test_store(tmp)
    node = _Counting(_config(tmp), Spool(tmp, index, durable=False), fast_path=fast)
    node.start()
    return node, index


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[dict[bool, StoreSCP]]:
    _Counting.fast_calls = 0
    made = {fast: _node(tmp_path / f"fast-{fast}", fast) for fast in (True, False)}
    yield {fast: node for fast, (node, _) in made.items()}
    for node, index in made.values():
        node.stop()
        index.close()


def _send(port: int, datasets: list[pydicom.Dataset], syntax: str) -> list[int]:
    ae = AE(ae_title=SENDER)
    ae.add_requested_context(CTImageStorage, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_fast_and_stock_paths_store_the_same_bytes(nodes: dict[bool, StoreSCP], tmp_path: Path,
                                                   syntax: str) -> None:
    datasets = [pydicom.dcmread(f) for f in write_ct_series(tmp_path / "s", 4, 48, 48, seed=5)]
    bad = pydicom.dcmread(write_ct_series(tmp_path / "b", 1, 16, 16, seed=6)[0])
    bad.SeriesInstanceUID = "1.2.3.04"  # leading zero: 0xC210 from the spool
    results = {fast: _send(node.port, [*datasets, bad], syntax) for fast, node in nodes.items()}
    assert results[True] == results[False] == [0, 0, 0, 0, 0xC210]
    assert _Counting.fast_calls == 5  # the fast node took every request, the stock node none
    files = {fast: sorted(p for p in (tmp_path / f"fast-{fast}" / "spool").rglob("*.dcm")) for fast in nodes}
    assert len(files[True]) == len(files[False]) == 4
    for a, b in zip(files[True], files[False], strict=True):
        assert a.relative_to(tmp_path / "fast-True") == b.relative_to(tmp_path / "fast-False")
        assert a.read_bytes() == b.read_bytes()


def test_requests_the_fast_path_declines_are_served_by_pynetdicom(nodes: dict[bool, StoreSCP],
                                                                  tmp_path: Path) -> None:
    """C-ECHO, and a C-STORE whose SOP Instance UID is not a conformant UID, go the stock way."""
    node = nodes[True]
    odd, good = (pydicom.dcmread(f) for f in write_ct_series(tmp_path / "s", 2, 16, 16, seed=8))
    odd.SOPInstanceUID = "1.2.03.4"  # leading zero: decode_store_request declines, the spool refuses
    ae = AE(ae_title=SENDER)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assert assoc.send_c_store(odd).Status == 0xC210
    assert _Counting.fast_calls == 0
    assert assoc.send_c_store(good).Status == 0
    assert _Counting.fast_calls == 1
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert len(list((tmp_path / "fast-True" / "spool").rglob("*.dcm"))) == 1


# --- raw PDUs: fragmentation and protocol violations --------------------------------------
def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _associate_rq() -> bytes:
    ctx = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, CTImageStorage.encode()) + _item(0x40, b"1.2.840.10008.1.2"))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + NODE.encode().ljust(16) + SENDER.encode().ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + ctx + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _pdu(*pdvs: tuple[int, bytes]) -> bytes:
    items = b"".join(struct.pack(">IBB", len(d) + 2, 1, control) + d for control, d in pdvs)
    return struct.pack(">BBI", 0x04, 0, len(items)) + items


def _read_pdu(s: socket.socket) -> bytes:
    head = b""
    while len(head) < 6 and (chunk := s.recv(6 - len(head))):
        head += chunk
    if len(head) < 6:
        return head
    (length,) = struct.unpack(">I", head[2:])
    body = b""
    while len(body) < length and (chunk := s.recv(length - len(body))):
        body += chunk
    return head + body


def _instance(tmp: Path, seed: int) -> tuple[str, bytes, bytes]:
    """(SOP instance UID, command set, implicit VR LE data set) of one small CT slice."""
    ds = pydicom.dcmread(write_ct_series(tmp / f"r{seed}", 1, 16, 16, seed=seed)[0])
    data = encode(ds, True, True) or b""
    command, _, _ = _encoded(_request(message_id=seed, sop_instance=ds.SOPInstanceUID, dataset=data))
    return ds.SOPInstanceUID, command, data


def _status(pdu: bytes) -> int:
    assert pdu[0] == 0x04, pdu[:1]
    ds = decode(BytesIO(pdu[12:]), True, True)
    return int(ds.Status)


def test_odd_fragmentation_is_reassembled(nodes: dict[bool, StoreSCP], tmp_path: Path) -> None:
    """Command split over two PDUs, data in three PDVs, the next command sharing a PDU with the last data."""
    uid_a, cmd_a, data_a = _instance(tmp_path, 11)
    uid_b, cmd_b, data_b = _instance(tmp_path, 12)
    node = nodes[True]
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
        s.sendall(_associate_rq())
        assert _read_pdu(s)[0] == 0x02
        third = len(data_a) // 3
        s.sendall(_pdu((0x01, cmd_a[:10])) + _pdu((0x03, cmd_a[10:]), (0x00, data_a[:third])))
        s.sendall(_pdu((0x00, data_a[third:2 * third])))
        s.sendall(_pdu((0x02, data_a[2 * third:]), (0x03, cmd_b)))
        assert _status(_read_pdu(s)) == 0
        s.sendall(_pdu((0x02, data_b)))
        assert _status(_read_pdu(s)) == 0
        s.sendall(struct.pack(">BBI", 0x05, 0, 4) + b"\x00" * 4)  # A-RELEASE-RQ
        assert _read_pdu(s)[0] == 0x06
    assert _Counting.fast_calls == 2
    for uid, data in ((uid_a, data_a), (uid_b, data_b)):
        (path,) = (tmp_path / "fast-True" / "spool").rglob(f"{uid}.dcm")
        meta = part10.file_meta(CTImageStorage, uid, ImplicitVRLittleEndian)
        assert meta is not None and path.read_bytes() == part10.PREAMBLE + meta + data


@pytest.mark.parametrize("violation", ["command_inside_data", "malformed_pdu_inside_data"])
def test_protocol_violation_inside_a_data_set_aborts_and_stores_nothing(
    nodes: dict[bool, StoreSCP], tmp_path: Path, violation: str
) -> None:
    uid, cmd, data = _instance(tmp_path, 13)
    node = nodes[True]
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
        s.sendall(_associate_rq())
        assert _read_pdu(s)[0] == 0x02
        s.sendall(_pdu((0x03, cmd), (0x00, data[:20])))
        if violation == "command_inside_data":
            s.sendall(_pdu((0x03, cmd)))
        else:
            s.sendall(struct.pack(">BBI", 0x04, 0, 5) + b"\x00\x00\x00\x01\x01")
        assert _read_pdu(s)[:1] == b"\x07"  # A-ABORT
    assert not list((tmp_path / "fast-True" / "spool").rglob(f"{uid}.dcm"))
    assert _send(node.port, [pydicom.dcmread(write_ct_series(tmp_path / "ok", 1, 16, 16, seed=14)[0])],
                 ExplicitVRLittleEndian) == [0]


def test_a_data_set_over_the_size_limit_is_counted_not_held(tmp_path: Path) -> None:
    """limits.max_instance_bytes: the DUL drops the fragments past it and answers 0xA700 itself."""
    cfg = parse_config({"node": {"ae_title": NODE, "port": 0, "data_dir": str(tmp_path)},
                        "accept": {"calling_ae_titles": [SENDER]}, "limits": {"max_instance_bytes": 20_000}})
    index = open_test_store(tmp_path)
    _Counting.fast_calls = 0
    node = _Counting(cfg, Spool(tmp_path, index, durable=False, limits=cfg.limits))
    node.start()
    try:
        big = pydicom.dcmread(write_ct_series(tmp_path / "big", 1, 128, 128, seed=15)[0])  # 32 kB of pixels
        small = pydicom.dcmread(write_ct_series(tmp_path / "small", 1, 16, 16, seed=16)[0])
        assert _send(node.port, [big, small], ExplicitVRLittleEndian) == [0xA700, 0]
    finally:
        node.stop()
        index.close()
    assert _Counting.fast_calls == 1  # only the small one reached the handler
    assert [p.stem for p in (tmp_path / "spool").rglob("*.dcm")] == [small.SOPInstanceUID]


def test_a_data_set_over_the_size_limit_on_the_stock_path_aborts(tmp_path: Path) -> None:
    """A request the fast path declines is held by pynetdicom: past the limit the association is aborted."""
    cfg = parse_config({"node": {"ae_title": NODE, "port": 0, "data_dir": str(tmp_path)},
                        "accept": {"calling_ae_titles": [SENDER]}, "limits": {"max_instance_bytes": 20_000}})
    index = open_test_store(tmp_path)
    node = StoreSCP(cfg, Spool(tmp_path, index, durable=False, limits=cfg.limits))
    node.start()
    try:
        big = pydicom.dcmread(write_ct_series(tmp_path / "big", 1, 128, 128, seed=17)[0])
        big.SOPInstanceUID = "1.2.03.4"  # declined by decode_store_request: pynetdicom receives it
        ae = AE(ae_title=SENDER)
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE)
        assert assoc.is_established
        rsp = assoc.send_c_store(big)
        assert "Status" not in rsp  # no response: the node aborted
        deadline = time.monotonic() + 5
        while not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert assoc.is_aborted
        small = pydicom.dcmread(write_ct_series(tmp_path / "small", 1, 16, 16, seed=18)[0])
        assert _send(node.port, [small], ExplicitVRLittleEndian) == [0]
    finally:
        node.stop()
        index.close()
    assert [p.stem for p in (tmp_path / "spool").rglob("*.dcm")] == [small.SOPInstanceUID]
