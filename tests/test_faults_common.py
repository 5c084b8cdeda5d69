"""Helpers shared by the fault, load and TLS tests (no tests here).

* ``rounds()``: how many rounds a repeated fault test runs: ``MEDCLF_FAULT_ROUNDS`` or the CI size.
* ``record()``: figures for ``docs/reliability.md``; appended as JSON lines to the file named by
  ``MEDCLF_RELIABILITY_OUT`` (set by ``benchmarks/reliability.py``), a no-op otherwise.
* ``spool_state()`` / ``index_state()``: what is on disk and in the index of a stopped node.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pg
import pydicom
from conftest import RunningNode, start_node
from stores import query

CI_ROUNDS = 5


def rounds(default: int = CI_ROUNDS) -> int:
    return max(1, int(os.environ.get("MEDCLF_FAULT_ROUNDS", default)))


def record(test: str, what: str, **figures: Any) -> None:
    out = os.environ.get("MEDCLF_RELIABILITY_OUT")
    if not out:
        return
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps({"test": test, "what": what, **figures}) + "\n")


@dataclass
class SpoolState:
    visible: dict[str, Path]  # SOP Instance UID -> file (complete names only)
    temporary: list[Path]  # hidden .tmp- files (unacknowledged writes in flight at a crash)
    incomplete: list[Path]  # visible files that do not parse fully (must never happen)


def spool_state(data_dir: Path) -> SpoolState:
    visible: dict[str, Path] = {}
    temporary: list[Path] = []
    incomplete: list[Path] = []
    for p in (data_dir / "spool").rglob("*"):
        if not p.is_file():
            continue
        if p.name.startswith("."):
            temporary.append(p)
            continue
        try:
            ds = pydicom.dcmread(p)
            if "PixelData" in ds and len(ds.PixelData) < int(ds.Rows) * int(ds.Columns) * 2:
                raise ValueError("short pixel data")
        except Exception:  # noqa: BLE001 - any failure means a partial file became visible
            incomplete.append(p)
            continue
        visible[p.stem] = p
    return SpoolState(visible, temporary, incomplete)


@dataclass
class IndexState:
    integrity: str
    instances: dict[str, str]  # SOP Instance UID -> relative path
    series: dict[str, str]  # series UID -> state


def index_state(data_dir: Path) -> IndexState:
    integrity = "ok" if pg.on_postgres() else query(data_dir, "PRAGMA integrity_check")[0][0]
    instances = {str(k): str(v) for k, v in query(data_dir, "SELECT sop_instance_uid, path FROM instances")}
    series = {str(k): str(v) for k, v in query(data_dir, "SELECT series_uid, state FROM series")}
    return IndexState(str(integrity), instances, series)


def restart(node: RunningNode) -> RunningNode:
    """Start the node again on the same config and data (after a kill -9 or a stop)."""
    return start_node(node.config, node.data_dir, node.log_path, timeout=60)


def dcmtk_tls_capable() -> bool:
    try:
        out = subprocess.run(["echoscu", "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "+tls" in out
