"""Series completion: when has a sender finished a series?

A series (state ``received``) becomes ``complete`` in the index when the first of these
happens (``series.completion`` records which):

* ``release`` (``completion.on_release``): an association that delivered instances of it
  was released cleanly *and* no other open association is still delivering to it.  An
  aborted association never completes a series (the sender did not finish).
* ``quiet``: no instance of it arrived for ``completion.quiet_seconds`` -- unless the last
  association that delivered it was aborted (A-ABORT, dropped connection, or the node stopped
  while it was open).  A sender that aborts usually sends the whole series again; a result
  computed from the part that arrived would reach the PACS first and be kept there.  Such a
  series waits for a clean release of a later association carrying it, or for ``max_wait``
  (``completion.quiet_after_abort = true`` restores the quiet timer for senders that always
  end with an abort).
* ``max_wait``: ``completion.max_wait_seconds`` have passed since the first instance of
  its current generation, even if instances are still trickling in or the sender aborted.
* ``forced``: an operator/API call (:meth:`Store.force_complete`).

Late instances (arriving after the series left ``received``) are always stored and
indexed.  With ``completion.late_instances = "reprocess"`` an instance arriving while the
series is ``processing`` or finished re-opens it: it goes back to ``received`` with its
``generation`` increased, completion detection starts over (normally the same
association's release), and the pipeline processes it again; the new result objects get
new UIDs (the generation is part of them) and name the objects they replace (see
:mod:`medclf_node.reporting.uids`).  A series still ``complete`` (not yet
claimed) simply includes the new instance.  With ``"ignore"`` the instance is recorded
and the series keeps its state and results.  (The rules live in
:meth:`medclf_node.store.Store.record_instance`.)

The tracker is the pipeline's hand-off: anything ``complete`` in the index is work.
It holds only soft state (which open association touched which series); how the sender
ended is kept in the index (``series.sender_state``), so after a restart the quiet/max-wait
timers, computed from index timestamps, finish the job, and a series whose association was
open when the node stopped counts as aborted (:meth:`CompletionTracker.start`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from medclf_node.config import CompletionSection
from medclf_node.store import Store

log = logging.getLogger(__name__)


class CompletionTracker:
    """Implements :class:`medclf_node.net.scp.AssociationListener` plus a timer thread.

    ``on_complete`` (optional) is called with the series UID after it was marked
    complete, e.g. to wake pipeline workers without waiting for their poll.
    """

    def __init__(
        self,
        store: Store,
        settings: CompletionSection,
        *,
        scan_interval: float = 0.5,
        on_complete: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.scan_interval = scan_interval
        self.on_complete = on_complete
        self._lock = threading.Lock()
        self._open: dict[str, set[str]] = {}  # assoc_id -> series UIDs it delivered
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held_logged: set[tuple[str, int]] = set()  # (series, generation) already logged as held

    # --- AssociationListener -----------------------------------------------------------
    def instance_received(self, assoc_id: str, series_uid: str) -> None:
        with self._lock:
            self._open.setdefault(assoc_id, set()).add(series_uid)

    def association_released(self, assoc_id: str) -> None:
        with self._lock:
            series = self._open.pop(assoc_id, set())
            busy = set().union(*self._open.values()) if self._open else set()
        done = sorted(series - busy)
        if done:
            # a clean release says the sender finished: it lifts an earlier abort's hold on the quiet timer
            self.store.set_sender_state(done, "released")
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
        if not series:
            return
        self.store.set_sender_state(sorted(series), "aborted")
        if self.settings.quiet_after_abort:
            log.info("association %s aborted; %d series wait for quiet/max-wait completion", assoc_id, len(series))
            return
        for uid in sorted(series):
            log.info("association %s aborted: series %s is not completed on the quiet timer; it waits for a clean "
                     "release of an association carrying it, or completion.max_wait_seconds (%.0f s after its "
                     "first instance)", assoc_id, uid, self.settings.max_wait_seconds)

    # --- timers ------------------------------------------------------------------------
    def _complete(self, series_uid: str, how: str) -> None:
        if self.store.mark_complete(series_uid, how):
            log.info("series %s complete (%s)", series_uid, how)
            if self.on_complete is not None:
                try:
                    self.on_complete(series_uid)
                except Exception:
                    log.exception("on_complete callback failed")

    def scan_once(self, now: float | None = None) -> int:
        """Complete every series whose quiet time or maximum wait has passed; returns how many."""
        t = time.time() if now is None else now
        st = self.settings
        due = self.store.due_for_completion(st.quiet_seconds, st.max_wait_seconds, t,
                                            quiet_after_abort=st.quiet_after_abort)
        if not st.quiet_after_abort:
            self._log_held(t)
        n = 0
        for uid, how in due:
            aborted = self._sender_aborted(uid)
            if self.store.mark_complete(uid, how, now=t):
                n += 1
                if aborted and how == "max_wait":
                    log.info("series %s complete (max_wait): its sending association was aborted and no clean "
                             "release followed within %.0f s", uid, st.max_wait_seconds)
                else:
                    log.info("series %s complete (%s)", uid, how)
                if self.on_complete is not None:
                    try:
                        self.on_complete(uid)
                    except Exception:
                        log.exception("on_complete callback failed")
        return n

    def _sender_aborted(self, series_uid: str) -> bool:
        row = self.store.get_series(series_uid)
        return row is not None and row.sender_state == "aborted"

    def _log_held(self, now: float) -> None:
        """Say once per series generation why a quiet series is not completed."""
        seen: set[tuple[str, int]] = set()
        for row in self.store.held_after_abort(self.settings.quiet_seconds, now):
            key = (row.series_uid, row.generation)
            seen.add(key)
            if key in self._held_logged:
                continue
            log.info("series %s: quiet for %.0f s but its sending association was aborted; holding it until a clean "
                     "release or completion.max_wait_seconds (%.0f s more)", row.series_uid, now - row.last_at,
                     max(0.0, row.opened_at + self.settings.max_wait_seconds - now))
        self._held_logged = seen

    def _run(self) -> None:
        while not self._stop.wait(self.scan_interval):
            try:
                self.scan_once()
            except Exception:
                log.exception("completion scan failed; retrying")

    def start(self) -> None:
        """Start the timer thread; first, series left open by a stopped node count as aborted."""
        held = self.store.hold_interrupted_on_startup()
        if held:
            log.info("%d received series had an association open when the node stopped; they count as aborted "
                     "(completion on a clean release or after max_wait, not on the quiet timer)", len(held))
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
