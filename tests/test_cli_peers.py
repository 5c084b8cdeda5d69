"""`medclf-node peers`: every configured peer is C-ECHOed; the table says which answer and how fast.

The live peer is a real node (subprocess); the failing ones are a port nobody listens on and
the same node addressed with a called AE title it rejects.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import NODE_AE, SENDER_AE, free_port, write_config


def _peers(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medclf_node.cli", "peers", "--config", str(config), "--timeout", "10"],
        capture_output=True, text=True, timeout=120,
    )


def _rows(stdout: str) -> dict[str, str]:
    lines = stdout.splitlines()
    assert lines[0].split() == ["name", "AE", "host:port", "ms", "status"]
    return {line.split()[0]: line for line in lines[1:]}


def _admin_config(tmp_path: Path, peers: list[dict[str, Any]]) -> Path:
    """Config of the admin's node: calls as SCANNER, which the live test node accepts."""
    return write_config(tmp_path / "admin.toml", {
        "node": {"ae_title": SENDER_AE, "port": 0, "data_dir": str(tmp_path / "admin-data")},
        "peers": peers,
    })


def test_peers_reports_each_peer_and_fails_if_any_fails(node_factory: Any, tmp_path: Path) -> None:
    live = node_factory()
    dead_port = free_port()
    cfg = _admin_config(tmp_path, [
        {"name": "live", "ae_title": NODE_AE, "host": "127.0.0.1", "port": live.port},
        {"name": "dead", "ae_title": "NOBODY", "host": "127.0.0.1", "port": dead_port},
        {"name": "wrong-ae", "ae_title": "NOTME", "host": "127.0.0.1", "port": live.port},
    ])
    proc = _peers(cfg)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = _rows(proc.stdout)
    assert list(rows) == ["live", "dead", "wrong-ae"], "config order, one row each"
    live_cols = rows["live"].split()
    assert live_cols[1:3] == [NODE_AE, f"127.0.0.1:{live.port}"] and live_cols[-1] == "ok"
    assert float(live_cols[3]) > 0.0
    assert f"127.0.0.1:{dead_port}" in rows["dead"] and "FAILED" in rows["dead"]
    assert "FAILED" in rows["wrong-ae"] and "rejected" in rows["wrong-ae"]
    assert "2 of 3 peer(s)" in proc.stderr


def test_peers_exit_zero_when_all_answer(node_factory: Any, tmp_path: Path) -> None:
    live = node_factory()
    cfg = _admin_config(tmp_path, [{"name": "live", "ae_title": NODE_AE, "host": "127.0.0.1", "port": live.port}])
    proc = _peers(cfg)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _rows(proc.stdout)["live"].endswith("ok")


def test_peers_without_peers_says_so(tmp_path: Path) -> None:
    cfg = _admin_config(tmp_path, [])
    proc = _peers(cfg)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(no peers configured)"
