"""Outbound DICOM: C-ECHO and C-STORE SCU (pynetdicom), used by ``echo``/``send`` and the dispatcher.

Files are sent as they are on disk: pynetdicom reads the file meta and streams the
encoded dataset without decoding or transcoding it, so the presentation contexts we
propose are exactly the (SOP class, transfer syntax) pairs of the files.  A peer that
does not accept a file's transfer syntax gets no such file; the result says so.

TCP_NODELAY is set on the socket as soon as it is connected.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.events import Event
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association


class SendError(Exception):
    """The association could not be established or broke down (nothing or not all sent)."""


@dataclass(frozen=True)
class Peer:
    """Where to send: AE title, host, port (config.PeerSection fits this shape); ``tls``: use DICOM TLS."""

    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = None  # net.tls.client_context(cfg.tls) for peers with tls = true

    @property
    def tls_args(self) -> tuple[ssl.SSLContext, str] | None:
        return None if self.tls is None else (self.tls, self.host)


@dataclass(frozen=True)
class SendResult:
    """Outcome for one file: ``status`` is the peer's DICOM status, or None if never sent."""

    path: Path
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        # 0x0000 Success; 0xB000/0xB007/0xB006 are warnings (stored, coerced/elements discarded)
        return self.status is not None and (self.status == 0 or (self.status & 0xF000) == 0xB000)


def _nodelay(event: Event) -> None:
    sock = event.assoc.dul.socket
    raw = getattr(sock, "socket", None)
    if raw is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


_HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, _nodelay)]


def _make_ae(local_ae: str, timeout: float) -> AE:
    # Send files as they are: without this pynetdicom decodes and re-encodes every dataset.
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title=local_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def echo(peer: Peer, *, local_ae: str, timeout: float = 30.0) -> int:
    """C-ECHO ``peer``; returns the status (0 = success).  Raises SendError if no association."""
    ae = _make_ae(local_ae, timeout)
    ae.add_requested_context(Verification, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=_HANDLERS,
                         tls_args=peer.tls_args)
    if not assoc.is_established:
        raise SendError(_why_not(assoc, peer))
    try:
        rsp = assoc.send_c_echo()
        status = rsp.get("Status") if rsp is not None else None
        if status is None:
            raise SendError(f"no C-ECHO response from {peer.ae_title}@{peer.host}:{peer.port}")
        return int(status)
    finally:
        assoc.release()


def _why_not(assoc: Any, peer: Peer) -> str:
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    if assoc.is_rejected:
        return f"association rejected by {where}"
    return f"cannot associate with {where} (connection refused, timed out or aborted)"


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files given directly, plus every regular file below given folders (sorted)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")))
        else:
            out.append(p)
    return out


_META_TAGS = [Tag(0x0008, 0x0016)]


def _contexts_of(path: Path) -> tuple[str, str]:
    ds = dcmread(path, stop_before_pixels=True, specific_tags=_META_TAGS)
    sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if not sop_class or not ts:
        raise ValueError("no SOP Class UID or transfer syntax in the file meta")
    return sop_class, ts


def send_files(
    peer: Peer, paths: Sequence[Path], *, local_ae: str, timeout: float = 30.0
) -> list[SendResult]:
    """C-STORE every file to ``peer`` over as few associations as the 128-context limit allows.

    Returns one :class:`SendResult` per input path (same order).  Unreadable files get
    ``status=None`` and an error; raises :class:`SendError` only when no association
    could be established at all.
    """
    results: dict[Path, SendResult] = {}
    groups: list[list[tuple[Path, tuple[str, str]]]] = [[]]
    ctx_sets: list[set[tuple[str, str]]] = [set()]
    for path in paths:
        try:
            pair = _contexts_of(path)
        except Exception as exc:  # noqa: BLE001 - reported per file
            results[path] = SendResult(path, None, f"not a DICOM file: {exc}")
            continue
        if pair not in ctx_sets[-1] and len(ctx_sets[-1]) >= MAX_CONTEXTS:
            groups.append([])
            ctx_sets.append(set())
        groups[-1].append((path, pair))
        ctx_sets[-1].add(pair)

    established_any = False
    last_error = ""
    for group, ctxs in zip(groups, ctx_sets, strict=True):
        if not group:
            continue
        ae = _make_ae(local_ae, timeout)
        ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in sorted(ctxs)]
        assoc = ae.associate(
            peer.host, peer.port, ae_title=peer.ae_title, max_pdu=0, evt_handlers=_HANDLERS,
            tls_args=peer.tls_args,
        )
        if not assoc.is_established:
            last_error = _why_not(assoc, peer)
            for path, _ in group:
                results[path] = SendResult(path, None, last_error)
            continue
        established_any = True
        try:
            accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
            for path, pair in group:
                if pair not in accepted:
                    results[path] = SendResult(path, None, f"peer did not accept {pair[0]} in {pair[1]}")
                    continue
                if not assoc.is_established:
                    results[path] = SendResult(path, None, "association lost")
                    continue
                rsp = assoc.send_c_store(path)
                status = rsp.get("Status") if rsp is not None and "Status" in rsp else None
                results[path] = SendResult(
                    path, None if status is None else int(status),
                    None if status is not None else "no response (timeout or association aborted)",
                )
        finally:
            if assoc.is_established:
                assoc.release()
    if not established_any and paths and any(r.error == last_error for r in results.values()) and last_error:
        raise SendError(last_error)
    return [results[p] for p in paths]
