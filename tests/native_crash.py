"""A native crash (segfault, abort) in one test fails that test and the suite goes on.

TensorFlow kernels can kill the whole process on some CPUs (bf16 Conv3D backward on AVX-512-BF16
machines segfaults or aborts).  The suite runs under pytest-xdist (``-n 1``, see the Makefile):
tests run in a worker process, xdist replaces a worker that dies and reports the test it was
running as failed.  This plugin makes that report say *why*: the signal that killed the worker
(from its exit status) and the fatal-error traceback Python's faulthandler wrote for it.

Each worker sends faulthandler's output to ``<crash_dir>/<worker id>.txt`` (truncated when the
worker starts), the controller reads it back when xdist tells it a worker crashed.  Without
xdist (``pytest -p no:xdist`` or a single test run by hand) the plugin does nothing.
"""

from __future__ import annotations

import faulthandler
import signal
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import pytest

CRASH_DIR_KEY = "medclf_crash_dir"
_TAIL_CHARS = 6000
_crash_file: IO[str] | None = None


def _crash_dir(config: pytest.Config) -> Path:
    path = getattr(config, "_medclf_crash_dir", None)
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="pytest-native-crash-"))
        config._medclf_crash_dir = path  # type: ignore[attr-defined]
    return Path(path)


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(), "medclf-native-crash-xdist")


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Worker side: faulthandler writes to a file the controller can read after we die."""
    global _crash_file
    workerinput = getattr(session.config, "workerinput", None)
    if not workerinput or CRASH_DIR_KEY not in workerinput:
        return
    path = Path(workerinput[CRASH_DIR_KEY]) / f"{workerinput['workerid']}.txt"
    _crash_file = path.open("w", encoding="utf-8")
    faulthandler.enable(file=_crash_file, all_threads=True)


def _signal_name(returncode: int | None) -> str:
    if returncode is None:
        return "an unknown exit status"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name} ({-returncode})"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


def _worker_returncode(node: Any) -> int | None:
    """The dead worker's exit status (execnet keeps its Popen; private, so guarded)."""
    try:
        popen = node.gateway._io.popen
        deadline = time.monotonic() + 5.0
        while popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return None if popen.returncode is None else int(popen.returncode)
    except Exception:  # noqa: BLE001 - best effort: the report still says the worker crashed
        return None


class _XdistHooks:
    """Registered only when xdist is present (its hook specs must exist)."""

    def pytest_configure_node(self, node: Any) -> None:
        """Controller side: tell each worker where to write its fatal-error dump."""
        node.workerinput[CRASH_DIR_KEY] = str(_crash_dir(node.config))

    @pytest.hookimpl(tryfirst=True)
    def pytest_handlecrashitem(self, crashitem: str, report: pytest.TestReport, sched: Any) -> None:
        node = getattr(report, "node", None)
        returncode = _worker_returncode(node) if node is not None else None
        dump = ""
        if node is not None:
            path = _crash_dir(node.config) / f"{node.gateway.id}.txt"
            if path.exists():
                dump = path.read_text(encoding="utf-8", errors="replace")[-_TAIL_CHARS:]
        report.longrepr = (
            f"native crash: the test process was killed by {_signal_name(returncode)} while running "
            f"{crashitem}; the suite goes on in a new worker.\n"
            + (f"faulthandler:\n{dump}" if dump else "(no faulthandler output)")
        )
