"""Orthanc (Debian package, 1.10) as the PACS in tests: generated config, foreground process, REST.

Orthanc binds ALL interfaces for both DICOM and HTTP and has no option to bind loopback only.
So :func:`running_orthanc` starts it only when this process lives in a network namespace whose
only interface is ``lo`` (``tools/netns-loopback``, which ``make test`` uses, gives exactly that).

Outside such a namespace the test is skipped with the reason and the command to use, so a
developer running plain ``pytest`` is not told the code is broken.  ``make test`` sets
``MEDCLF_REQUIRE_ORTHANC=1``, which turns that skip into a failure: CI must RUN the round trip,
and a silently skipped round trip would be a false green.

REST goes through urllib (no extra dependency) with proxies disabled: an ``http_proxy`` in the
environment must never see, or swallow, requests to 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

log = logging.getLogger(__name__)

ORTHANC_AE = "ORTHANC"
REQUIRE_ENV = "MEDCLF_REQUIRE_ORTHANC"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def network_interfaces() -> list[str]:
    """Interfaces of THIS process's network namespace (/sys/class/net shows the mounter's instead)."""
    return sorted(name for _idx, name in socket.if_nameindex())


def orthanc_unavailable_reason() -> str | None:
    """Why Orthanc may not be started here, or None when it may."""
    if shutil.which("Orthanc") is None:
        return "Orthanc is not installed (Debian package `orthanc`; `make system-deps` installs it)"
    interfaces = network_interfaces()
    if interfaces != ["lo"]:
        return (
            f"Orthanc binds all interfaces and this process sees {interfaces}; run the tests in a "
            "loopback-only network namespace: tools/netns-loopback .venv/bin/python -m pytest ..."
        )
    return None


def skip_or_fail(reason: str | None, require_env: str) -> None:
    """Nothing when ``reason`` is None; else skip, or fail where ``require_env``=1 (CI must not skip)."""
    if reason is None:
        return
    if os.environ.get(require_env) == "1":
        pytest.fail(f"{require_env}=1 but {reason}")
    pytest.skip(reason)


def require_orthanc() -> None:
    """Skip (or, with MEDCLF_REQUIRE_ORTHANC=1, fail) unless Orthanc may be started here."""
    skip_or_fail(orthanc_unavailable_reason(), REQUIRE_ENV)


def orthanc_config(
    workdir: Path, *, dicom_port: int, http_port: int, modalities: Mapping[str, tuple[str, str, int]]
) -> dict[str, Any]:
    """An Orthanc configuration: data in ``workdir``, no auth, no plugins, ``modalities`` declared.

    ``modalities`` maps Orthanc's name for a peer to (AE title, host, port).
    """
    return {
        "Name": "medclf-test-orthanc",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "WebDavEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ORTHANC_AE,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {name: [ae, host, port] for name, (ae, host, port) in modalities.items()},
        # close the SCU association as soon as a job ends: the node completes series on release
        "DicomAssociationCloseDelay": 0,
        "DicomScuTimeout": 30,
        "TcpNoDelay": True,
        "SaveJobs": False,
        "SyncStorageArea": False,
        "StorageCompression": False,
        "ConcurrentJobs": 2,
        "HttpThreadsCount": 10,
        "DicomThreadsCount": 2,
    }


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed (message includes the response body)."""


@dataclass
class Orthanc:
    """A running Orthanc: its ports and a small REST client."""

    proc: subprocess.Popen[bytes]
    http_port: int
    dicom_port: int
    log_path: Path
    ae_title: str = ORTHANC_AE

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", timeout: float = 60.0) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with _OPENER.open(req, timeout=timeout) as rsp:
                return bytes(rsp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {detail}") from None

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post_json(self, path: str, payload: Any, timeout: float = 60.0) -> Any:
        raw = self.request("POST", path, json.dumps(payload).encode(), timeout=timeout)
        return json.loads(raw) if raw.strip() else None

    def upload(self, paths: list[Path]) -> list[dict[str, Any]]:
        """POST each DICOM file to /instances; returns Orthanc's answers (ID, ParentStudy, Status...)."""
        out = []
        for p in paths:
            raw = self.request("POST", "/instances", p.read_bytes(), content_type="application/dicom")
            out.append(json.loads(raw))
        return out

    def instance_file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")

    def wait_for(self, condition: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(interval)
        return condition()


def _alive(url: str) -> bool:
    try:
        with _OPENER.open(url + "/system", timeout=2) as rsp:
            return bool(rsp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("Orthanc ignored SIGTERM for %.0f s; killing it", timeout)
        proc.kill()
        proc.wait(timeout=5)


@contextmanager
def running_orthanc(
    workdir: Path, *, dicom_port: int, http_port: int,
    modalities: Mapping[str, tuple[str, str, int]] | None = None, start_timeout: float = 30.0,
) -> Iterator[Orthanc]:
    """Start Orthanc in the foreground with a generated config; always stopped (SIGTERM, then kill)."""
    require_orthanc()
    cfg = orthanc_config(workdir, dicom_port=dicom_port, http_port=http_port, modalities=modalities or {})
    with orthanc_with_config(workdir, cfg, dicom_port=dicom_port, http_port=http_port,
                             start_timeout=start_timeout) as orthanc:
        yield orthanc


@contextmanager
def orthanc_with_config(
    workdir: Path, cfg: dict[str, Any], *, dicom_port: int, http_port: int, start_timeout: float = 30.0,
) -> Iterator[Orthanc]:
    """Orthanc in the foreground on ``cfg`` (written to ``workdir``), waited for, always stopped."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "orthanc.json"
    cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    log_path = workdir / "orthanc.log"
    with log_path.open("ab") as log_f:
        proc = subprocess.Popen(["Orthanc", str(cfg_path)], stdout=log_f, stderr=subprocess.STDOUT,
                                cwd=str(workdir), env={**os.environ, "TCP_NODELAY": "1"})
    orthanc = Orthanc(proc, http_port, dicom_port, log_path)
    try:
        deadline = time.monotonic() + start_timeout
        while not _alive(orthanc.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise OrthancError(f"Orthanc did not start (exit {proc.poll()}):\n{orthanc.log()[-4000:]}")
            time.sleep(0.1)
        yield orthanc
    finally:
        _stop(proc)
