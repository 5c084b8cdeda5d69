"""The pre-association stage: one selector thread holds every connection until it earns a thread.

Why: pynetdicom starts two threads per TCP connection and counts each against
``maximum_associations`` before the peer has said a word, for up to the ACSE timeout.  Sixty
port-scanner probes or load-balancer health checks locked every real sender out for a minute;
300 silent sockets meant 600 threads.  Here a new connection costs one file descriptor: the
gate does the TLS handshake (non-blocking), reads the first PDU, and only when a complete
A-ASSOCIATE-RQ has arrived within the ARTIM time takes a slot (:mod:`medclf_node.net.slots`)
and hands socket plus PDU bytes to the association's thread.  Anything else ends here:

* closed before a complete A-ASSOCIATE-RQ (EOF): closed at once;
* no A-ASSOCIATE-RQ within ``artim_seconds``: closed (PS3.8 ARTIM expiry in Sta2, AA-2);
* another PDU type, or a length outside [68, ``max_rq_bytes``]: A-ABORT (AA-1), then closed when
  the peer closes or after :data:`CLOSE_WAIT` (Sta13), whichever comes first;
* more than ``max_pending`` waiting connections: the oldest of the host with the most waiting
  connections is closed, so a flood from one host cannot keep another host's sender out;
* a cap reached: A-ASSOCIATE-RJ (2, 3, 2) "local limit exceeded" (transient), closed as after an A-ABORT.
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medclf_node.net.slots import AssociationSlots, Ticket

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ = 0x01
#: header (6) + protocol version, reserved, called and calling AE titles, reserved (PS3.8 9.3.2)
MIN_RQ_LENGTH = 68
_HEADER = struct.Struct(">BBL")
#: A-ASSOCIATE-RJ: rejected-transient (2), service-provider presentation (3), local-limit-exceeded (2)
REJECT_LIMIT_PDU = bytes((0x03, 0, 0, 0, 0, 4, 0, 0x02, 0x03, 0x02))
#: A-ABORT from the service provider (2), unexpected PDU (2)
ABORT_PDU = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x02))
#: longest selector wait when nothing happens (ARTIM expiry is noticed at most this late)
TICK = 0.25
#: after an A-ABORT or A-ASSOCIATE-RJ, how long the peer gets to close first (PS3.8 Sta13; closing
#: at once with the peer's bytes unread makes the kernel send a reset, which can destroy the answer)
CLOSE_WAIT = 2.0
#: an A-ASSOCIATE-RJ for a cap goes out this much later: a peer retrying in a loop is slowed down, and
#: pynetdicom requestors see the rejection (answered within microseconds, pynetdicom 3.0.4's requestor
#: can find its socket closed before it looks for the answer and reports an abort instead)
REFUSE_DELAY = 0.1

#: ``handoff(sock, address, rq_pdu, ticket)``: start the association (blocking socket, PDU already read)
Handoff = Callable[[socket.socket, Any, bytes, Ticket], None]
#: ``refused(address, calling_ae, called_ae, code)``: a cap refused an A-ASSOCIATE-RQ (for metrics/audit)
Refused = Callable[[Any, str, str, str], None]
#: what became of a connection in the gate: handed_off, closed, not_associate_rq, artim_expired, evicted,
#: tls_failed, error, stopped, or a refusal code of :mod:`medclf_node.net.slots`
OUTCOMES = ("handed_off", "closed", "not_associate_rq", "artim_expired", "evicted", "tls_failed", "error",
            "stopped", "refusal_not_recorded")


@dataclass(eq=False)
class _Pending:
    sock: socket.socket
    address: Any
    host: str
    deadline: float
    handshaking: bool
    buf: bytearray = field(default_factory=bytearray)
    need: int = 6
    writing: bool = False  # TLS handshake wants to write: watch for writability
    closing: bool = False  # answered (A-ABORT / A-ASSOCIATE-RJ): waiting for the peer to close (Sta13)
    refusal: tuple[bytes, str] | None = None  # (PDU, outcome) to answer at ``deadline``


class AssociationGate:
    """Holds connections until their A-ASSOCIATE-RQ is complete; see the module docstring."""

    def __init__(
        self,
        slots: AssociationSlots,
        handoff: Handoff,
        *,
        artim_seconds: float,
        max_pending: int,
        max_rq_bytes: int,
        refused: Refused | None = None,
        counted: Callable[[str], None] | None = None,
    ) -> None:
        self.slots = slots
        self._handoff = handoff
        self._refused = refused
        self._counted = counted
        self.artim_seconds = artim_seconds
        self.max_pending = max_pending
        self.max_rq_bytes = max_rq_bytes
        self._submitted: queue.SimpleQueue[tuple[socket.socket, Any]] = queue.SimpleQueue()
        self._pending: dict[socket.socket, _Pending] = {}
        self._hosts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        #: what became of connections so far, by outcome (tests and the load benchmark read it)
        self.outcomes: Counter[str] = Counter()
        # refusals are recorded (audit: an fsync per line) by their own thread, never by the gate's
        self._refusals: queue.Queue[tuple[Any, str, str, str] | None] = queue.Queue(maxsize=1024)
        self._recorder: threading.Thread | None = None

    # --- called from other threads ---------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scp-gate", daemon=True)
        self._thread.start()
        if self._refused is not None:
            self._recorder = threading.Thread(target=self._record_refusals, name="scp-gate-audit", daemon=True)
            self._recorder.start()

    def submit(self, sock: socket.socket, address: Any) -> None:
        """A just-accepted connection (acceptor thread); never blocks."""
        self._submitted.put((sock, address))
        self._poke()

    def stop(self) -> None:
        """Close every waiting connection and end the thread."""
        self._stop.set()
        self._poke()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._recorder is not None:
            try:
                self._refusals.put(None, timeout=1)
            except queue.Full:
                pass
            self._recorder.join(timeout=5)
        while True:
            try:
                sock, _ = self._submitted.get_nowait()
            except queue.Empty:
                break
            _close(sock)
        self._wake_r.close()
        self._wake_w.close()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        if self._counted is not None:
            try:
                self._counted(outcome)
            except Exception:  # metrics are best effort
                log.exception("counting a gate outcome failed")

    def _poke(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # buffer full = already awake; closed = stopped
            pass

    # --- the gate's thread -------------------------------------------------------------------
    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                try:
                    self._pass(sel)
                except Exception:  # noqa: BLE001 - the gate must not die: new connections would hang
                    log.exception("association gate: unexpected error; carrying on")
                    time.sleep(TICK)
        finally:
            for conn in list(self._pending.values()):
                self._drop(sel, conn, "stopped")
            sel.close()

    def _pass(self, sel: selectors.BaseSelector) -> None:
        """One wait for readiness (at most until the next deadline), then what became due."""
        now = time.monotonic()
        wait = min((p.deadline for p in self._pending.values()), default=now + TICK) - now
        for key, _ in sel.select(min(max(wait, 0.0), TICK)):
            if key.fileobj is self._wake_r:
                self._drain()
                self._admit(sel)
                continue
            conn = self._pending.get(key.fileobj)  # type: ignore[call-overload]
            if conn is not None:
                self._advance_safely(sel, conn)
        self._expire(sel)

    def _record_refusals(self) -> None:
        assert self._refused is not None
        while (item := self._refusals.get()) is not None:
            try:
                self._refused(*item)
            except Exception:  # bookkeeping only
                log.exception("recording a refused association failed")

    def _drain(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _admit(self, sel: selectors.BaseSelector) -> None:
        while True:
            try:
                sock, address = self._submitted.get_nowait()
            except queue.Empty:
                return
            host = str(address[0]) if isinstance(address, tuple) and address else str(address)
            if len(self._pending) >= self.max_pending:
                self._evict(sel)
            try:
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ)
            except (OSError, ValueError):
                _close(sock)
                self._count("closed")
                continue
            conn = _Pending(sock, address, host, time.monotonic() + self.artim_seconds,
                            handshaking=isinstance(sock, ssl.SSLSocket))
            self._pending[sock] = conn
            self._hosts[host] += 1
            self._advance_safely(sel, conn)  # a TLS server may speak first; data may already be there

    def _evict(self, sel: selectors.BaseSelector) -> None:
        """Make room: the oldest waiting connection of the host with the most of them goes."""
        host = self._hosts.most_common(1)[0][0]
        oldest = min((p for p in self._pending.values() if p.host == host), key=lambda p: p.deadline)
        self._drop(sel, oldest, "evicted")

    def _expire(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for conn in [p for p in self._pending.values() if p.deadline <= now]:
            if conn.refusal is not None:
                pdu, outcome = conn.refusal
                conn.refusal = None
                self._answer(sel, conn, pdu, outcome)
            else:
                self._drop(sel, conn, None if conn.closing else "artim_expired")

    def _drop(self, sel: selectors.BaseSelector, conn: _Pending, outcome: str | None) -> None:
        self._forget(sel, conn)
        _close(conn.sock)
        if outcome is not None:
            self._count(outcome)
            log.debug("connection from %s closed before association: %s", conn.host, outcome)

    def _answer(self, sel: selectors.BaseSelector, conn: _Pending, pdu: bytes, outcome: str) -> None:
        """Send ``pdu`` (never blocks), half-close, and wait up to CLOSE_WAIT for the peer to close."""
        self._count(outcome)
        log.debug("connection from %s answered before association: %s", conn.host, outcome)
        try:
            conn.sock.send(pdu)
            conn.sock.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):  # the peer is gone: nothing to wait for
            self._drop(sel, conn, None)
            return
        conn.closing, conn.writing = True, False
        conn.deadline = time.monotonic() + CLOSE_WAIT
        try:
            sel.modify(conn.sock, selectors.EVENT_READ)
        except (KeyError, ValueError, OSError):
            self._drop(sel, conn, None)

    def _discard(self, sel: selectors.BaseSelector, conn: _Pending) -> None:
        """Sta13: read and drop what the peer still sends; close on its EOF."""
        try:
            for _ in range(16):
                if not conn.sock.recv(65536):
                    break
            else:
                return
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ValueError):
            pass
        self._drop(sel, conn, None)

    def _forget(self, sel: selectors.BaseSelector, conn: _Pending) -> None:
        if self._pending.pop(conn.sock, None) is None:
            return
        self._hosts[conn.host] -= 1
        if self._hosts[conn.host] <= 0:
            del self._hosts[conn.host]
        try:
            sel.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _advance_safely(self, sel: selectors.BaseSelector, conn: _Pending) -> None:
        try:
            self._advance(sel, conn)
        except Exception:  # noqa: BLE001 - one connection's surprise must not stop the gate
            log.exception("association gate: unexpected error on a connection from %s", conn.host)
            self._drop(sel, conn, "error")

    def _advance(self, sel: selectors.BaseSelector, conn: _Pending) -> None:
        """Read what is there (handshake first); hand off or drop when the outcome is known."""
        if conn.closing or conn.refusal is not None:
            self._discard(sel, conn)
            return
        sock = conn.sock
        try:
            if conn.handshaking:
                assert isinstance(sock, ssl.SSLSocket)
                sock.do_handshake()
                conn.handshaking = False
                if conn.writing:
                    conn.writing = False
                    sel.modify(sock, selectors.EVENT_READ)
            while len(conn.buf) < conn.need:
                chunk = sock.recv(conn.need - len(conn.buf))
                if not chunk:
                    self._drop(sel, conn, "closed")
                    return
                conn.buf += chunk
                if conn.need == 6 and len(conn.buf) == 6:
                    pdu_type, _, length = _HEADER.unpack(conn.buf)
                    if pdu_type != A_ASSOCIATE_RQ or not MIN_RQ_LENGTH - 6 <= length <= self.max_rq_bytes - 6:
                        self._answer(sel, conn, ABORT_PDU, "not_associate_rq")
                        return
                    conn.need = 6 + length
        except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
            return
        except ssl.SSLWantWriteError:
            if not conn.writing:
                conn.writing = True
                sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            return
        except (OSError, ValueError) as exc:  # reset, TLS failure (plain TCP, wrong CA, no certificate)
            if conn.handshaking:
                log.warning("TLS handshake with %s failed: %s", conn.host, exc)
                self._drop(sel, conn, "tls_failed")
            else:
                self._drop(sel, conn, "closed")
            return
        self._start(sel, conn)

    def _start(self, sel: selectors.BaseSelector, conn: _Pending) -> None:
        """A complete A-ASSOCIATE-RQ: take a slot and hand off, or refuse with A-ASSOCIATE-RJ."""
        rq = bytes(conn.buf)
        called = rq[10:26].decode("latin-1").strip(" \x00")
        calling = rq[26:42].decode("latin-1").strip(" \x00")
        ticket = self.slots.acquire(conn.host, calling)
        if isinstance(ticket, str):
            conn.refusal = (REJECT_LIMIT_PDU, ticket)
            conn.deadline = time.monotonic() + REFUSE_DELAY
            log.info("association from %s refused: %s", conn.host, ticket)
            if self._refused is not None:
                try:
                    self._refusals.put_nowait((conn.address, calling, called, ticket))
                except queue.Full:
                    self._count("refusal_not_recorded")
            return
        self._forget(sel, conn)
        self._count("handed_off")
        try:
            conn.sock.setblocking(True)
            self._handoff(conn.sock, conn.address, rq, ticket)
        except Exception:  # noqa: BLE001 - e.g. no thread could be started: this connection only
            log.exception("could not start an association for %s", conn.host)
            ticket.release()
            _close(conn.sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass

