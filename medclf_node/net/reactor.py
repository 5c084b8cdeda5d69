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

Everything else (state machine, PDU decoding, DIMSE assembly, event handlers, timeouts) is
pynetdicom's own code.  The two reactor loops are copies of 3.0.4's with only the waiting
changed; ``tests/test_intake_fastpath.py`` pins the source of every pynetdicom function copied
or overridden here and fails when pynetdicom changes.  With any other pynetdicom version
:func:`supported` is false and the node runs stock pynetdicom (slower, same behaviour).
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import threading
from copy import deepcopy
from datetime import datetime
from typing import Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler

from medclf_node.net.store_rsp import FastStoreResponseDIMSE

log = logging.getLogger(__name__)

PYNETDICOM_VERSION = "3.0.4"
# Longest wait between two passes of either reactor when nothing happens.  Bounds how late an
# expired ARTIM/idle timer is noticed; the only cost of a larger value.
IDLE_WAIT = 0.05


def supported() -> bool:
    """True when the installed pynetdicom is the version this module was written against."""
    return str(pynetdicom.__version__) == PYNETDICOM_VERSION


class BulkRecvSocket(AssociationSocket):
    """Reads ``nr_bytes`` with ``recv_into`` into one buffer (stock: a Python loop of 4 kB ``recv``)."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        buf = bytearray(nr_bytes)
        got = 0
        with memoryview(buf) as view:
            while got < nr_bytes:
                n = sock.recv_into(view[got:], nr_bytes - got)
                if n == 0:  # connection closed: return what arrived, as stock does
                    break
                got += n
        if got < nr_bytes:
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
        sock = self.socket.socket if self.socket is not None else None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered; select() cannot see them
        watched: list[Any] = [self._wake_r]
        if sock is not None and sock.fileno() >= 0:
            watched.append(sock)
        try:
            select.select(watched, [], [], IDLE_WAIT)
        except (OSError, ValueError):  # socket closed under us: the next pass sees it
            pass
        self._drain()

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
                log.error("exception in the DUL reactor, aborting association: %s", exc)
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


class WakeableRequestHandler(RequestHandler):
    """Builds :class:`WakeableAssociation` + :class:`BulkRecvSocket` (3.0.4 ``_create_association``)."""

    def _create_association(self) -> Association:
        assoc = WakeableAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server

        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"

        sock = BulkRecvSocket(assoc, client_socket=cast(socket.socket, self.request))
        assoc.set_socket(sock)

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)

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
