"""Shared fixtures: free loopback ports, a node running as a real subprocess, DCMTK helpers.

``node_factory(**sections)`` writes a TOML config (``[node]`` on a free port, data in the
test's tmp dir, peers/accept/completion as given), starts ``medclf-node serve`` through the
CLI and waits until ``data_dir/node.port`` appears.  Every node started is stopped
(SIGTERM, then SIGKILL) at teardown.

``MEDCLF_TEST_STORE=postgresql``: every node a test builds (in-process or subprocess) and every
``stores.open_test_store`` runs on a throwaway PostgreSQL (:mod:`pg`), one database per data
directory, so the node-level tests check both back-ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pg
import pytest
from stores import store_section

pytest_plugins = ["native_crash"]  # a segfault in one test fails that test, the suite goes on

ROOT = Path(__file__).resolve().parent.parent
NODE_AE = "MEDCLF"
SENDER_AE = "SCANNER"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: TCP_NODELAY=1 or loopback transfers crawl."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def has_dcmtk() -> bool:
    return shutil.which("storescu") is not None and shutil.which("echoscu") is not None


needs_dcmtk = pytest.mark.skipif(not has_dcmtk(), reason="DCMTK (storescu/echoscu) not installed")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict[str, Any]) -> Path:
    """Write a TOML file from ``{"node": {...}, "peers": [{...}], ...}`` (tables and arrays of tables)."""
    lines: list[str] = []
    for name, body in sections.items():
        if isinstance(body, list):
            for entry in body:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
        else:
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@dataclass
class RunningNode:
    """A ``medclf-node serve`` subprocess."""

    proc: subprocess.Popen[bytes]
    config: Path
    data_dir: Path
    port: int
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return int(self.proc.returncode)

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


def start_node(config: Path, data_dir: Path, log_path: Path, timeout: float = 20.0) -> RunningNode:
    """Start ``medclf-node serve --config`` and wait for its port file."""
    port_file = data_dir / "node.port"
    port_file.unlink(missing_ok=True)
    log_f = log_path.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "medclf_node.cli", "serve", "--config", str(config)],
        stdout=log_f, stderr=subprocess.STDOUT, cwd=str(config.parent),
    )
    log_f.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists():
            text = port_file.read_text().strip()
            if text:
                return RunningNode(proc, config, data_dir, int(text), log_path)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"node did not start:\n{log_path.read_text(errors='replace')}")


def node_sections(data_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A test config: node on port 0 with data in ``data_dir``, SCANNER allowed, pipeline off."""
    sections: dict[str, Any] = {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": 0, "data_dir": str(data_dir)},
        "peers": [{"name": "scanner", "ae_title": SENDER_AE, "host": "127.0.0.1", "port": free_port()}],
        "completion": {"quiet_seconds": 30.0},
        "pipeline": {"enabled": False},  # intake tests need no model; pipeline tests enable it
        "metrics": {"port": 0},  # several test nodes at once: never a fixed port
        "retention": {"min_free_disk_mb": 0},
    }
    if pg.on_postgres():
        sections["store"] = store_section(data_dir)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(sections.get(k), dict):
            sections[k] = {**sections[k], **v}
        else:
            sections[k] = v
    return sections


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., RunningNode]]:
    """Start nodes as subprocesses; all are stopped at teardown."""
    started: list[RunningNode] = []

    def factory(data_dir: Path | None = None, **overrides: Any) -> RunningNode:
        d = data_dir or (tmp_path / f"node{len(started)}")
        d.mkdir(parents=True, exist_ok=True)
        cfg = write_config(tmp_path / f"node{len(started)}.toml", node_sections(d, **overrides))
        node = start_node(cfg, d, tmp_path / f"node{len(started)}.log")
        started.append(node)
        return node

    yield factory
    for n in started:
        n.stop()


@pytest.fixture(scope="session")
def ct_series_300(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 300-slice 512x512 synthetic CT series (written once per test session)."""
    from intake_series import write_ct_series

    return write_ct_series(tmp_path_factory.mktemp("ct300"), 300, 512, 512, seed=1)


def storescu(port: int, paths: list[Path] | Path, *, calling: str = SENDER_AE, called: str = NODE_AE,
             extra: list[str] | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run DCMTK storescu (verbose) against 127.0.0.1:port."""
    files = [str(p) for p in (paths if isinstance(paths, list) else [paths])]
    cmd = ["storescu", "-v", "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1", str(port)]
    if len(files) == 1 and Path(files[0]).is_dir():
        cmd += ["+sd", files[0]]
    else:
        cmd += files
    return subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout)


def echoscu(port: int, *, calling: str = SENDER_AE, called: str = NODE_AE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=30,
    )


@pytest.fixture(scope="session", autouse=True)
def _postgres_session() -> Iterator[None]:
    """Stop the throwaway PostgreSQL (if a test started one) at the end of the session."""
    yield
    pg.stop_server()


def postgres_or_skip() -> pg.PgServer:
    """The session's PostgreSQL; skip the test without one (fail under MEDCLF_REQUIRE_POSTGRES=1)."""
    try:
        return pg.server()
    except pg.Unavailable as exc:
        if pg.required():
            pytest.fail(f"MEDCLF_REQUIRE_POSTGRES=1 but PostgreSQL is unavailable: {exc}")
        pytest.skip(f"PostgreSQL unavailable: {exc}")


@pytest.fixture(autouse=True)
def _store_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under MEDCLF_TEST_STORE=postgresql, nodes built in-process open PostgreSQL instead of SQLite."""
    if not pg.on_postgres():
        return
    server = postgres_or_skip()
    import medclf_node.node as node_mod
    import medclf_node.store as store_mod
    from medclf_node.config import Config

    real = store_mod.open_store

    def on_postgres(cfg: Config, *, read_only: bool = False) -> store_mod.Store:
        if cfg.store.backend == "sqlite":
            dsn = server.dsn_for(str(Path(cfg.node.data_dir).resolve()))
            cfg = cfg.model_copy(update={"store": cfg.store.model_copy(update={"backend": "postgresql", "dsn": dsn})})
        return real(cfg, read_only=read_only)

    monkeypatch.setattr(store_mod, "open_store", on_postgres)
    monkeypatch.setattr(node_mod, "open_store", on_postgres)
