"""Prometheus metrics and the HTTP endpoints an operator or orchestrator polls.

Why its own registry: tests (and a process running two nodes) can hold several ``Metrics``
objects without the global registry's "duplicated timeseries" errors.  Why callbacks for
gauges such as series-by-state or outbox depth: the truth lives in SQLite, so the gauge
asks at scrape time instead of being kept in sync by every writer.

Endpoints of :class:`MetricsServer`:

* ``/metrics`` Prometheus text format;
* ``/healthz`` 200 ``ok`` while the process serves HTTP (liveness);
* ``/readyz`` 200 when every readiness check passes, else 503 with a JSON body naming the
  failing checks (readiness: models loaded, data directory writable, index reachable).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from medclf_node.config import MetricsSection

log = logging.getLogger(__name__)

NAMESPACE = "medclf"
STAGES: tuple[str, ...] = ("completion", "volume", "inference", "report", "send")
# Seconds: a send or inference takes milliseconds to seconds, completion waits up to minutes.
STAGE_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)
_LABEL_RE = re.compile(r"[^a-z0-9_]+")

ReadinessChecks = Callable[[], Mapping[str, bool]]


def label_code(value: str, max_len: int = 48) -> str:
    """Normalise a free-form reason into a short label value (bounded cardinality, no spaces)."""
    code = _LABEL_RE.sub("_", value.strip().lower()).strip("_")
    return code[:max_len] or "unknown"


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (its nearest existing ancestor)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


class _CallbackGauge(Collector):
    """A labelled gauge whose samples come from a function called at scrape time.

    A failing callback must not break the whole scrape: it is logged and yields no samples.
    """

    def __init__(self, name: str, doc: str, label: str, known: Iterable[str] = ()) -> None:
        self._name, self._doc, self._label = name, doc, label
        self._known = tuple(known)
        self._source: Callable[[], Mapping[str, int | float]] | None = None

    def set_source(self, source: Callable[[], Mapping[str, int | float]]) -> None:
        self._source = source

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self._name, self._doc, labels=[self._label])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self._name, self._doc, labels=[self._label])
        if self._source is not None:
            try:
                values = dict(self._source())
            except Exception as exc:
                log.warning("metrics callback for %s failed: %s", self._name, exc)
                values = None
            if values is not None:
                for key in self._known:
                    values.setdefault(key, 0)
                for key in sorted(values):
                    family.add_metric([str(key)], float(values[key]))
        yield family


def _safe(fn: Callable[[], float], name: str) -> Callable[[], float]:
    def wrapped() -> float:
        try:
            return float(fn())
        except Exception as exc:
            log.warning("metrics callback for %s failed: %s", name, exc)
            return float("nan")

    return wrapped


class Metrics:
    """Every metric the node exports, in one private registry.

    Hooks (who calls what):

    * C-STORE handler: :meth:`instance_received` after Success is decided.
    * association accept/reject handlers: :meth:`association`; the pre-association gate:
      ``gate_connections.labels(outcome=...).inc()``.
    * pipeline: ``with metrics.time_stage("inference"): ...`` per stage; :attr:`models_loaded`.
    * outbox: ``metrics.dispatch_failures.labels(destination=...).inc()`` per failed attempt.
    * node start-up: :meth:`watch_series_states`, :meth:`watch_outbox_depth`, :meth:`watch_free_disk`.
    """

    def __init__(self, series_states: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.instances_received = Counter(
            "instances_received", "DICOM instances stored and acknowledged with Success.",
            namespace=NAMESPACE, registry=r,
        )
        self.bytes_received = Counter(
            "bytes_received", "Bytes of DICOM instances stored.", namespace=NAMESPACE, registry=r,
        )
        self.associations = Counter(
            "associations", "Association requests by outcome and reason code.",
            ["result", "reason"], namespace=NAMESPACE, registry=r,
        )
        self.gate_connections = Counter(
            "gate_connections", "New connections by what became of them before association (handed_off: a "
            "complete A-ASSOCIATE-RQ got a slot; closed, not_associate_rq, artim_expired, evicted, tls_failed, "
            "*_limit_exceeded, ...).", ["outcome"], namespace=NAMESPACE, registry=r,
        )
        self.stage_seconds = Histogram(
            "stage_seconds", "Duration of one pipeline stage for one series.",
            ["stage"], namespace=NAMESPACE, buckets=STAGE_BUCKETS, registry=r,
        )
        self.dispatch_failures = Counter(
            "dispatch_failures", "Failed send attempts of result objects, by destination.",
            ["destination"], namespace=NAMESPACE, registry=r,
        )
        self.models_loaded = Gauge(
            "models_loaded", "Models loaded and ready for inference.", namespace=NAMESPACE, registry=r,
        )
        self.outbox_depth = Gauge(
            "outbox_depth", "Result objects queued for sending (not yet sent or dead).",
            namespace=NAMESPACE, registry=r,
        )
        self.free_disk_bytes = Gauge(
            "free_disk_bytes", "Free bytes on the file system of node.data_dir.", namespace=NAMESPACE, registry=r,
        )
        self._series_state = _CallbackGauge(
            f"{NAMESPACE}_series_state", "Series in each state of the processing state machine.", "state",
            known=series_states,
        )
        r.register(self._series_state)
        for stage in STAGES:  # export zero-count histograms so dashboards see every stage from the start
            self.stage_seconds.labels(stage=stage)

    # --- hooks -----------------------------------------------------------------------------
    def instance_received(self, n_bytes: int) -> None:
        """One instance stored and acknowledged with Success."""
        self.instances_received.inc()
        self.bytes_received.inc(max(0, n_bytes))

    def association(self, accepted: bool, reason: str = "ok") -> None:
        """Count an association request; ``reason`` is a short code such as ``calling_ae_not_allowed``."""
        self.associations.labels(result="accepted" if accepted else "rejected", reason=label_code(reason)).inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record a stage duration measured elsewhere (e.g. completion = completed_at - first_at)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
        self.stage_seconds.labels(stage=stage).observe(max(0.0, seconds))

    @contextmanager
    def time_stage(self, stage: str) -> Iterator[None]:
        """Time the body as one ``stage`` (recorded also when it raises)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(stage=stage).observe(time.perf_counter() - t0)

    def watch_series_states(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """``counts()`` -> {state: number of series}; called at each scrape."""
        self._series_state.set_source(counts)

    def watch_outbox_depth(self, depth: Callable[[], int]) -> None:
        self.outbox_depth.set_function(_safe(depth, "outbox_depth"))

    def watch_free_disk(self, data_dir: Path) -> None:
        self.free_disk_bytes.set_function(_safe(lambda: free_disk_bytes(data_dir), "free_disk_bytes"))

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


# --- readiness -----------------------------------------------------------------------------------
def _data_dir_writable(data_dir: Path) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".readyz-", delete=True) as fh:
            fh.write(b"ok")
            fh.flush()
        return True
    except OSError as exc:
        log.warning("readiness: data directory %s not writable: %s", data_dir, exc)
        return False


def _call_bool(fn: Callable[[], object], name: str) -> bool:
    try:
        return bool(fn())
    except Exception as exc:
        log.warning("readiness check %s failed: %s", name, exc)
        return False


def readiness_checks(
    data_dir: Path, index_ping: Callable[[], object], models_loaded: Callable[[], object]
) -> ReadinessChecks:
    """The node's standard readiness checks; each callable returns truthy or raises."""

    def checks() -> dict[str, bool]:
        return {
            "models_loaded": _call_bool(models_loaded, "models_loaded"),
            "data_dir_writable": _data_dir_writable(Path(data_dir)),
            "index_reachable": _call_bool(index_ping, "index_reachable"),
        }

    return checks


# --- HTTP server -----------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.server.metrics.render(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/readyz":
            self._readyz()
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _readyz(self) -> None:
        try:
            checks = {k: bool(v) for k, v in self.server.readiness().items()}
        except Exception as exc:
            log.exception("readiness callback failed")
            checks = {"readiness_callback": False}
            failing = [f"readiness_callback: {exc}"]
        else:
            failing = sorted(k for k, ok in checks.items() if not ok)
        body = {"ready": not failing, "failing": failing, "checks": checks}
        self._send(200 if not failing else 503, json.dumps(body).encode() + b"\n", "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        log.debug("%s - %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], metrics: Metrics, readiness: ReadinessChecks) -> None:
        self.metrics = metrics
        self.readiness = readiness
        super().__init__(addr, _Handler)


class MetricsServer:
    """Serves /metrics, /healthz and /readyz from a daemon thread; ``port`` is the bound port."""

    def __init__(
        self,
        metrics: Metrics,
        host: str = "127.0.0.1",
        port: int = 9108,
        readiness: ReadinessChecks | None = None,
        port_file: Path | None = None,
    ) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.port_file = port_file
        self._readiness: ReadinessChecks = readiness or (lambda: {})
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; fits the node's ``Service`` protocol (``node.add_service(server)``)."""
        if self._server is not None:
            raise RuntimeError("metrics server already started")
        self._server = _Server((self.host, self.port), self.metrics, self._readiness)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="metrics-http", daemon=True
        )
        self._thread.start()
        if self.port_file is not None:  # lets tests and scripts find a port chosen with port = 0
            tmp = self.port_file.with_name(self.port_file.name + ".tmp")
            tmp.write_text(f"{self.port}\n", encoding="ascii")
            tmp.replace(self.port_file)
        log.info("metrics and health endpoints on http://%s:%d/ (/metrics /healthz /readyz)", self.host, self.port)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        if self.port_file is not None:
            self.port_file.unlink(missing_ok=True)
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_metrics_server(
    section: MetricsSection, metrics: Metrics, readiness: ReadinessChecks, *, port_file: Path | None = None
) -> MetricsServer | None:
    """Start the server as ``[metrics]`` says; ``None`` when disabled.  Raises OSError if the port is taken."""
    if not section.enabled:
        log.info("metrics and health endpoints disabled ([metrics] enabled = false)")
        return None
    server = MetricsServer(metrics, section.host, section.port, readiness, port_file=port_file)
    server.start()
    return server
