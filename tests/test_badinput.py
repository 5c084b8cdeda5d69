"""Hostile and broken input: raw-socket PDUs and malformed datasets against a running node.

After every case the node must still serve a C-ECHO, write nothing outside its spool, and
log reasons without patient data.  One node (subprocess) serves the whole module.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import NODE_AE, SENDER_AE, RunningNode, node_sections, start_node, write_config
from intake_series import write_ct_series
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from medclf_node.config import RuleSection, VolumeSection
from medclf_node.ingest.selection import Skipped, read_headers, select
from medclf_node.ingest.volume import VolumeError, assemble_volume
from medclf_node.net.scu import Peer, send_files

PATIENT_NAME = "Secret^Patient"
PATIENT_ID = "PID-SECRET-42"
CANNOT_UNDERSTAND = 0xC210

# --- raw PDUs (PS3.8 9.3) -------------------------------------------------------------


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(called: str = NODE_AE, calling: str = SENDER_AE, abstract: str = "1.2.840.10008.1.1") -> bytes:
    """A valid A-ASSOCIATE-RQ with one presentation context (id 1, Implicit VR LE)."""
    ctx = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, abstract.encode()) + _item(0x40, b"1.2.840.10008.1.2"))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + ctx + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def _read_pdu(s: socket.socket) -> bytes:
    head = b""
    while len(head) < 6 and (chunk := s.recv(6 - len(head))):
        head += chunk
    body = b""
    if len(head) == 6:
        (length,) = struct.unpack(">I", head[2:])
        while len(body) < length and (chunk := s.recv(length - len(body))):
            body += chunk
    return head + body


def exchange(port: int, data: bytes, timeout: float = 8.0) -> bytes:
    """Send ``data``, half-close, and collect whatever the node answers until it closes.

    When ``data`` starts with a complete A-ASSOCIATE-RQ, the node's answer to it is awaited
    before the rest is sent (as a real peer would), and the connection is not half-closed,
    so that the node's own reaction (A-ABORT, or close at the idle timeout) is what we see.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        first = b""
        established = data.startswith(RQ) and len(data) > len(RQ)
        if established:
            s.sendall(RQ)
            first = _read_pdu(s)
            data = data[len(RQ):]
        s.sendall(data)
        if not established:
            s.shutdown(socket.SHUT_WR)
        out = first
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def pdu_types(stream: bytes) -> list[int]:
    """The PDU types in a byte stream the node sent."""
    types, pos = [], 0
    while pos + 6 <= len(stream):
        kind, _, length = struct.unpack(">BBI", stream[pos:pos + 6])
        types.append(kind)
        pos += 6 + length
    return types


# --- the node --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    base = tmp_path_factory.mktemp("badinput")
    data = base / "data"
    data.mkdir()
    cfg = write_config(base / "node.toml", node_sections(data, limits={"idle_timeout_seconds": 2.0}))
    running = start_node(cfg, data, base / "node.log")
    yield running
    running.stop()
    assert PATIENT_NAME not in running.log() and PATIENT_ID not in running.log(), "patient data in the log"


def echo_ok(port: int) -> bool:
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(Verification, [ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return rsp is not None and int(rsp.Status) == 0
    finally:
        assoc.release()


RQ = associate_rq()
RAW_CASES: dict[str, bytes] = {
    "garbage": bytes(range(256)) * 4,
    "unknown_pdu_type": b"\x99\x00\x00\x00\x00\x04abcd",
    "huge_length_then_close": b"\x01\x00\xff\xff\xff\xff" + b"x" * 10,
    "truncated_associate_rq": RQ[:30],
    "empty_associate_rq": b"\x01\x00\x00\x00\x00\x00",
    "associate_rq_bad_item_lengths": RQ[:80] + b"\x10\x00\xff\xff" + RQ[84:],
    "valid_association_then_truncated_p_data": RQ + struct.pack(">BBI", 0x04, 0, 1000) + b"abc",
    "valid_association_then_garbage_p_data": RQ + p_data(1, 0x03, bytes(range(50))),
    "valid_association_then_unknown_context": RQ + p_data(99, 0x03, b"\x00" * 20),
    "release_without_association": b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00",
}


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_malformed_pdus_get_abort_or_close_and_node_keeps_serving(node: RunningNode, case: str) -> None:
    t0 = time.monotonic()
    answer = exchange(node.port, RAW_CASES[case])
    assert time.monotonic() - t0 < 8, "the node closes a broken connection (idle timeout at most)"
    kinds = pdu_types(answer)
    # Nothing but an association answer (AC/RJ) before an A-ABORT; never a DIMSE reply to garbage.
    assert set(kinds) <= {0x02, 0x03, 0x07}, (case, answer[:40])
    if case.startswith("valid_association_then_garbage") or case.endswith("unknown_context"):
        assert kinds[:1] == [0x02] and 0x07 in kinds, "accepted, then aborted"
    assert node.proc.poll() is None
    assert echo_ok(node.port)


def _listen_backlog(port: int) -> int:
    """The accept-queue limit of the socket listening on ``port`` (``ss`` shows it as Send-Q)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[2])


def test_many_broken_connections_in_parallel(node: RunningNode) -> None:
    """A burst of half-open and garbage connections does not wedge the listener."""
    # With socketserver's default backlog of 5, a burst while the acceptor waits for the GIL
    # overflows the accept queue and the kernel drops SYNs (a connect timed out in CI).
    assert _listen_backlog(node.port) >= 64
    socks = []
    try:
        for i in range(20):
            s = socket.create_connection(("127.0.0.1", node.port), timeout=5)
            s.sendall(RQ[: 10 + i] if i % 2 else os.urandom(64))
            socks.append(s)
        assert echo_ok(node.port)
    finally:
        for s in socks:
            s.close()
    assert echo_ok(node.port)


# --- malformed datasets ----------------------------------------------------------------


def _base(tmp: Path, name: str) -> Dataset:
    (path,) = write_ct_series(tmp / name, 1, 32, 32, seed=hash(name) % 1000, patient_id=PATIENT_ID)
    ds = pydicom.dcmread(path)
    ds.PatientName = PATIENT_NAME
    return ds


def _save(ds: Dataset, path: Path, *, implicit: bool = False) -> Path:
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def _send(node: RunningNode, paths: list[Path]) -> list[int | None]:
    return [r.status for r in send_files(Peer(NODE_AE, "127.0.0.1", node.port), paths, local_ae=SENDER_AE)]


def _stored(node: RunningNode, sop_uid: str) -> Path | None:
    found = list((node.data_dir / "spool").rglob(f"{sop_uid}.dcm"))
    return found[0] if found else None


@pytest.mark.parametrize("attr,value", [
    ("StudyInstanceUID", "../../../../tmp/evil"),
    ("SeriesInstanceUID", "1.2/3.4"),
    ("SeriesInstanceUID", "1.2.3."),
    ("StudyInstanceUID", "1.02.3"),
    ("SeriesInstanceUID", "1." + "2" * 70),
    ("SOPInstanceUID", "..%2F..%2Fx"),
    ("StudyInstanceUID", ""),
])
def test_invalid_uids_are_refused_with_c210(node: RunningNode, tmp_path: Path, attr: str, value: str) -> None:
    ds = _base(tmp_path, "uid")
    setattr(ds, attr, value)
    path = _save(ds, tmp_path / "bad.dcm")
    assert _send(node, [path]) == [CANNOT_UNDERSTAND]
    assert _stored(node, ds.file_meta.MediaStorageSOPInstanceUID) is None
    names = [p.name for p in (node.data_dir / "spool").rglob("*")] if (node.data_dir / "spool").exists() else []
    assert not any("evil" in n or "%" in n or n.endswith(".") for n in names)
    assert not list(node.data_dir.parent.rglob("evil*"))
    assert echo_ok(node.port)


def _corrupt_bytes(tmp: Path, name: str, mutate: str) -> tuple[Path, str]:
    ds = _base(tmp, name)
    path = _save(ds, tmp / f"{name}.dcm")
    raw = bytearray(path.read_bytes())
    pos = raw.find(b"\x20\x00\x0d\x00UI")  # StudyInstanceUID element, explicit VR
    assert pos > 0
    if mutate == "length_overflow":
        raw[pos + 6:pos + 8] = b"\xff\x7f"  # value runs past the end of the header
    elif mutate == "truncated_header":
        raw = raw[: pos + 4]
    path.write_bytes(bytes(raw))
    return path, str(ds.SOPInstanceUID)


def _relabel(raw: bytes, ts: str, was: str = ExplicitVRLittleEndian) -> bytes:
    """Change the file meta's Transfer Syntax UID without re-encoding anything else."""
    old_value = was.encode() + (b"\x00" if len(was) % 2 else b"")
    new_value = ts.encode() + (b"\x00" if len(ts) % 2 else b"")
    old = b"\x02\x00\x10\x00UI" + struct.pack("<H", len(old_value)) + old_value
    new = b"\x02\x00\x10\x00UI" + struct.pack("<H", len(new_value)) + new_value
    assert raw.count(old) == 1
    group_at = raw.index(b"\x02\x00\x00\x00UL\x04\x00") + 8
    (group_len,) = struct.unpack("<I", raw[group_at:group_at + 4])
    raw = raw[:group_at] + struct.pack("<I", group_len + len(new) - len(old)) + raw[group_at + 4:]
    return raw.replace(old, new, 1)


@pytest.mark.parametrize("mutate", ["length_overflow", "truncated_header"])
def test_corrupt_element_lengths_are_refused_with_c210(node: RunningNode, tmp_path: Path, mutate: str) -> None:
    path, sop = _corrupt_bytes(tmp_path, mutate, mutate)
    assert _send(node, [path]) == [CANNOT_UNDERSTAND]
    assert _stored(node, sop) is None
    assert echo_ok(node.port)


def _stored_then_volume_error(node: RunningNode, path: Path, sop: str) -> str:
    """Stored as received (intake does not decode), refused with a code by the volume stage."""
    assert _send(node, [path]) == [0]
    stored = _stored(node, sop)
    assert stored is not None
    with pytest.raises(VolumeError) as info:
        assemble_volume([stored], VolumeSection())
    return info.value.code


def test_missing_pixel_data(node: RunningNode, tmp_path: Path) -> None:
    ds = _base(tmp_path, "nopix")
    del ds.PixelData
    code = _stored_then_volume_error(node, _save(ds, tmp_path / "nopix.dcm"), str(ds.SOPInstanceUID))
    assert code == "no_pixels"


def test_pixel_data_of_wrong_length(node: RunningNode, tmp_path: Path) -> None:
    ds = _base(tmp_path, "short")
    ds.PixelData = ds.PixelData[:100]
    code = _stored_then_volume_error(node, _save(ds, tmp_path / "short.dcm"), str(ds.SOPInstanceUID))
    assert code == "decode_failed"


def test_wrong_transfer_syntax_claim(node: RunningNode, tmp_path: Path) -> None:
    """File meta says JPEG Baseline, the pixel data is native: stored as received, not decodable."""
    ds = _base(tmp_path, "jpegclaim")
    path = _save(ds, tmp_path / "jpegclaim.dcm")
    path.write_bytes(_relabel(path.read_bytes(), JPEGBaseline8Bit))
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    code = _stored_then_volume_error(node, path, str(ds.SOPInstanceUID))
    assert code in ("decode_failed", "unreadable")


def test_implicit_data_under_an_explicit_claim(node: RunningNode, tmp_path: Path) -> None:
    """Implicit VR bytes labelled Explicit VR: refused (0xC210) or stored and still readable."""
    ds = _base(tmp_path, "implicit")
    path = _save(ds, tmp_path / "implicit.dcm", implicit=True)
    path.write_bytes(_relabel(path.read_bytes(), ExplicitVRLittleEndian, was=ImplicitVRLittleEndian))
    (status,) = _send(node, [path])
    assert status in (0, CANNOT_UNDERSTAND)
    stored = _stored(node, str(ds.SOPInstanceUID))
    if status == 0:
        assert stored is not None
        vol = assemble_volume([stored], VolumeSection())  # pydicom detects the real encoding
        assert vol.array.shape == (1, 32, 32)
    else:
        assert stored is None


def test_non_image_sop_class_is_stored_and_skipped_by_selection(node: RunningNode, tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "SR", PATIENT_NAME, PATIENT_ID
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = _save(ds, tmp_path / "sr.dcm")
    assert _send(node, [path]) == [0]
    stored = _stored(node, str(ds.SOPInstanceUID))
    assert stored is not None and stored.read_bytes().endswith(path.read_bytes()[-40:])
    choice = select(read_headers([stored]), [RuleSection(name="ct", models=["m"])])
    assert isinstance(choice, Skipped)
    with pytest.raises(VolumeError):
        assemble_volume([stored], VolumeSection())
    assert echo_ok(node.port)
