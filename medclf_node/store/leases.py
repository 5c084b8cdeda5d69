"""Keep the leases of series this process is working on alive, and hand back dead ones.

Why a thread: a series may take longer than one lease to process (a big volume, a slow
model); renewing every third of the lease keeps it ours while we work, and when this
process dies the renewals stop, the lease runs out and any node's :meth:`sweep` (via
``Store.reclaim_expired``) puts the series back in the queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from medclf_node.store.interface import Store
from medclf_node.store.records import SeriesRow

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the leases of held series; ``sweep`` reclaims expired ones (any node's)."""

    def __init__(self, store: Store, lease_seconds: float) -> None:
        self.store = store
        self.lease_seconds = lease_seconds
        self._held: dict[str, tuple[str, int]] = {}  # series uid -> (holder, generation)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sweep = 0.0

    @contextmanager
    def hold(self, row: SeriesRow) -> Iterator[None]:
        """Renew ``row``'s lease while the block runs."""
        if row.worker is None:
            yield
            return
        with self._lock:
            self._held[row.series_uid] = (row.worker, row.generation)
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(row.series_uid, None)

    def renew_once(self) -> int:
        """Renew every held lease now; returns how many are still ours."""
        with self._lock:
            held = list(self._held.items())
        ok = 0
        for uid, (holder, gen) in held:
            try:
                if self.store.renew_lease(uid, holder, gen, self.lease_seconds):
                    ok += 1
                else:
                    log.warning("series %s: lease no longer ours (expired and taken over, or re-opened)", uid)
            except Exception:
                log.exception("cannot renew the lease of series %s; retrying", uid)
        return ok

    def sweep(self, *, every_seconds: float | None = None) -> list[str]:
        """``Store.reclaim_expired``, at most once per ``every_seconds`` (default: a quarter lease)."""
        now = time.monotonic()
        period = self.lease_seconds / 4 if every_seconds is None else every_seconds
        if now - self._last_sweep < period:
            return []
        self._last_sweep = now
        return self.store.reclaim_expired()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="leases", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            self.renew_once()
