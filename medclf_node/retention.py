"""Spool retention and the free-disk watermark.

Why pure functions fed with candidates: which files may go is the index's knowledge
(series finished, results sent); deleting them safely is this module's.  The index hands
in ``(path, finished_at)`` pairs, :func:`purge_spool` deletes those that are old enough
and returns exactly what went, so the index can drop those rows afterwards.  A path
outside the spool root is never deleted, whatever the database says.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from medclf_node.store import Store

log = logging.getLogger(__name__)

MB = 1024 * 1024


def _existing_ancestor(path: Path) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_disk_ok(data_dir: Path, min_free_mb: int) -> bool:
    """True while the file system of ``data_dir`` has at least ``min_free_mb`` free (0 disables)."""
    if min_free_mb <= 0:
        return True
    return shutil.disk_usage(_existing_ancestor(data_dir)).free >= min_free_mb * MB


class DiskWatermark:
    """The C-STORE handler's disk check: ``if not watermark.ok(): return 0xA700``.

    ``statvfs`` is cheap, but the result is still cached for ``interval_s`` so a burst of
    hundreds of instances per second costs one system call per interval.
    """

    def __init__(self, data_dir: Path, min_free_mb: int, interval_s: float = 1.0) -> None:
        self.data_dir = Path(data_dir)
        self.min_free_mb = min_free_mb
        self.interval_s = interval_s
        self._checked_at = float("-inf")
        self._ok = True

    def ok(self, now: float | None = None) -> bool:
        t = time.monotonic() if now is None else now
        if t - self._checked_at >= self.interval_s:
            was_ok = self._ok
            self._ok = free_disk_ok(self.data_dir, self.min_free_mb)
            self._checked_at = t
            if was_ok and not self._ok:
                log.error(
                    "free disk space in %s below %d MB: refusing new instances (0xA700) until space is freed",
                    self.data_dir, self.min_free_mb,
                )
            elif self._ok and not was_ok:
                log.warning("free disk space in %s back above %d MB: accepting instances", self.data_dir,
                            self.min_free_mb)
        return self._ok


@dataclass(frozen=True)
class RetentionPolicy:
    """When a finished series' received instances may be deleted (from ``[retention]``)."""

    spool_days: float = 7.0
    delete_after_sent: bool = True

    def min_age_seconds(self, all_sent: bool) -> float:
        """Minimum age since the series finished: 0 once every result was sent (if configured)."""
        return 0.0 if (all_sent and self.delete_after_sent) else self.spool_days * 86400.0


@dataclass
class PurgeResult:
    deleted: list[Path] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)  # already gone: the index row can go too
    kept: list[Path] = field(default_factory=list)  # not old enough yet
    refused: list[Path] = field(default_factory=list)  # outside the spool root, or not a regular file
    errors: list[tuple[Path, str]] = field(default_factory=list)
    bytes_freed: int = 0

    @property
    def removed(self) -> list[Path]:
        """Paths whose index rows may be dropped (deleted now or already missing)."""
        return self.deleted + self.missing


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True


def purge_spool(
    candidates: Iterable[tuple[Path | str, float]],
    *,
    root: Path,
    older_than_s: float,
    now: float | None = None,
    base: Path | None = None,
) -> PurgeResult:
    """Delete spool files whose timestamp (e.g. when their series was sent) is older than ``older_than_s``.

    ``candidates`` are ``(path, timestamp)`` with ``time.time()`` timestamps; relative paths
    are relative to ``base`` (default ``root``; the index stores paths relative to data_dir).
    Only files inside ``root`` are deleted; empty parent directories below ``root`` go too.
    """
    t = time.time() if now is None else now
    root_r = Path(root).resolve()
    result = PurgeResult()
    parents: set[Path] = set()
    base_p = Path(base) if base is not None else Path(root)
    for raw, stamp in candidates:
        path = Path(raw) if Path(raw).is_absolute() else base_p / raw
        if t - stamp < older_than_s:
            result.kept.append(path)
            continue
        if not _inside(path, root_r):
            log.error("retention: refusing to delete %s: outside the spool %s", path, root_r)
            result.refused.append(path)
            continue
        try:
            if path.is_symlink() or (path.exists() and not path.is_file()):
                result.refused.append(path)
                continue
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            result.missing.append(path)
            continue
        except OSError as exc:
            result.errors.append((path, str(exc)))
            log.warning("retention: cannot delete %s: %s", path, exc)
            continue
        result.deleted.append(path)
        result.bytes_freed += size
        parents.add(path.resolve().parent)
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        _remove_empty_dirs(parent, root_r)
    if result.deleted:
        log.info("retention: deleted %d files (%.1f MB)", len(result.deleted), result.bytes_freed / MB)
    return result


def _remove_empty_dirs(start: Path, root: Path) -> None:
    p = start
    while p != root and _inside(p, root):
        try:
            p.rmdir()
        except OSError:
            return  # not empty (or gone): stop climbing
        p = p.parent


class RetentionService:
    """Deletes the received instances of finished series, as ``[retention]`` says, once a minute.

    * series in state ``sent`` (every result delivered): at once with ``delete_after_sent``,
      otherwise after ``spool_days``;
    * ``reported`` (results still queued), ``skipped`` and ``failed``: after ``spool_days``.

    Only files under the spool are deleted; their index rows go with them, the series rows stay.
    A late instance that re-opens a purged series is processed with what is still there.
    """

    def __init__(self, store: Store, data_dir: Path, policy: RetentionPolicy, *, interval_s: float = 60.0) -> None:
        self.store = store
        self.data_dir = Path(data_dir)
        self.spool_root = self.data_dir / "spool"
        self.policy = policy
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self, now: float | None = None) -> PurgeResult:
        t = time.time() if now is None else now
        rows = self.store.retention_candidates()
        total = PurgeResult()
        for all_sent in (True, False):
            batch = [(path, ts) for _uid, state, path, ts in rows if (state == "sent") == all_sent]
            if not batch:
                continue
            res = purge_spool(batch, root=self.spool_root, base=self.data_dir,
                              older_than_s=self.policy.min_age_seconds(all_sent), now=t)
            removed = [p.relative_to(self.data_dir).as_posix() for p in res.removed]
            if removed:
                self.store.forget_instances(removed)
            total.deleted += res.deleted
            total.missing += res.missing
            total.kept += res.kept
            total.refused += res.refused
            total.errors += res.errors
            total.bytes_freed += res.bytes_freed
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:
                log.exception("retention pass failed; trying again later")

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
