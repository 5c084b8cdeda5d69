"""The suite survives a native crash: it becomes one failed test that names the signal.

An inner pytest run (the suite's own options: xdist ``-n 1`` and the native_crash plugin) gets a
test that segfaults, one that aborts and two that pass.  Without the isolation the inner process
dies at the first crash with no summary.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent

INNER = '''
import ctypes
import os


def test_before():
    assert True


def test_segfault():
    ctypes.string_at(0)  # reads address 0: SIGSEGV in C, as a broken kernel would


def test_abort():
    os.abort()


def test_after():
    assert True
'''

pytest.importorskip("xdist")


def _inner_run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(INNER, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", "-p", "native_crash", "-p", "no:cacheprovider", "-q",
           "-o", "addopts=", "--rootdir", str(tmp_path), *extra, str(tmp_path)]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)


def test_native_crashes_become_failed_tests_and_the_suite_finishes(tmp_path: Path) -> None:
    proc = _inner_run(tmp_path, "-n", "1", "--max-worker-restart", "5")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # tests failed; pytest itself did not die
    assert "2 failed, 2 passed" in out, out
    assert "killed by signal SIGSEGV (11)" in out and "test_segfault" in out, out
    assert "killed by signal SIGABRT (6)" in out and "test_abort" in out, out
    assert "Fatal Python error: Segmentation fault" in out, out  # faulthandler's dump in the report


def test_without_isolation_the_crash_takes_the_run_down(tmp_path: Path) -> None:
    """The reference: the same tests in one process never reach a summary."""
    proc = _inner_run(tmp_path, "-p", "no:xdist")
    assert proc.returncode == -11, proc.stdout + proc.stderr  # SIGSEGV took pytest itself down
    assert "passed" not in proc.stdout and "failed" not in proc.stdout  # no summary line


def test_benchmarks_name_the_cpu_flags_behind_their_figures() -> None:
    sys.path.insert(0, str(TESTS_DIR.parent / "benchmarks"))
    try:
        from machine import cpu_flags, describe_machine
    finally:
        sys.path.pop(0)
    sample = "model name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni\n"
    assert cpu_flags(sample) == ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16")
    assert cpu_flags("flags : sse2 avx2\n") == ("avx2",)
    assert describe_machine().startswith("machine: ") and " cores, flags " in describe_machine()
