"""The intake fast path: event-driven pynetdicom reactors, hand-encoded File Meta, header scan.

Each part replaces slow generic code with a narrower equivalent, so the tests here compare
the two (same bytes, same header values, same association behaviour) and pin the pynetdicom
sources the reactors were copied from.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import io
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pynetdicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from intake_series import write_ct_series
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import (
    AE,
    acse,
    association,
    dimse,
    dimse_messages,
    dsutils,
    dul,
    events,
    fsm,
    service_class,
    transport,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from stores import open_test_store

from medclf_node.config import Config, parse_config
from medclf_node.ingest.spool import StoreError, _parse_with_pydicom, parse_header, scan_header
from medclf_node.net import part10, reactor, store_rsp
from medclf_node.net.scp import StoreSCP

# sha256[:16] of the pynetdicom 3.0.4 source of everything reactor.py / part10.py / fast_store.py copies,
# overrides or relies on.  A mismatch means pynetdicom changed: re-read the new code, port
# the change into medclf_node/net/reactor.py (or part10.py), then update the hash here.
PINNED = {
    "dul.DULServiceProvider.__init__": "c82dafa9438ddf70",
    "dul.DULServiceProvider.run_reactor": "e3a10eb3a0931e48",
    "dul.DULServiceProvider.send_pdu": "7cbce5da8594124e",
    "dul.DULServiceProvider.kill_dul": "5ceccf8dd01c2072",
    "dul.DULServiceProvider.stop_dul": "28a7e0be126e7b30",
    "association.Association.__init__": "eb07516b8009ad8f",
    "association.Association._run_reactor": "f28838c5559e462a",
    "association.Association.kill": "8f9713666a7f4cff",
    "transport.RequestHandler._create_association": "05c8d12b79863cdb",
    "transport.AssociationSocket.__init__": "1f0325fdef2cc353",
    "transport.AssociationSocket.recv": "6bc20a33b1b7cfe7",
    "transport.AssociationSocket.ready": "3eb58e3d39dc076d",  # BulkRecvSocket.ready wraps it (gate prefetch)
    "dimse.DIMSEServiceProvider.receive_primitive": "5f99c86b14a15cef",
    "dimse.DIMSEServiceProvider.__init__": "bbecd186810e7700",
    "dimse.DIMSEServiceProvider.send_msg": "a839cf2fb46976d9",
    "dimse_messages.DIMSEMessage.encode_msg": "73000c902c52832d",
    "acse.ACSE.is_release_requested": "894b33d21a8dec8e",
    "acse.ACSE.is_aborted": "ad2eb3f545a9ed05",
    "acse.ACSE.send_release": "28eaf9df836ca88f",
    "events.Event.encoded_dataset": "879e44cd3dc43358",
    "events.Event.file_meta": "dfb0c2851e2e2614",
    "dsutils.create_file_meta": "035ed415f5aeea15",
    # the C-STORE fast path (fast_store.py, WakeableDUL._take_pdata) copies or mirrors these
    "dul.DULServiceProvider._read_pdu_data": "19f2d4e38c13c835",
    "dul.DULServiceProvider._decode_pdu": "fc71dd1bf853e1ce",
    "fsm.DT_2": "9ec543394e0b49eb",
    "dimse_messages.DIMSEMessage.decode_msg": "f51c777e841a76be",
    "dimse_messages.DIMSEMessage.message_to_primitive": "f8f43d34e43450ef",
    "association.Association._serve_request": "2f24c1759cdf6c8c",
    "service_class.StorageServiceClass.SCP": "63afca7fc6c6e7ee",
    "transport.AssociationSocket.send": "1ea8158c0b51faca",
}
MODULES = {
    "acse": acse,
    "association": association,
    "dimse": dimse,
    "dimse_messages": dimse_messages,
    "dsutils": dsutils,
    "dul": dul,
    "events": events,
    "fsm": fsm,
    "service_class": service_class,
    "transport": transport,
}


def _source_hash(dotted: str) -> str:
    module, *names = dotted.split(".")
    obj: Any = MODULES[module]
    for name in names:
        obj = inspect.getattr_static(obj, name)
    if isinstance(obj, property):
        obj = obj.fget
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def test_pynetdicom_is_the_version_the_fast_path_was_written_for() -> None:
    assert pynetdicom.__version__ == reactor.PYNETDICOM_VERSION, (
        f"pynetdicom {pynetdicom.__version__} installed; medclf_node/net/reactor.py copies code from "
        f"{reactor.PYNETDICOM_VERSION}: review it against the new version, then update PYNETDICOM_VERSION"
    )
    changed = [name for name, digest in PINNED.items() if _source_hash(name) != digest]
    assert not changed, f"pynetdicom internals the fast path depends on changed: {changed}"


def test_other_pynetdicom_version_falls_back_to_stock(monkeypatch: pytest.MonkeyPatch) -> None:
    assert reactor.request_handler() is reactor.WakeableRequestHandler
    monkeypatch.setattr(pynetdicom, "__version__", "9.9.9")
    assert reactor.request_handler() is None


# --- File Meta ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sop_class,sop_instance,syntax",
    [
        (CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian),  # even, even, odd
        (CTImageStorage, "1.2.3.45", ImplicitVRLittleEndian),
        ("1.2", "1." + "2" * 62, RLELossless),  # 64 characters
        ("1", "0", "1.2.840.10008.1.2.1"),
    ],
)
def test_file_meta_is_byte_identical_to_pynetdicoms(sop_class: str, sop_instance: str, syntax: str) -> None:
    expected = dsutils.encode_file_meta(
        dsutils.create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax)
    )
    assert part10.file_meta(sop_class, sop_instance, syntax) == expected


@pytest.mark.parametrize("value", ["", None, "1.2.\u00e9", "1." + "2" * 63])
def test_unusual_file_meta_values_are_left_to_pynetdicom(value: Any) -> None:
    assert part10.file_meta(CTImageStorage, value, ExplicitVRLittleEndian) is None


def test_encoded_dataset_equals_pynetdicoms(tmp_path: Path) -> None:
    """Through a real association: the handler sees the same bytes either way."""
    seen: list[tuple[bytes, bytes]] = []

    def on_store(event: Any) -> int:
        seen.append((part10.encoded_dataset(event), event.encoded_dataset(include_meta=True)))
        return 0x0000

    scp_ae = AE(ae_title="FAST")
    scp_ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = scp_ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(pynetdicom.evt.EVT_C_STORE, on_store)])
    try:
        files = write_ct_series(tmp_path / "s", 2, 16, 16, seed=21)
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="FAST")
        assert assoc.is_established
        for f in files:
            assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    assert len(seen) == 2
    assert all(ours == theirs for ours, theirs in seen)


# --- C-STORE response -------------------------------------------------------------------
@pytest.mark.parametrize(
    "status,sop_class,sop_instance",
    [(0x0000, CTImageStorage, "1.2.3.4"), (0xA700, CTImageStorage, "1.2.3.45"), (0xC210, "1.2", "1." + "9" * 62)],
)
def test_store_response_is_byte_identical_to_pynetdicoms(status: int, sop_class: str, sop_instance: str) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    msg = dimse_messages.C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (stock,) = list(msg.encode_msg(3, 16384))
    assert stock.presentation_data_value_list == [(3, b"\x03" + (store_rsp.encode_store_response(rsp) or b""))]


def test_store_response_with_error_comment_is_left_to_pynetdicom() -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.3"
    rsp.Status = 0xC211
    rsp.ErrorComment = "no"
    assert store_rsp.encode_store_response(rsp) is None
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = "1.2.3"
    request.Priority = 2
    assert store_rsp.encode_store_response(request) is None


# --- header scan -------------------------------------------------------------------------
def _encode(ds: Dataset, syntax: str) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def slice_ds(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return pydicom.dcmread(write_ct_series(tmp_path_factory.mktemp("hs"), 1, 16, 16, seed=22)[0])


def _variants(ds: Dataset) -> Iterator[tuple[str, bytes]]:
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        yield f"plain-{syntax}", _encode(copy.deepcopy(ds), syntax)
        multi = copy.deepcopy(ds)
        multi.NumberOfFrames = "3"
        seq_item = Dataset()
        seq_item.ReferencedSOPClassUID = CTImageStorage
        seq_item.ReferencedSOPInstanceUID = "1.2.3"
        multi.ReferencedImageSequence = [seq_item]  # pydicom writes it with undefined length
        yield f"frames+sequence-{syntax}", _encode(multi, syntax)
        private = copy.deepcopy(ds)
        private.add_new(0x00091010, "LO", "vendor")
        private.add_new(0x00291010, "OB", b"\x01\x02")
        yield f"private-{syntax}", _encode(private, syntax)


def test_scan_agrees_with_pydicom_on_valid_files(slice_ds: Dataset) -> None:
    scanned_any = False
    for name, data in _variants(slice_ds):
        scanned = scan_header(data)
        if scanned is not None:
            scanned_any = True
            assert scanned == _parse_with_pydicom(data), name
        assert parse_header(data).series_uid == str(slice_ds.SeriesInstanceUID), name
    assert scanned_any
    plain = _encode(copy.deepcopy(slice_ds), ExplicitVRLittleEndian)
    assert scan_header(plain) == (
        {
            "transfer_syntax": ExplicitVRLittleEndian,
            "sop_class_uid": str(slice_ds.SOPClassUID),
            "sop_instance_uid": str(slice_ds.SOPInstanceUID),
            "study_uid": str(slice_ds.StudyInstanceUID),
            "series_uid": str(slice_ds.SeriesInstanceUID),
        },
        {"rows": 16, "columns": 16, "frames": 1},
    )


def test_scan_defers_what_it_does_not_vouch_for(slice_ds: Dataset) -> None:
    plain = _encode(copy.deepcopy(slice_ds), ExplicitVRLittleEndian)
    big_endian = plain.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.2\x00", 1)
    assert big_endian != plain and scan_header(big_endian) is None
    no_series = copy.deepcopy(slice_ds)
    del no_series.SeriesInstanceUID
    data = _encode(no_series, ExplicitVRLittleEndian)
    assert scan_header(data) is None
    with pytest.raises(StoreError):
        parse_header(data)
    assert scan_header(b"\x00" * 128 + b"DICM" + b"garbage" * 10) is None
    # cut inside the Pixel Data element header: pydicom fails reading it, so the scan must not answer
    at = plain.index(b"\xe0\x7f\x10\x00OW")
    assert scan_header(plain[: at + 10]) is None
    assert scan_header(plain[: at + 12]) == scan_header(plain)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    muts=st.lists(
        st.tuples(
            st.sampled_from(["flip", "truncate", "byte", "u16", "u32", "vr"]),
            st.integers(0, 2000),
            st.integers(0, 2**32 - 1),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_scan_never_disagrees_with_pydicom_on_damaged_files(
    slice_ds: Dataset, muts: list[tuple[str, int, int]]
) -> None:
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        buf = bytearray(_encode(copy.deepcopy(slice_ds), syntax))
        for kind, pos, value in muts:
            pos = 128 + pos % (len(buf) - 128)
            if kind == "flip":
                buf[pos] ^= 1 << (value % 8)
            elif kind == "truncate":
                del buf[pos:]
            elif kind == "byte":
                buf[pos] = value & 0xFF
            elif kind == "vr":  # the next VR-looking pair of capitals becomes another VR (meta included)
                at = next((i for i in range(pos, len(buf) - 1) if 65 <= buf[i] <= 90 and 65 <= buf[i + 1] <= 90), None)
                if at is not None:
                    buf[at : at + 2] = [b"OB", b"SQ", b"UN", b"US", b"UL", b"UI", b"XX", b"UT", b"IS"][value % 9]
            elif kind == "u16":
                buf[pos : pos + 2] = struct.pack("<H", value & 0xFFFF)
            else:
                buf[pos : pos + 4] = struct.pack("<I", value)
            if len(buf) <= 132:
                break
        data = bytes(buf)
        scanned = scan_header(data)
        if scanned is not None:
            assert scanned == _parse_with_pydicom(data)


# --- reactors ----------------------------------------------------------------------------
@dataclass
class Listener:
    released: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)

    def instance_received(self, assoc_id: str, series_uid: str) -> None:
        self.instances.append(series_uid)

    def association_released(self, assoc_id: str) -> None:
        self.released.append(assoc_id)

    def association_aborted(self, assoc_id: str) -> None:
        self.aborted.append(assoc_id)


def _config(data_dir: Path) -> Config:
    return parse_config(
        {
            "node": {"ae_title": "MEDCLF", "port": 0, "data_dir": str(data_dir)},
            "accept": {"calling_ae_titles": ["SCANNER"]},
        }
    )


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[tuple[StoreSCP, Listener]]:
    from medclf_node.ingest.spool import Spool

    cfg = _config(tmp_path / "data")
    index = open_test_store(tmp_path / "data")
    listener = Listener()
    node = StoreSCP(cfg, Spool(tmp_path / "data", index, durable=False), listener)
    node.start()
    yield node, listener
    node.stop()
    index.close()


def _sender() -> AE:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    return ae


def _wait(pred: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(pred())


def test_node_associations_run_the_wakeable_reactors(scp: tuple[StoreSCP, Listener], tmp_path: Path) -> None:
    node, listener = scp
    assoc = _sender().associate("127.0.0.1", node.port, ae_title="MEDCLF")
    assert assoc.is_established
    assert node._server is not None
    served = node._server.active_associations
    assert served and all(isinstance(a, reactor.WakeableAssociation) for a in served)
    assert all(isinstance(a.dul, reactor.WakeableDUL) for a in served)
    assert all(isinstance(a.dul.socket, reactor.BulkRecvSocket) for a in served)
    files = write_ct_series(tmp_path / "s", 3, 64, 64, seed=23)
    for f in files:
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released
    assert _wait(lambda: len(listener.released) == 1)
    assert len(listener.instances) == 3 and listener.aborted == []
    # an abort is reported as such
    assoc = _sender().associate("127.0.0.1", node.port, ae_title="MEDCLF")
    assert assoc.is_established
    assoc.abort()
    assert _wait(lambda: len(listener.aborted) == 1)
    assert len(listener.released) == 1


def test_store_and_echo_are_served_in_the_dul_thread(
    scp: tuple[StoreSCP, Listener], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No hand-over to the association thread and back: the handler runs in the DUL thread."""
    node, _ = scp
    threads: list[threading.Thread] = []
    real_store, real_echo = StoreSCP._store_instance, StoreSCP._on_echo

    def store(self: StoreSCP, assoc: Any, encoded: Any) -> Any:
        threads.append(threading.current_thread())
        return real_store(self, assoc, encoded)

    def echo(self: StoreSCP, event: Any) -> Any:
        threads.append(threading.current_thread())
        return real_echo(self, event)

    monkeypatch.setattr(node, "_store_instance", store.__get__(node))
    monkeypatch.setattr(node, "_on_echo", echo.__get__(node))
    node.stop()
    node.start()  # handlers are bound at start
    assoc = _sender().associate("127.0.0.1", node.port, ae_title="MEDCLF")
    assert assoc.is_established
    for f in write_ct_series(tmp_path / "s", 2, 16, 16, seed=24):
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert len(threads) == 3 and all(isinstance(t, reactor.WakeableDUL) for t in threads)


def test_idle_association_blocks_instead_of_polling(
    scp: tuple[StoreSCP, Listener], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stock pynetdicom wakes every 1 ms (~1000 passes/s); ours waits for data, at most IDLE_WAIT."""
    passes = {"dul": 0}
    real_wait = reactor.WakeableDUL._wait_for_work

    def counting_wait(self: reactor.WakeableDUL) -> None:
        passes["dul"] += 1
        real_wait(self)

    monkeypatch.setattr(reactor.WakeableDUL, "_wait_for_work", counting_wait)
    node, _ = scp
    assoc = _sender().associate("127.0.0.1", node.port, ae_title="MEDCLF")
    assert assoc.is_established
    time.sleep(0.3)
    before = passes["dul"]
    assert before > 0  # the node really runs WakeableDUL
    time.sleep(1.0)
    idle = passes["dul"] - before
    assert assoc.send_c_echo().Status == 0x0000  # still answers at once after idling
    assoc.release()
    assert idle <= 2 * (1.0 / reactor.IDLE_WAIT) + 5, idle


def test_conn_close_after_release_response_counts_as_release(tmp_path: Path) -> None:
    """EVT_CONN_CLOSE (DUL thread) can run before EVT_RELEASED (association thread) once the
    A-RELEASE-RP went out; the release must still be reported once, as a release."""
    listener = Listener()
    node = StoreSCP(_config(tmp_path / "d"), spool=None, listener=listener)  # type: ignore[arg-type]
    released = SimpleNamespace(assoc=SimpleNamespace(_sent_release=True))
    lost = SimpleNamespace(assoc=SimpleNamespace(_sent_release=False))
    node._assoc_id(released.assoc)
    node._assoc_id(lost.assoc)
    node._on_conn_close(released)  # type: ignore[arg-type]
    node._on_released(released)  # type: ignore[arg-type]  # the late EVT_RELEASED: no second report
    node._on_conn_close(lost)  # type: ignore[arg-type]
    assert len(listener.released) == 1 and len(listener.aborted) == 1


def test_concurrent_associations_each_get_their_answers(scp: tuple[StoreSCP, Listener], tmp_path: Path) -> None:
    node, listener = scp
    series = [write_ct_series(tmp_path / f"s{i}", 5, 32, 32, seed=30 + i) for i in range(3)]
    statuses: list[int] = []
    lock = threading.Lock()

    def send(files: list[Path]) -> None:
        assoc = _sender().associate("127.0.0.1", node.port, ae_title="MEDCLF")
        for f in files:
            st_ = assoc.send_c_store(pydicom.dcmread(f)).Status
            with lock:
                statuses.append(int(st_))
        assoc.release()

    threads = [threading.Thread(target=send, args=(s,)) for s in series]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert statuses == [0] * 15
    assert _wait(lambda: len(listener.released) == 3)
