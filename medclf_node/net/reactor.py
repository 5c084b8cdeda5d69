"""Event-driven reactors for the node's accepted associations (written for pynetdicom 3.0.4).

Why: pynetdicom 3.0.4 moves every message through two polling loops.  The DUL thread sleeps
``_run_loop_delay`` (1 ms) whenever a pass finds nothing to do, the association thread sleeps
1 ms before every look for a decoded DIMSE message, and the socket is read 4096 bytes per
Python call.  For a 512 kB C-STORE that is milliseconds of waiting per instance, several
times what DCMTK's storescp spends on the whole instance; and an idle open association polls
a thousand times a second.

What changes (acceptor side only; :mod:`medclf_node.net.scu` and everything else keep stock
pynetdicom):

* :class:`WakeableDUL` blocks in ``select()`` on the peer socket plus a wake-up socket pair
  instead of sleeping.  Anything that gives the DUL work from another thread
  (``send_pdu``, ``kill_dul``/``stop_dul``) writes one byte to the pair.  Between events the
  thread waits at most :data:`IDLE_WAIT` seconds (ARTIM timer, Sta13 close-down), so an idle
  association costs a few wake-ups a second, not a thousand.
* :class:`WakeableAssociation` waits on a :class:`threading.Event` that the DUL sets when a
  state-machine action left it something to do (a DIMSE message completed, a release or abort
  arrived) or the DUL stopped, instead of sleeping 1 ms per pass.
* :class:`BulkRecvSocket` reads a PDU with ``recv_into`` into one buffer of the PDU's size.
* C-STORE and C-ECHO requests are served in the DUL thread as soon as they are complete
  (:meth:`WakeableDUL._serve_inline`), not handed to the association thread and back.
* status-only C-STORE responses are encoded by :mod:`medclf_node.net.store_rsp`.
* C-STORE requests are read straight from the P-DATA-TF PDUs (:meth:`WakeableDUL._take_pdata`,
  :mod:`medclf_node.net.fast_store`): PDVs split by hand, the command set decoded by hand, the
  data set kept as views of the received buffers and joined once behind the File Meta, the
  server's ``fast_store`` handler called, the response sent as one PDU.  A message it does not
  vouch for is replayed PDV by PDV into pynetdicom's DIMSE provider, as DT-2 would deliver it.
  The CPU per 512 kB instance fell from 3.9 to 2.4 ms (node without fsync, loaded machine).

Everything else (state machine, PDU decoding of other PDUs, DIMSE assembly of other messages,
event handlers, timeouts) is pynetdicom's own code.  The two reactor loops are copies of 3.0.4's with only the waiting
changed; ``tests/test_intake_fastpath.py`` pins the source of every pynetdicom function copied
or overridden here and fails when pynetdicom changes.  With any other pynetdicom version
:func:`supported` is false and the node runs stock pynetdicom (slower, same behaviour).
"""

from __future__ import annotations

import copy
import logging
import queue
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

import pynetdicom
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket, RequestHandler

from medclf_node.net import part10
from medclf_node.net.fast_store import StoreRequest, decode_store_request, split_pdvs, store_response_pdu
from medclf_node.net.store_rsp import FastStoreResponseDIMSE
from medclf_node.redact import scrub

log = logging.getLogger(__name__)

#: ``fast_store(assoc, request, head, fragments) -> status``: stores ``head + fragments`` (preamble and
#: File Meta, then the data set as received) and returns the C-STORE status; set on the server.
FastStoreHandler = Callable[[Association, StoreRequest, bytes, list[memoryview]], int]
#: with a handler bound to any of these the peer or the user watches PDUs/messages: stock path only
_WATCHED_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_DIMSE_RECV, evt.EVT_DATA_SENT,
                   evt.EVT_PDU_SENT, evt.EVT_DIMSE_SENT)
_PDU_HEADER = struct.Struct(">BBL")

PYNETDICOM_VERSION = "3.0.4"
# Longest wait between two passes of either reactor when nothing happens.  Bounds how late an
# expired ARTIM/idle timer is noticed; the only cost of a larger value.
IDLE_WAIT = 0.05
#: first buffer for a PDU body; larger PDUs grow it as their bytes arrive
RECV_FIRST_ALLOCATION = 1 << 20


def supported() -> bool:
    """True when the installed pynetdicom is the version this module was written against."""
    return str(pynetdicom.__version__) == PYNETDICOM_VERSION


class BulkRecvSocket(AssociationSocket):
    """Reads ``nr_bytes`` with ``recv_into`` into one buffer (stock: a Python loop of 4 kB ``recv``).

    The buffer starts at :data:`RECV_FIRST_ALLOCATION` and doubles as data arrives: the PDU
    length comes from the peer, and a hostile 4 GiB length followed by ten bytes must not
    make the node allocate 4 GiB.
    """

    #: bytes the pre-association gate already read (the A-ASSOCIATE-RQ), served before the socket's
    prefetched: bytes = b""

    @property
    def ready(self) -> bool:
        """Stock ``ready``, or True while gate-prefetched bytes wait (``select()`` cannot see them)."""
        if self.prefetched and self.socket is not None:
            return True
        return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        buf = bytearray(min(nr_bytes, RECV_FIRST_ALLOCATION))
        got = 0
        if self.prefetched:
            head, self.prefetched = self.prefetched[:nr_bytes], self.prefetched[nr_bytes:]
            got = len(head)
            if got > len(buf):
                buf.extend(bytes(got - len(buf)))
            buf[:got] = head
        while got < nr_bytes:
            if got == len(buf):
                buf.extend(bytes(min(len(buf), nr_bytes - got)))
            with memoryview(buf) as view:
                n = sock.recv_into(view[got:], len(buf) - got)
            if n == 0:  # connection closed: return what arrived, as stock does
                break
            got += n
        if got < len(buf):
            del buf[got:]
        return buf


class WakeableDUL(DULServiceProvider):
    """pynetdicom's DUL provider, waiting in ``select()`` instead of sleeping between passes."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # stop_dul() polls is_alive() with this delay; our thread exits as soon as it is poked
        self._run_loop_delay = 0.001
        # the C-STORE fast path (see _take_pdata): command fragments of an undecided message,
        # the C-STORE request being received and its File Meta head and data set fragments
        self._cmd_pdvs: list[tuple[int, int, memoryview]] = []
        self._fast_req: StoreRequest | None = None
        self._fast_head = b""
        self._fast_data: list[memoryview] = []
        self._fast_size = 0  # bytes of the data set so far; past the server's limit they are dropped
        self._stock_size = 0  # the same for a message replayed into pynetdicom
        self._aborting = False  # A-ABORT requested here: drop whatever P-DATA still arrives

    # --- waking -------------------------------------------------------------------------
    def _poke(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):  # buffer full = already awake; closed = thread gone
            pass

    def _drain(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _notify_assoc(self) -> None:
        wake = getattr(self.assoc, "_wake", None)
        if wake is not None:
            wake.set()

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        if threading.current_thread() is not self:  # (the DUL thread itself looks at the queue next)
            self._poke()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._poke()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            # what the base does next, done first so the poked thread sees it and exits at once
            self._kill_thread = True
            self._poke()
        return super().stop_dul()

    def _wait_for_work(self) -> None:
        """Block until the peer sent data, another thread queued work, or IDLE_WAIT passed."""
        if not self.event_queue.empty() or not self.to_provider_queue.empty() or self._kill_thread:
            return
        if getattr(self.socket, "prefetched", b""):
            return  # the gate's A-ASSOCIATE-RQ bytes wait in the socket wrapper
        sock = self.socket.socket if self.socket is not None else None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered; select() cannot see them
        watched: list[Any] = [self._wake_r]
        if sock is not None and sock.fileno() >= 0:
            watched.append(sock)
        try:
            readable, _, _ = select.select(watched, [], [], IDLE_WAIT)
        except (OSError, ValueError):  # socket closed under us: the next pass sees it
            readable = [self._wake_r]
        if self._wake_r in readable:
            self._drain()

    # --- pynetdicom 3.0.4 DULServiceProvider._read_pdu_data, P-DATA-TF offered to _take_pdata first
    def _read_pdu_data(self) -> None:
        self.socket = cast(AssociationSocket, self.socket)
        try:
            header = bytes(self.socket.recv(6))
        except (OSError, TimeoutError) as exc:
            log.error("Connection closed before the entire PDU was received: %s", exc)
            self.event_queue.put("Evt17")
            return
        try:
            pdu_type, _, pdu_length = _PDU_HEADER.unpack(header)
        except struct.error:
            self.event_queue.put("Evt17")
            return
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            log.error("Unknown PDU type received '0x%02X'", pdu_type)
            self.event_queue.put("Evt19")
            return
        try:
            body = self.socket.recv(pdu_length)
        except (OSError, TimeoutError) as exc:
            log.error("Connection closed before the entire PDU was received: %s", exc)
            self.event_queue.put("Evt17")
            return
        if len(body) != pdu_length:
            log.error("The received PDU is shorter than expected (%d of %d bytes received)",
                      len(body) + 6, pdu_length + 6)
            self.event_queue.put("Evt17")
            return
        if pdu_type == 0x04 and self._take_pdata(memoryview(body)):
            return
        try:
            pdu, event = self._decode_pdu(bytearray(header) + body)
            self.event_queue.put(event)
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: undecodable PDU -> Evt19
            log.error("Unable to decode the received PDU data: %s", scrub(str(exc)))
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    # --- the C-STORE fast path ---------------------------------------------------------------
    def _fast_handler(self) -> FastStoreHandler | None:
        """The server's fast C-STORE handler, if the fast path may be used on this association now."""
        assoc = self.assoc
        handler = getattr(getattr(assoc, "_server", None), "fast_store", None)
        if handler is None or pynetdicom_config.STORE_RECV_CHUNKED_DATASET:
            return None
        if any(assoc.get_handlers(event) for event in _WATCHED_EVENTS):
            return None
        return cast(FastStoreHandler, handler)

    def _take_pdata(self, body: memoryview) -> bool:
        """Handle a P-DATA-TF PDU here (True) or leave it to pynetdicom's decoder (False).

        In Sta6 (the only state where pynetdicom passes P-DATA on; DT-2 keeps Sta6), the
        PDVs of a C-STORE-RQ that :func:`decode_store_request` understands are collected here
        and served by the server's ``fast_store``; the response goes out as one P-DATA-TF.
        Every other message is replayed PDV by PDV into pynetdicom's DIMSE provider, as
        DT-2 would have delivered it, so it is decoded, served and answered as before.
        """
        if self.state_machine.current_state != "Sta6":
            return False
        if self._aborting:
            return True
        pdvs = split_pdvs(body)
        if pdvs is None:
            if self._fast_req is not None:  # the data set of a C-STORE cannot continue in garbage
                log.warning("malformed P-DATA-TF PDU inside a C-STORE data set, aborting the association")
                self._abort()
                return True
            self._replay_command()
            return False
        dimse = self.assoc.dimse
        for context_id, control, fragment in pdvs:
            if self._aborting:
                return True
            if self._fast_req is not None:
                if control & 1:
                    log.warning("command fragment inside a C-STORE data set, aborting the association")
                    self._abort()
                    return True
                self._fast_size += len(fragment)
                if self._fast_size <= self._fast_limit():
                    self._fast_data.append(fragment)
                elif self._fast_data:
                    self._fast_data = []  # over the limit: keep counting, stop holding
                if control & 2:
                    self._complete_fast_store()
                continue
            if dimse.message is not None or (not self._cmd_pdvs and not control & 1):
                self._to_dimse([(context_id, control, fragment)])  # a message pynetdicom is assembling
                continue
            self._cmd_pdvs.append((context_id, control, fragment))
            if control & 2:
                self._start_message(context_id)
        self._serve_inline()
        if not self.to_user_queue.empty() or not dimse.msg_queue.empty():
            self._notify_assoc()
        return True

    def _abort(self) -> None:
        """A-ABORT from the DUL thread (non-blocking); forget the message being received."""
        self._aborting = True
        self._fast_req, self._fast_data, self._cmd_pdvs, self._stock_size = None, [], [], 0
        self.assoc.abort(block=False)

    def _start_message(self, context_id: int) -> None:
        """The command set is complete: a C-STORE for the fast path, or everything to pynetdicom."""
        command = b"".join(fragment for _, _, fragment in self._cmd_pdvs)
        request = None
        handler = self._fast_handler()
        assoc = self.assoc
        context = assoc._accepted_cx.get(context_id)
        if handler is not None and context is not None and self._may_serve():
            request = decode_store_request(command, context_id)
        head = None
        if request is not None and self._is_storage(request.sop_class_uid):
            meta = part10.file_meta(request.sop_class_uid, request.sop_instance_uid,
                                    cast(Any, context).transfer_syntax[0])
            head = None if meta is None else part10.PREAMBLE + meta
        if request is None or head is None:
            self._replay_command()
            return
        self._cmd_pdvs = []
        self._fast_req, self._fast_head, self._fast_data, self._fast_size = request, head, [], 0

    def _fast_limit(self) -> int:
        """The server's largest data set in bytes (``limits.max_instance_bytes``); unlimited if unset."""
        limit = getattr(getattr(self.assoc, "_server", None), "fast_store_max_bytes", None)
        return limit if isinstance(limit, int) else 1 << 62

    def _may_serve(self) -> bool:
        """Sta6 and neither releasing nor aborting.

        Not ``assoc.is_established``: the association thread sets that only after it queued the
        A-ASSOCIATE-AC, so a peer's first P-DATA can arrive (and be read here, in Sta6) before it.
        """
        assoc = self.assoc
        return (self.state_machine.current_state == "Sta6" and not assoc._sent_release
                and not getattr(assoc, "_sent_abort", False) and not assoc.is_aborted)

    def _is_storage(self, sop_class_uid: str) -> bool:
        """True when pynetdicom would serve this SOP class with its plain Storage service class."""
        if pynetdicom_config.UNRESTRICTED_STORAGE_SERVICE:
            return False
        if sop_class_uid in self.assoc.acceptor.accepted_common_extended:
            return False
        return uid_to_service_class(sop_class_uid) is StorageServiceClass

    def _replay_command(self) -> None:
        pending, self._cmd_pdvs = self._cmd_pdvs, []
        self._to_dimse(pending)

    def _to_dimse(self, pdvs: list[tuple[int, int, memoryview]]) -> None:
        """Deliver PDVs to pynetdicom's DIMSE provider as DT-2 would (one P-DATA per PDV).

        pynetdicom holds a message's data set in memory until its last fragment; past the
        server's ``fast_store_max_bytes`` (``limits.max_instance_bytes``) the association is
        aborted instead (the fast path answers 0xA700; this path cannot without pynetdicom's help).
        """
        dimse = self.assoc.dimse
        for context_id, control, fragment in pdvs:
            if dimse.message is None:
                self._stock_size = 0
            if not control & 1:
                self._stock_size += len(fragment)
                if self._stock_size > self._fast_limit():
                    log.warning("data set over limits.max_instance_bytes on the stock path, aborting the association")
                    self._abort()
                    return
            primitive = P_DATA()
            primitive.presentation_data_value_list = [[context_id, bytes((control,)) + bytes(fragment)]]  # type: ignore[list-item]
            dimse.receive_primitive(primitive)

    def _complete_fast_store(self) -> None:
        request, head, fragments = cast(StoreRequest, self._fast_req), self._fast_head, self._fast_data
        size = self._fast_size
        self._fast_req, self._fast_head, self._fast_data, self._fast_size = None, b"", [], 0
        assoc = self.assoc
        if not self._may_serve():
            log.warning("C-STORE request received during association release or abort, ignoring")
            return
        handler = self._fast_handler()
        status = 0xC211
        try:
            if size > self._fast_limit():
                log.warning("C-STORE refused with 0xA700: data set of %d bytes exceeds limits.max_instance_bytes",
                            size)
                status = 0xA700
            elif handler is not None:
                status = handler(cast(Association, assoc), request, head, fragments)
        except Exception:  # the handler maps its own errors; this is the last line of defence
            log.exception("fast C-STORE handler failed")
            status = 0xC211
        pdu = store_response_pdu(request, status)
        if pdu is None or not self._may_serve():
            if pdu is None:
                log.error("cannot encode the C-STORE response (status %r), aborting the association", status)
                assoc.abort(block=False)
            return
        cast(AssociationSocket, self.socket).send(pdu)

    # --- the loop: pynetdicom 3.0.4 DULServiceProvider.run_reactor, sleep -> _wait_for_work
    def run_reactor(self) -> None:
        try:
            self._reactor_loop()
        finally:
            self._notify_assoc()
            self._wake_r.close()
            self._wake_w.close()

    def _reactor_loop(self) -> None:
        self._idle_timer.start()
        self.socket = cast(AssociationSocket, self.socket)
        sleep = False

        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                self._wait_for_work()

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                log.error("exception in the DUL reactor, aborting association: %s", scrub(str(exc)))
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            self.state_machine.do_action(event)
            self._serve_inline()
            # wake the association only for what its reactor looks at: a decoded DIMSE
            # message, or an ACSE primitive (release request, abort); not for every fragment
            if not self.to_user_queue.empty() or not self.assoc.dimse.msg_queue.empty():
                self._notify_assoc()
            sleep = False

    def _serve_inline(self) -> None:
        """Serve a just-completed C-STORE or C-ECHO request here, in the DUL thread.

        Stock pynetdicom hands every request to the association thread and the response back
        to the DUL thread: two thread switches per instance, each waiting for the GIL and, on a
        busy machine, for a CPU.  Anything else (other requests, an unknown context, a request
        during release) stays in the queue for the association thread, as in pynetdicom.
        Nothing served here may block on the DUL (``Association.abort()`` would: it waits for
        this thread to stop), hence the context check before and the non-blocking abort after.
        """
        assoc = cast(Association, self.assoc)
        queue_ = assoc.dimse.msg_queue
        with queue_.mutex:  # atomic against the association thread's get()
            if not queue_.queue:
                return
            context_id, msg = queue_.queue[0]
            if not (
                isinstance(msg, (C_STORE, C_ECHO))
                and msg.is_valid_request
                and context_id in assoc._accepted_cx
                and assoc.is_established
                and not assoc._sent_release
            ):
                return
            queue_.queue.popleft()
        try:
            assoc._serve_request(msg, cast(int, context_id))
        except Exception:  # the association thread would have died; do not take the DUL with it
            log.exception("serving a %s request failed, aborting the association", type(msg).__name__)
            assoc.abort(block=False)


class WakeableAssociation(Association):
    """pynetdicom's association, woken by its DUL instead of polling every millisecond."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self._wake = threading.Event()
        self.dul = WakeableDUL(self)
        self.dimse = FastStoreResponseDIMSE(self)
        # the base pushed these into the DUL it built; push them into ours
        self.acse_timeout = self.ae.acse_timeout
        self.network_timeout = self.ae.network_timeout

    def kill(self) -> None:
        self._wake.set()
        super().kill()

    def run(self) -> None:
        """The thread: pynetdicom's reactor, then the association slot (gate.py) is given back."""
        try:
            super().run()
        finally:
            ticket = getattr(self, "_ticket", None)
            if ticket is not None:
                ticket.release()

    # --- pynetdicom 3.0.4 Association._run_reactor, time.sleep(0.001) -> wait for the DUL
    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            if self.dimse.msg_queue.empty():
                self._wake.wait(IDLE_WAIT)
            # cleared before looking: whatever set it earlier is visible to the checks below,
            # whatever sets it later makes the next wait return at once
            self._wake.clear()

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                log.debug("association released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log.debug("association aborted%s", " (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else "")
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def _copy_context(context: PresentationContext) -> PresentationContext:
    """What ``deepcopy`` gives for a PresentationContext, in microseconds instead of ~1 ms.

    Its attributes are immutable (str/UID, int, bool, None) but for the transfer syntax list;
    deepcopy re-validates every UID with pydicom's regular expressions: 0.1-0.2 s per
    association for the node's ~150 storage contexts.
    """
    clone = copy.copy(context)
    clone._transfer_syntax = list(context._transfer_syntax)
    return clone


class WakeableRequestHandler(RequestHandler):
    """Builds :class:`WakeableAssociation` + :class:`BulkRecvSocket` (3.0.4 ``_create_association``)."""

    def _create_association(self) -> Association:
        assoc = WakeableAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server

        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"

        sock = BulkRecvSocket(assoc, client_socket=cast(socket.socket, self.request))
        take = getattr(self.server, "take_prefetched", None)
        if take is not None:  # the gate read the A-ASSOCIATE-RQ and took a slot for this connection
            sock.prefetched, ticket = take(self.request)
            if ticket is not None:
                ticket.owner = assoc
                assoc._ticket = ticket  # type: ignore[attr-defined]
        assoc.set_socket(sock)

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = [_copy_context(cx) for cx in self.server.contexts]

        assoc.requestor.address_info = self.remote

        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    handler = cast(evt._HandlerBase, handler)
                    assoc.bind(event, handler[0], handler[1])

        return assoc


def request_handler() -> type[RequestHandler] | None:
    """The request handler class for the node's server: ours, or ``None`` (stock) on another pynetdicom."""
    if supported():
        return WakeableRequestHandler
    log.warning(
        "pynetdicom %s is not %s: using its stock (polling) reactors; intake will be slower",
        pynetdicom.__version__,
        PYNETDICOM_VERSION,
    )
    return None
