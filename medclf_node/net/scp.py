"""The node's DICOM listener: C-ECHO and C-STORE SCP on pynetdicom.

The C-STORE handler is deliberately thin: it takes the bytes exactly as the peer encoded
them (never decoded or transcoded; :func:`medclf_node.net.part10.encoded_dataset` is
``event.encoded_dataset()`` without pydicom's writer), hands them to the spool (durable write +
index) and answers with the spool's status.  Nothing slow runs here.

Accepted associations run the event-driven reactors of :mod:`medclf_node.net.reactor`
(pynetdicom's own poll every millisecond; C-STORE and C-ECHO are served in the DUL thread).

Associations are vetted at A-ASSOCIATE (``EVT_REQUESTED``): an unknown calling AE title
is rejected with "calling AE title not recognised" (result 1, source 1, reason 3), a
wrong called AE title with "called AE title not recognised" (reason 7).

Every accepted connection gets TCP_NODELAY; without it, P-DATA exchanges on loopback
stall on Nagle's algorithm + delayed ACKs.

Association lifecycle is reported to an :class:`AssociationListener` (the completion
tracker): a clean A-RELEASE counts as "the sender is done", an abort does not.
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from medclf_node.config import Config
from medclf_node.ingest.spool import STATUS_OUT_OF_RESOURCES, STATUS_UNEXPECTED, Spool, StoreError
from medclf_node.net import part10, reactor
from medclf_node.net.fast_store import StoreRequest
from medclf_node.net.gate import AssociationGate
from medclf_node.net.slots import AssociationSlots, Ticket
from medclf_node.net.tls import server_context
from medclf_node.retention import DiskWatermark
from medclf_node.telemetry import Telemetry

log = logging.getLogger(__name__)

# Preferred first: an acceptor picks the first of ours the requestor offers.
TRANSFER_SYNTAXES: list[UID] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)


class AssociationListener(Protocol):
    """Who wants to know about instances and association ends (the completion tracker)."""

    def instance_received(self, assoc_id: str, series_uid: str) -> None: ...

    def association_released(self, assoc_id: str) -> None: ...

    def association_aborted(self, assoc_id: str) -> None: ...


class NoDelayServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY on every accepted socket.

    With a :class:`~medclf_node.net.gate.AssociationGate` (:attr:`gate`), an accepted connection
    gets no thread: the gate holds it (TLS handshake included) until a complete A-ASSOCIATE-RQ
    arrived and a slot is free, then :meth:`start_association` starts pynetdicom's thread with the
    PDU already read.  Without one (stock pynetdicom reactors), the TLS handshake runs in the
    connection's own thread (pynetdicom does it in the acceptor, where one silent client would
    stop every other connection from being accepted).
    """

    # socketserver's default listen backlog is 5: a PACS opening many associations at once, or a
    # burst of broken connections while the acceptor thread waits for the GIL, overflows it and
    # the kernel drops SYNs (the peer retries after 1 s, 3 s, ... and may give up).
    request_queue_size = 1024
    #: the pre-association stage; None: every connection gets its thread at once (stock)
    gate: AssociationGate | None = None
    #: read by reactor.WakeableDUL: the C-STORE fast path's handler (None: pynetdicom's path only)
    fast_store: reactor.FastStoreHandler | None = None
    #: larger C-STORE data sets are counted, not held, and refused with 0xA700 (limits.max_instance_bytes)
    fast_store_max_bytes: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._prefetch_lock = threading.Lock()
        self._prefetched: dict[int, tuple[bytes, Ticket | None]] = {}

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()  # type: ignore[union-attr]
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Without a timeout, a peer that stops in the middle of a PDU blocks the association's
        # reactor in recv() for ever (pynetdicom's idle abort cannot get through): slowloris.
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.gate is not None:
            self.gate.submit(request, client_address)
        else:
            super().process_request(request, client_address)

    def start_association(self, sock: socket.socket, address: Any, rq_pdu: bytes, ticket: Ticket) -> None:
        """The gate's hand-off: pynetdicom's thread for ``sock``, whose A-ASSOCIATE-RQ was read already."""
        sock.settimeout(self.ae.network_timeout)
        with self._prefetch_lock:
            self._prefetched[id(sock)] = (rq_pdu, ticket)
        try:
            super().process_request(sock, address)
        except BaseException:
            with self._prefetch_lock:
                self._prefetched.pop(id(sock), None)
            raise

    def take_prefetched(self, sock: Any) -> tuple[bytes, Ticket | None]:
        """What the gate read from ``sock`` and the slot it took (reactor.WakeableRequestHandler asks)."""
        with self._prefetch_lock:
            return self._prefetched.pop(id(sock), (b"", None))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._prefetch_lock:
            ticket = self._prefetched.get(id(request), (b"", None))[1]
        try:
            self._process_request_thread(request, client_address)
        finally:
            with self._prefetch_lock:
                self._prefetched.pop(id(request), None)
            # the association thread gives the slot back when it ends; if none started, here
            if ticket is not None and getattr(ticket.owner, "ident", None) is None:
                ticket.release()

    def _process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.gate is None and isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (OSError, ValueError) as exc:  # plain TCP, wrong CA, no client certificate, timeout
                log.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


def _guard_dimse(assoc: Any, assoc_id: str) -> None:
    """A-ABORT an association whose DIMSE message cannot be decoded.

    pynetdicom 3.0 lets a malformed command set (e.g. no Command Field) raise inside its
    DUL reactor thread: the reactor dies and the peer sees the connection drop without an
    answer.  Wrapping the per-association DIMSE entry point turns that into an A-ABORT.
    """
    dimse = assoc.dimse
    receive = dimse.receive_primitive

    def guarded(primitive: Any) -> None:
        try:
            receive(primitive)
        except Exception as exc:  # noqa: BLE001 - hostile input must not kill the reactor
            log.warning("association %s: malformed DIMSE message (%s), aborting", assoc_id, type(exc).__name__)
            assoc.abort(block=False)

    dimse.receive_primitive = guarded


class StoreSCP:
    """C-ECHO + C-STORE listener bound to ``node.host:node.port``.

    ``start()`` binds and serves in a background thread; :attr:`port` is the bound port
    (useful when the config says 0).  ``stop()`` closes the listener and aborts any
    association still open.
    """

    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        listener: AssociationListener | None = None,
        *,
        telemetry: Telemetry | None = None,
        watermark: DiskWatermark | None = None,
        fast_path: bool = True,
    ) -> None:
        self.cfg = cfg
        # C-STORE requests read straight from the PDUs (reactor.py / fast_store.py); False: pynetdicom's path
        self.fast_path = fast_path
        self.spool = spool
        self.listener = listener
        self.telemetry = telemetry or Telemetry.disabled()
        self.watermark = watermark
        self.allowed_calling = cfg.allowed_calling_ae_titles()
        self._server: NoDelayServer | None = None
        self._thread: threading.Thread | None = None
        self._ids: dict[int, str] = {}
        self._ids_lock = threading.Lock()
        self._counter = itertools.count(1)
        self._boot = f"{int(time.time()):x}"
        # the pre-association gate needs our request handler (it hands over the A-ASSOCIATE-RQ bytes)
        self._gated = reactor.supported()
        self._gate: AssociationGate | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        # pynetdicom's "standard" handlers decode and format every PDU/DIMSE message for its
        # debug log even when nothing is logged: ~25% of the intake's CPU.  Our own handlers log.
        pynetdicom_config.LOG_HANDLER_LEVEL = "none"
        ae = AE(ae_title=self.cfg.node.ae_title)
        ae.maximum_pdu_size = self.cfg.node.max_pdu
        limits = self.cfg.limits
        # More than maximum_associations: A-ASSOCIATE-RJ (2, 3, 2) "local limit exceeded", transient.
        # (with the gate, AssociationSlots counts instead: pynetdicom's count includes ending threads)
        ae.maximum_associations = limits.max_associations if not self._gated else 1 << 30
        # Silent peers (idle association, connection without A-ASSOCIATE-RQ) are aborted after this.
        ae.network_timeout = limits.idle_timeout_seconds
        ae.acse_timeout = limits.idle_timeout_seconds
        ae.dimse_timeout = limits.idle_timeout_seconds
        ae.add_supported_context(Verification, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        if self.allowed_calling is not None and not self.allowed_calling:
            log.warning("no calling AE title is allowed ([accept] empty and no [[peers]]): "
                        "every association will be rejected")
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        server = cast(NoDelayServer, self.ae.make_server(
            (self.cfg.node.host, self.cfg.node.port), evt_handlers=handlers, server_class=NoDelayServer,
            ssl_context=server_context(self.cfg.tls) if self.cfg.tls.enabled else None,
            request_handler=reactor.request_handler(),
        ))
        server.fast_store = self._fast_store if self.fast_path else None
        server.fast_store_max_bytes = self.cfg.limits.max_instance_bytes
        if self._gated:
            server.gate = self._gate = self._make_gate(server)
            self._gate.start()
        self._server = server
        self.ae._servers.append(server)  # as AE.start_server does; server.shutdown() removes it
        self._thread = threading.Thread(target=server.serve_forever, name="scp-acceptor", daemon=True)
        self._thread.start()
        return self.port

    def _make_gate(self, server: NoDelayServer) -> AssociationGate:
        limits = self.cfg.limits
        slots = AssociationSlots(limits.max_associations, limits.max_associations_per_host,
                                 limits.max_associations_per_ae)
        return AssociationGate(
            slots, server.start_association,
            artim_seconds=min(limits.artim_timeout_seconds, limits.idle_timeout_seconds),
            max_pending=limits.max_pending_connections, max_rq_bytes=limits.max_associate_rq_bytes,
            refused=self._on_refused, counted=self._on_gate_outcome,
        )

    def _on_gate_outcome(self, outcome: str) -> None:
        self.telemetry.metrics.gate_connections.labels(outcome=outcome).inc()

    @property
    def gate(self) -> AssociationGate | None:
        """The pre-association stage (None with stock pynetdicom reactors)."""
        return self._gate

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("not started")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is None:
            return
        if self._gate is not None:
            self._gate.stop()
            self._gate = None
        for assoc in list(self._server.active_associations):
            assoc.abort()
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    # --- handlers (run in pynetdicom's association threads) ---------------------------
    def _assoc_id(self, assoc: Any) -> str:
        key = id(assoc)
        with self._ids_lock:
            aid = self._ids.get(key)
            if aid is None:
                aid = f"{self._boot}-{next(self._counter)}"
                self._ids[key] = aid
            return aid

    def _forget(self, assoc: Any) -> str | None:
        with self._ids_lock:
            return self._ids.pop(id(assoc), None)

    def _on_requested(self, event: Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        if rq is None:
            return
        calling = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        reason: tuple[int, int, int] | None = None
        if self.allowed_calling is not None and calling not in self.allowed_calling:
            reason = REJECT_CALLING_AE
            log.warning("rejected association from %s: calling AE title %r is not allowed",
                        assoc.requestor.address, calling)
        elif self.cfg.node.require_called_ae_title and called != self.cfg.node.ae_title:
            reason = REJECT_CALLED_AE
            log.warning("rejected association from %s (%r): called AE title %r is not %r",
                        assoc.requestor.address, calling, called, self.cfg.node.ae_title)
        if reason is not None:
            code = "calling_ae_not_allowed" if reason == REJECT_CALLING_AE else "called_ae_mismatch"
            peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
            with self.telemetry.guard("association"):
                self.telemetry.metrics.association(False, code)
                self.telemetry.audit.association(accepted=False, calling_ae=calling, called_ae=called,
                                                 peer=peer, reason=code)
            assoc.acse.send_reject(*reason)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()

    def _on_refused(self, address: Any, calling: str, called: str, code: str) -> None:
        """The gate refused an A-ASSOCIATE-RQ because a cap was reached (A-ASSOCIATE-RJ 2, 3, 2)."""
        with self.telemetry.guard("association"):
            self.telemetry.metrics.association(False, code)
            self.telemetry.audit.association(accepted=False, calling_ae=calling, called_ae=called,
                                             peer=f"{address[0]}:{address[1]}", reason=code)

    def _on_established(self, event: Event) -> None:
        log.debug("association %s established with %r", self._assoc_id(event.assoc),
                  event.assoc.requestor.ae_title)
        _guard_dimse(event.assoc, self._assoc_id(event.assoc))
        rq = event.assoc.requestor
        with self.telemetry.guard("association"):
            self.telemetry.metrics.association(True)
            self.telemetry.audit.association(accepted=True, calling_ae=str(rq.ae_title).strip(),
                                             called_ae=self.cfg.node.ae_title, peer=f"{rq.address}:{rq.port}",
                                             assoc_id=self._assoc_id(event.assoc))

    def _on_echo(self, event: Event) -> int:
        return 0x0000

    def _on_store(self, event: Event) -> int:
        """EVT_C_STORE: requests the fast path (reactor.py) did not take."""
        return self._store_instance(event.assoc, lambda: part10.encoded_dataset(event))

    def _fast_store(self, assoc: Any, request: StoreRequest, head: bytes, fragments: list[memoryview]) -> int:
        """The DUL's fast C-STORE path: ``head`` (preamble + File Meta) and the data set as received."""
        return self._store_instance(assoc, lambda: b"".join((head, *fragments)))

    def _store_instance(self, assoc: Any, encoded: Callable[[], bytes]) -> int:
        """Store one instance durably and return the C-STORE status (never raises)."""
        assoc_id = self._assoc_id(assoc)
        if self.watermark is not None and not self.watermark.ok():
            log.warning("C-STORE refused with 0xA700: free disk space below retention.min_free_disk_mb")
            return STATUS_OUT_OF_RESOURCES
        try:
            stored = self.spool.store(encoded(), calling_ae=str(assoc.requestor.ae_title).strip(), assoc_id=assoc_id)
        except StoreError as exc:
            log.warning("C-STORE from %r refused with 0x%04X: %s", assoc.requestor.ae_title, exc.status, exc)
            return exc.status
        except Exception:  # the node keeps serving whatever happens
            log.exception("unexpected error in C-STORE")
            return STATUS_UNEXPECTED
        if self.listener is not None:
            try:
                self.listener.instance_received(assoc_id, stored.record.series_uid)
            except Exception:  # bookkeeping only; the instance is stored and indexed
                log.exception("completion tracker failed to note an instance")
        rec = stored.record
        with self.telemetry.guard("instance"):
            self.telemetry.metrics.instance_received(rec.size)
            if stored.outcome.series_state_before is None:
                self.telemetry.audit.series("received", series_uid=rec.series_uid, study_uid=rec.study_uid,
                                            calling_ae=rec.calling_ae)
        return 0x0000

    def _on_released(self, event: Event) -> None:
        assoc_id = self._forget(event.assoc)
        if assoc_id is not None and self.listener is not None:
            self.listener.association_released(assoc_id)

    def _on_conn_close(self, event: Event) -> None:
        """The connection closed: after our A-RELEASE-RP that is a release, otherwise a loss.

        pynetdicom triggers EVT_RELEASED in the association thread *after* handing the
        A-RELEASE-RP to the DUL thread, which sends it; the peer may close the connection
        (EVT_CONN_CLOSE, DUL thread) before EVT_RELEASED runs.  ``_sent_release`` is set before
        the response is queued, so it tells the two apart; whichever event comes first reports.
        """
        if getattr(event.assoc, "_sent_release", False):
            self._on_released(event)
        else:
            self._on_aborted(event)

    def _on_aborted(self, event: Event) -> None:
        assoc_id = self._forget(event.assoc)
        if assoc_id is not None and self.listener is not None:
            self.listener.association_aborted(assoc_id)
