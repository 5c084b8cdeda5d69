"""Durable delivery of result objects: the outbox dispatcher.

Items live in the store's outbox (written by the pipeline with
:meth:`Store.enqueue_outbox` after the object file is on disk).  The dispatcher:

* polls for due items (``state='queued'`` and ``next_attempt_at <= now``) every
  ``poll_seconds`` or when :meth:`Dispatcher.wake` is called, and claims them
  (:meth:`Store.claim_outbox`), so nodes sharing one store never send an item twice at once;
* resolves the destination: a peer name, a ``[[folders]]`` name (written to a directory by
  :mod:`medclf_node.folder_destination`), or ``"sender"`` = the peer whose AE title is the
  calling AE of the item's series (no such peer: the item is dead-lettered at once, with
  the reason, because retrying cannot help);
* hands items to one worker thread *per destination*, so a dead or slow peer delays only
  its own items, never other destinations or the intake;
* on failure schedules the next attempt with exponential backoff
  ``min(initial_backoff * 2**(attempts-1), max_backoff)``; after ``dispatch.max_attempts``
  failed attempts the item is ``dead`` (``medclf-node retry`` re-queues it).

Delivery is at-least-once at the protocol level, but result UIDs are deterministic, so a
resend after a crash between "peer said Success" and "store says sent" is a duplicate the
PACS recognises rather than a second report.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

from medclf_node.config import Config, FolderSection
from medclf_node.folder_destination import deliver
from medclf_node.net.scu import Peer, SendError, send_files
from medclf_node.net.tls import client_context
from medclf_node.store import OutboxItem, Store
from medclf_node.telemetry import Telemetry

log = logging.getLogger(__name__)

BATCH = 32  # items one association may carry

Target = Peer | FolderSection  # where a destination's items go


def backoff_seconds(attempts: int, initial: float, maximum: float) -> float:
    """Delay after the ``attempts``-th failed attempt (1-based)."""
    return float(min(initial * (2 ** max(attempts - 1, 0)), maximum))


class _DestinationWorker:
    """One thread sending the items of one destination, in order of arrival."""

    def __init__(self, dispatcher: Dispatcher, name: str, target: Target) -> None:
        self.dispatcher = dispatcher
        self.name = name
        self.target = target
        self.queue: queue.Queue[OutboxItem | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=f"dispatch-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < BATCH:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                batch.append(nxt)
            try:
                self.dispatcher._send_batch(self.target, batch)
            except Exception:
                log.exception("dispatch to %s failed unexpectedly", self.name)
            finally:
                self.dispatcher._done(batch)


class Dispatcher:
    """Sends due outbox items; ``start()``/``stop()`` run it as a node service."""

    def __init__(
        self, cfg: Config, store: Store, *, poll_seconds: float = 0.5, telemetry: Telemetry | None = None
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.telemetry = telemetry or Telemetry.disabled()
        self.poll_seconds = poll_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._workers: dict[str, _DestinationWorker] = {}
        self._in_flight: set[int] = set()
        self._lock = threading.Lock()

    # --- public ------------------------------------------------------------------------
    def wake(self) -> None:
        """Look for due items now (call after enqueuing)."""
        self._wake.set()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for w in self._workers.values():
            w.queue.put(None)
        # items still in flight stay 'queued' in the store and are sent again after a restart
        deadline = time.monotonic() + min(5.0, self.cfg.dispatch.timeout_seconds)
        for w in self._workers.values():
            w.thread.join(timeout=max(0.1, deadline - time.monotonic()))
        self._workers.clear()

    def dispatch_once(self, now: float | None = None) -> int:
        """Hand every due item not already in flight to its destination's worker; returns how many."""
        t = time.time() if now is None else now
        n = 0
        # claimed, not just read: nodes sharing the store never send one item at the same time
        lease = max(120.0, 4 * self.cfg.dispatch.timeout_seconds)
        for item in self.store.claim_outbox(t, limit=500, lease_seconds=lease):
            with self._lock:
                if item.id in self._in_flight:
                    continue
            resolved = self._resolve(item)
            if resolved is None:
                continue
            name, target = resolved
            with self._lock:
                self._in_flight.add(item.id)
                worker = self._workers.get(name)
                if worker is None:
                    worker = self._workers[name] = _DestinationWorker(self, name, target)
            worker.queue.put(item)
            n += 1
        return n

    # --- internals ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.dispatch_once()
            except Exception:
                log.exception("dispatcher scan failed; retrying")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def _resolve(self, item: OutboxItem) -> tuple[str, Target] | None:
        """Destination -> (queue name, peer or folder), or None after dead-lettering an unresolvable item."""
        folder = self.cfg.folder(item.destination)
        if folder is not None:
            return folder.name, folder
        if item.destination == "sender":
            series = self.store.get_series(item.series_uid)
            calling = series.calling_ae if series is not None else "?"
            p = self.cfg.peer_by_ae_title(calling)
            if p is None:
                why = (f'destination "sender": no [[peers]] entry has AE title {calling!r} '
                       "(the series' calling AE); add one and run `medclf-node retry`")
                log.error("%s %s: %s", item.kind, item.object_uid, why)
                self.store.mark_dead(item.id, why)
                return None
        else:
            try:
                p = self.cfg.peer(item.destination)
            except KeyError:
                why = f"destination {item.destination!r} is not a configured peer or folder"
                log.error("%s %s: %s", item.kind, item.object_uid, why)
                self.store.mark_dead(item.id, why)
                return None
        return p.name, Peer(p.ae_title, p.host, p.port, tls=client_context(self.cfg.tls) if p.tls else None)

    def _done(self, batch: list[OutboxItem]) -> None:
        with self._lock:
            for item in batch:
                self._in_flight.discard(item.id)

    def _send_batch(self, target: Target, batch: list[OutboxItem]) -> None:
        d = self.cfg.dispatch
        data_dir = self.cfg.files_dir()
        sendable: list[tuple[OutboxItem, Path]] = []
        for item in batch:
            path = data_dir / item.path
            if not path.is_file():
                self.store.mark_dead(item.id, f"object file missing: {item.path}")
                log.error("%s %s: object file %s is missing; dead-lettered", item.kind, item.object_uid, item.path)
                continue
            sendable.append((item, path))
        if not sendable:
            return
        t0 = time.perf_counter()
        label = f"folder {target.path}" if isinstance(target, FolderSection) else target.ae_title
        try:
            errors = self._deliver(target, [p for _, p in sendable])
        except SendError as exc:
            errors = [str(exc)] * len(sendable)
        except Exception as exc:  # counts as a failed attempt, never a hot retry loop
            log.exception("sending to %s failed", label)
            errors = [f"{type(exc).__name__}: {exc}"] * len(sendable)
        now = time.time()
        tm = self.telemetry
        with tm.guard("send"):
            tm.metrics.observe_stage("send", time.perf_counter() - t0)
        for (item, _), err in zip(sendable, errors, strict=True):
            attempts = item.attempts + 1
            if err is None:
                self.store.mark_sent(item.id)
                log.info("sent %s %s to %s", item.kind, item.object_uid, label)
                with tm.guard("sent"):
                    tm.audit.result_object("sent", object_uid=item.object_uid, destination=item.destination,
                                           series_uid=item.series_uid, kind=item.kind, attempts=attempts)
                continue
            delay = backoff_seconds(attempts, d.initial_backoff_seconds, d.max_backoff_seconds)
            state = self.store.mark_failed_attempt(item.id, err, now + delay, d.max_attempts)
            with tm.guard("failure"):
                tm.metrics.dispatch_failures.labels(destination=item.destination).inc()
                if state == "dead":
                    tm.audit.result_object("dead_lettered", object_uid=item.object_uid, destination=item.destination,
                                           series_uid=item.series_uid, kind=item.kind, attempts=attempts, reason=err)
            if state == "dead":
                log.error("%s %s to %s dead after %d attempts: %s", item.kind, item.object_uid,
                          label, attempts, err)
            else:
                log.warning("%s %s to %s failed (attempt %d/%d, next in %.1f s): %s", item.kind,
                            item.object_uid, label, attempts, d.max_attempts, delay, err)

    def _deliver(self, target: Target, files: list[Path]) -> list[str | None]:
        """Per file None when delivered, else the reason: C-STORE to a peer, or a durable write to a folder."""
        if isinstance(target, FolderSection):
            return deliver(target, files, durable=self.cfg.node.durable_writes)
        results = send_files(target, files, local_ae=self.cfg.node.ae_title, timeout=self.cfg.dispatch.timeout_seconds)
        return [None if r.ok else (r.error or f"status 0x{r.status or 0:04X}") for r in results]
