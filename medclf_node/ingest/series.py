"""Series completion: when has a sender finished a series?

A series (state ``received``) becomes ``complete`` in the index when the first of these
happens (``series.completion`` records which):

* ``release`` (``completion.on_release``): an association that delivered instances of it
  was released cleanly *and* no other open association is still delivering to it.  An
  aborted association never completes a series (the sender did not finish).
* ``quiet``: no instance of it arrived for ``completion.quiet_seconds``.
* ``max_wait``: ``completion.max_wait_seconds`` have passed since its first instance,
  even if instances are still trickling in.
* ``forced``: an operator/API call (:meth:`Index.force_complete`).

Late instances (arriving after the series left ``received``) are always stored and
indexed.  With ``completion.late_instances = "reprocess"`` an instance arriving while the
series is ``processing`` or finished re-opens it: it goes back to ``received`` with its
``generation`` increased, completion detection starts over (normally the same
association's release), and the pipeline processes it again; result objects keep their
deterministic UIDs and replace the earlier ones.  A series still ``complete`` (not yet
claimed) simply includes the new instance.  With ``"ignore"`` the instance is recorded
and the series keeps its state and results.  (The rules live in
:meth:`medclf_node.ingest.index.Index.record_instance`.)

The tracker is the pipeline's hand-off: anything ``complete`` in the index is work.
It holds only soft state (which open association touched which series); after a restart
the quiet/max-wait timers, which are computed from index timestamps, finish the job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from medclf_node.config import CompletionSection
from medclf_node.ingest.index import Index

log = logging.getLogger(__name__)


class CompletionTracker:
    """Implements :class:`medclf_node.net.scp.AssociationListener` plus a timer thread.

    ``on_complete`` (optional) is called with the series UID after it was marked
    complete, e.g. to wake pipeline workers without waiting for their poll.
    """

    def __init__(
        self,
        index: Index,
        settings: CompletionSection,
        *,
        scan_interval: float = 0.5,
        on_complete: Callable[[str], None] | None = None,
    ) -> None:
        self.index = index
        self.settings = settings
        self.scan_interval = scan_interval
        self.on_complete = on_complete
        self._lock = threading.Lock()
        self._open: dict[str, set[str]] = {}  # assoc_id -> series UIDs it delivered
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- AssociationListener -----------------------------------------------------------
    def instance_received(self, assoc_id: str, series_uid: str) -> None:
        with self._lock:
            self._open.setdefault(assoc_id, set()).add(series_uid)

    def association_released(self, assoc_id: str) -> None:
        with self._lock:
            series = self._open.pop(assoc_id, set())
            busy = set().union(*self._open.values()) if self._open else set()
        if not self.settings.on_release:
            return
        for uid in sorted(series):
            if uid in busy:
                log.debug("series %s still being received on another association", uid)
                continue
            self._complete(uid, "release")

    def association_aborted(self, assoc_id: str) -> None:
        with self._lock:
            series = self._open.pop(assoc_id, set())
        if series:
            log.info("association %s aborted; %d series wait for quiet/max-wait completion", assoc_id, len(series))

    # --- timers ------------------------------------------------------------------------
    def _complete(self, series_uid: str, how: str) -> None:
        if self.index.mark_complete(series_uid, how):
            log.info("series %s complete (%s)", series_uid, how)
            if self.on_complete is not None:
                try:
                    self.on_complete(series_uid)
                except Exception:
                    log.exception("on_complete callback failed")

    def scan_once(self, now: float | None = None) -> int:
        """Complete every series whose quiet time or maximum wait has passed; returns how many."""
        t = time.time() if now is None else now
        due = self.index.due_for_completion(self.settings.quiet_seconds, self.settings.max_wait_seconds, t)
        n = 0
        for uid, how in due:
            if self.index.mark_complete(uid, how, now=t):
                n += 1
                log.info("series %s complete (%s)", uid, how)
                if self.on_complete is not None:
                    try:
                        self.on_complete(uid)
                    except Exception:
                        log.exception("on_complete callback failed")
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.scan_interval):
            try:
                self.scan_once()
            except Exception:
                log.exception("completion scan failed; retrying")

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
