"""OHIF Viewer 3 (npm ``@ohif/app``'s built ``dist/``) over Orthanc's DICOMweb plugin, on loopback.

Why this shape: OHIF is a static single-page app that talks DICOMweb.  Orthanc 1.10 with the
Debian ``orthanc-dicomweb`` plugin serves DICOMweb but sends no CORS headers, so the static
server here also proxies ``/dicom-web/`` to Orthanc: app and data share one origin and the
browser needs no flags.  Everything listens on 127.0.0.1 only (Orthanc itself binds all
interfaces, hence :func:`tests.orthanc.require_orthanc`'s loopback-only namespace).

Installs never happen here: ``make viewer-deps`` (part of ``make system-deps``) fetches the
pinned OHIF build into ``.cache/ohif/<version>/dist`` and installs Chromium and the plugin
outside the namespace.  :func:`viewer_unavailable_reason` says what is missing; the test skips
on it, or fails with ``MEDCLF_REQUIRE_VIEWER=1`` (set by ``make test``) so CI cannot go green
without running it.

Also run by ``tools/viewer.sh`` (``PYTHONPATH=tests python -m viewer.ohif``) to give a user the
same viewer on their machine.
"""

from __future__ import annotations

import argparse
import http.server
import importlib.util
import json
import logging
import mimetypes
import os
import shutil
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orthanc import Orthanc, orthanc_config, orthanc_unavailable_reason, orthanc_with_config, skip_or_fail

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
OHIF_VERSION = "3.13.2"  # keep in step with OHIF_VERSION in the Makefile
OHIF_DIST = Path(os.environ.get("MEDCLF_OHIF_DIST", ROOT / ".cache" / "ohif" / OHIF_VERSION / "dist"))
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
REQUIRE_ENV = "MEDCLF_REQUIRE_VIEWER"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# hop-by-hop headers (RFC 9110 7.6.1) and the ones the proxy recomputes
_SKIP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                 "proxy-authenticate", "proxy-authorization", "content-length", "server", "date"}


def chromium_path() -> str | None:
    """The system Chromium (Debian ``chromium``); Playwright's own browser download is not used."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def viewer_missing(*, browser: bool = True) -> list[str]:
    """What the viewer needs and this machine lacks (``browser``: the test's headless Chromium)."""
    missing = []
    if not (OHIF_DIST / "index.html").is_file():
        missing.append(f"OHIF {OHIF_VERSION} build at {OHIF_DIST}")
    if browser and chromium_path() is None:
        missing.append("Debian chromium")
    if not DICOMWEB_PLUGIN.is_file():
        missing.append("Debian orthanc-dicomweb")
    if browser and importlib.util.find_spec("playwright") is None:
        missing.append("playwright (pip, test extra)")
    return missing


def viewer_unavailable_reason() -> str | None:
    """Why the OHIF viewer test cannot run here, or None when it can."""
    missing = viewer_missing()
    if missing:
        return f"viewer test needs {', '.join(missing)}: run `make system-deps` (outside the test namespace)"
    return orthanc_unavailable_reason()


def require_viewer() -> None:
    """Skip (or, with MEDCLF_REQUIRE_VIEWER=1, fail) unless the viewer test can run here."""
    skip_or_fail(viewer_unavailable_reason(), REQUIRE_ENV)


# --- Orthanc with DICOMweb ----------------------------------------------------------------------


def dicomweb_config(workdir: Path, *, dicom_port: int, http_port: int) -> dict[str, Any]:
    """tests.orthanc's configuration plus the DICOMweb plugin at ``/dicom-web/``."""
    cfg = orthanc_config(workdir, dicom_port=dicom_port, http_port=http_port, modalities={})
    cfg["Plugins"] = [str(DICOMWEB_PLUGIN)]
    cfg["DicomWeb"] = {
        "Enable": True,
        "Root": "/dicom-web/",
        "EnableWado": True,
        "WadoRoot": "/wado",
        "Ssl": False,
        "StudiesMetadata": "Full",
        "SeriesMetadata": "Full",
    }
    return cfg


@contextmanager
def running_orthanc_dicomweb(workdir: Path, *, dicom_port: int, http_port: int, dicom: bool = True,
                             start_timeout: float = 30.0) -> Iterator[Orthanc]:
    """Orthanc in the foreground with the DICOMweb plugin; always stopped (SIGTERM, then kill).

    Same start/stop as :func:`tests.orthanc.running_orthanc` (whose configuration loads no
    plugins); the caller checks :func:`viewer_unavailable_reason` first.  ``dicom=False`` turns
    Orthanc's DICOM server off (only REST/DICOMweb, which refuses remote clients).
    """
    cfg = dicomweb_config(workdir, dicom_port=dicom_port, http_port=http_port)
    cfg["DicomServerEnabled"] = dicom
    with orthanc_with_config(workdir, cfg, dicom_port=dicom_port, http_port=http_port,
                             start_timeout=start_timeout) as orthanc:
        yield orthanc


# --- OHIF static server + DICOMweb proxy -----------------------------------------------------------


def app_config(dicomweb_root: str) -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source, no dialogs that would hide the viewport."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc (medclf-node)",
            "name": "orthanc",
            "wadoUriRoot": dicomweb_root,
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Static files of the OHIF build (SPA fallback to index.html) and a DICOMweb proxy."""

    server: _ViewerServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        log.debug("ohif-server: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path.startswith("/dicom-web/") or path == "/dicom-web":
            self._proxy()
        elif path == "/app-config.js":
            self._send(200, self.server.app_config_js.encode(), "application/javascript")
        else:
            self._static(path)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _static(self, path: str) -> None:
        dist = self.server.dist
        rel = urllib.request.url2pathname(path).lstrip("/")
        target = (dist / rel).resolve()
        if not target.is_relative_to(dist) or not target.is_file():
            target = dist / "index.html"  # client-side routes (/viewer, /) are the app's
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix == ".wasm":
            ctype = "application/wasm"
        self._send(200, target.read_bytes(), ctype)

    def _proxy(self) -> None:
        url = self.server.upstream + self.path
        req = urllib.request.Request(url, method="GET")
        for k in ("Accept", "Range"):
            if self.headers.get(k):
                req.add_header(k, self.headers[k])
        req.add_header("Host", self.headers.get("Host", ""))  # Orthanc builds BulkDataURIs from it
        try:
            with _OPENER.open(req, timeout=60) as rsp:
                status, body, hdrs = rsp.status, rsp.read(), rsp.headers
        except urllib.error.HTTPError as exc:
            status, body, hdrs = exc.code, exc.read(), exc.headers
        except OSError as exc:
            self._send(502, f"upstream: {exc}".encode(), "text/plain")
            return
        extra = {k: v for k, v in hdrs.items() if k.lower() not in _SKIP_HEADERS and k.lower() != "content-type"}
        self._send(status, body, hdrs.get("Content-Type", "application/octet-stream"), extra)


class _ViewerServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, dist: Path, upstream: str) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.dist = dist.resolve()
        self.upstream = upstream.rstrip("/")
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.app_config_js = app_config(self.url + "/dicom-web")


@dataclass(frozen=True)
class Viewer:
    """A running OHIF server: its base URL and how to open one study."""

    url: str

    def study_url(self, study_uid: str, series_uid: str | None = None) -> str:
        """The viewer on one study; ``series_uid``: the series OHIF shows first."""
        url = f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"
        return f"{url}&initialSeriesInstanceUID={series_uid}" if series_uid else url


@contextmanager
def serving_ohif(orthanc_url: str, *, port: int = 0, dist: Path = OHIF_DIST) -> Iterator[Viewer]:
    """Serve OHIF's ``dist`` on 127.0.0.1 with ``/dicom-web/`` proxied to Orthanc; stopped on exit."""
    server = _ViewerServer(port, dist, orthanc_url)
    thread = threading.Thread(target=server.serve_forever, name="ohif-server", daemon=True)
    thread.start()
    try:
        yield Viewer(server.url)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def dicom_files(paths: list[Path]) -> list[Path]:
    """Files under ``paths`` that carry the DICOM preamble magic ("DICM" at byte 128)."""
    out: list[Path] = []
    for p in paths:
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                with f.open("rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        out.append(f)
    return out


def main(argv: list[str] | None = None) -> int:
    """``tools/viewer.sh``: Orthanc (DICOMweb) + OHIF on this machine, loaded with the given files."""
    ap = argparse.ArgumentParser(description="OHIF Viewer 3 over Orthanc DICOMweb, on 127.0.0.1")
    ap.add_argument("paths", nargs="*", type=Path,
                    help="DICOM files or folders to load (a study, the node's var/outbox, a demo's output)")
    ap.add_argument("--port", type=int, default=3000, help="viewer port on 127.0.0.1 (default 3000)")
    ap.add_argument("--orthanc-port", type=int, default=8042, help="Orthanc REST/DICOMweb port (default 8042)")
    ap.add_argument("--dicom-port", type=int, default=0,
                    help="also accept C-STORE on this port (AE ORTHANC; Orthanc binds every interface); 0: off")
    ap.add_argument("--workdir", type=Path, default=ROOT / "var" / "viewer", help="Orthanc's data (kept)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    missing = viewer_missing(browser=False)
    if missing:
        print(f"missing: {', '.join(missing)}; run `make system-deps`", flush=True)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with running_orthanc_dicomweb(args.workdir, dicom_port=args.dicom_port or 4242, http_port=args.orthanc_port,
                                  dicom=bool(args.dicom_port)) as orthanc:
        files = dicom_files(args.paths)
        if files:
            orthanc.upload(files)
        with serving_ohif(orthanc.url, port=args.port) as viewer:
            print(f"OHIF {OHIF_VERSION}: {viewer.url}/  ({len(files)} files loaded; Orthanc {orthanc.url})")
            if args.dicom_port:
                print(f"C-STORE results to AE {orthanc.ae_title} at 127.0.0.1:{args.dicom_port}")
            for study in orthanc.get_json("/studies?expand"):
                tags = study.get("MainDicomTags", {})
                name = study.get("PatientMainDicomTags", {}).get("PatientName", "")
                srs = [se["MainDicomTags"].get("SeriesInstanceUID") for se in orthanc.get_json(
                    f"/studies/{study['ID']}/series?expand") if se["MainDicomTags"].get("Modality") == "SR"]
                # open on the SR (the last listed): loading it later from the study browser can leave its
                # annotation undrawn (a race in OHIF 3.13)
                url = viewer.study_url(tags["StudyInstanceUID"], srs[-1] if srs else None)
                print(f"  {name} {tags.get('StudyDate', '')}: {url}")
            print("Ctrl-C stops viewer and Orthanc", flush=True)
            try:
                stop.wait()
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
