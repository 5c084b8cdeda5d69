"""The running node: wires store, spool, listener, completion tracker, dispatcher and
any further services (the pipeline's worker pool) together, and starts/stops them in order.

Extension point for the pipeline: build the node, then ``node.add_service(obj)`` for any
object with ``start()`` and ``stop()`` before calling :meth:`Node.start`.  Services are
started after the store is ready and the listener is up, and stopped in reverse order
before the listener closes.  ``node.store`` is the shared :class:`~medclf_node.store.Store`; the event
``node.series_completed`` is set whenever a series becomes complete (workers may wait on
it instead of sleeping for their whole poll interval; they must ``clear()`` it).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Protocol

from medclf_node.audit import open_audit_log
from medclf_node.config import Config
from medclf_node.inference.registry import ModelRegistry
from medclf_node.ingest.series import CompletionTracker
from medclf_node.ingest.spool import Spool
from medclf_node.metrics import Metrics, MetricsServer, readiness_checks, start_metrics_server
from medclf_node.net.scp import StoreSCP
from medclf_node.outbox import Dispatcher
from medclf_node.pipeline import Pipeline, WorkerPool
from medclf_node.reporting import warm_up as warm_up_reporting
from medclf_node.retention import DiskWatermark, RetentionPolicy, RetentionService
from medclf_node.store import SERIES_STATES, Store, open_store
from medclf_node.telemetry import Telemetry

log = logging.getLogger(__name__)

PORT_FILENAME = "node.port"
METRICS_PORT_FILENAME = "metrics.port"


class Service(Protocol):
    """Anything the node starts and stops with itself."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Node:
    """One node process.  ``start()`` returns once the listener accepts connections."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.data_dir = Path(cfg.node.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        durable = cfg.node.durable_writes
        self.files_dir = cfg.files_dir()
        self.store: Store = open_store(cfg)
        self.spool = Spool(self.files_dir, self.store, durable=durable, limits=cfg.limits)
        self.series_completed = threading.Event()
        self.telemetry = Telemetry(
            Metrics(series_states=SERIES_STATES),
            open_audit_log(cfg.audit.enabled, cfg.audit_path(), fsync=cfg.audit.fsync),
        )
        self.telemetry.metrics.watch_series_states(self.store.series_counts)
        self.telemetry.metrics.watch_outbox_depth(self.store.outbox_depth)
        self.telemetry.metrics.watch_free_disk(self.data_dir)
        self.tracker = CompletionTracker(self.store, cfg.completion, on_complete=self._series_complete)
        watermark = DiskWatermark(self.data_dir, cfg.retention.min_free_disk_mb)
        self.scp = StoreSCP(cfg, self.spool, self.tracker, telemetry=self.telemetry, watermark=watermark)
        self.dispatcher = Dispatcher(cfg, self.store, telemetry=self.telemetry)
        # Not ready while models load (k8s keeps traffic away); a store-only node needs none.
        self._models_ready = not cfg.pipeline.enabled
        self._health: MetricsServer | None = None
        self._services: list[Service] = [
            RetentionService(self.store, self.files_dir,
                             RetentionPolicy(cfg.retention.spool_days, cfg.retention.delete_after_sent))
        ]
        self._started: list[Service] = []
        self.port: int | None = None

    def start_health(self) -> None:
        """Serve /metrics, /healthz and /readyz (once); before models load, /readyz says not ready."""
        if self._health is not None:
            return
        checks = readiness_checks(self.data_dir, index_ping=self.store.ping, models_loaded=lambda: self._models_ready)
        self._health = start_metrics_server(self.cfg.metrics, self.telemetry.metrics, checks,
                                            port_file=self.data_dir / METRICS_PORT_FILENAME)
        if self._health is not None:
            self._started.append(self._health)

    def attach_models(self, registry: ModelRegistry) -> None:
        """Run the pipeline with these loaded models; the node reports ready from now on."""
        pipeline = Pipeline(self.cfg, self.store, registry, on_queued=self.dispatcher.wake, telemetry=self.telemetry)
        self.add_service(WorkerPool(pipeline, workers=self.cfg.pipeline.workers,
                                    poll_seconds=self.cfg.pipeline.poll_seconds, wake=self.series_completed))
        self.telemetry.metrics.models_loaded.set(len(registry.names()))
        self._models_ready = len(registry.names()) > 0

    def _series_complete(self, series_uid: str) -> None:
        """Wake the workers; record the completion (how, after how long) in metrics and audit."""
        self.series_completed.set()
        row = self.store.get_series(series_uid)
        if row is None:
            return
        with self.telemetry.guard("completion"):
            if row.completed_at is not None:
                self.telemetry.metrics.observe_stage("completion", row.completed_at - row.first_at)
            self.telemetry.audit.series("completed", series_uid=series_uid, study_uid=row.study_uid,
                                        n_instances=row.n_instances, completion=row.completion,
                                        generation=row.generation)

    def add_service(self, service: Service) -> None:
        """Register a service (e.g. the pipeline worker pool) to run with the node."""
        self._services.append(service)

    def start(self) -> int:
        """Recover from any crash, start everything; returns the listening port."""
        # a shared spool: another node's files being written now are young; only old leftovers go
        shared = self.files_dir != self.data_dir
        self.spool.remove_leftover_tmp_files(min_age_seconds=3600.0 if shared else 0.0)
        self.store.reset_processing_on_startup()
        self.tracker.start()
        self._started.append(self.tracker)
        self.port = self.scp.start()
        self.dispatcher.start()
        self._started.append(self.dispatcher)
        self.start_health()
        for svc in self._services:
            svc.start()
            self._started.append(svc)
        self._write_port_file(self.port)
        log.info("listening on %s:%d as %s", self.cfg.node.host, self.port, self.cfg.node.ae_title)
        for dest in self.cfg.results.destinations:
            folder = self.cfg.folder(dest)
            log.info("results to %s", f"folder {folder.path} ({dest})" if folder is not None else dest)
        return self.port

    def _write_port_file(self, port: int) -> None:
        """``data_dir/node.port`` tells scripts and tests which port was picked (port 0)."""
        path = self.data_dir / PORT_FILENAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{port}\n", encoding="ascii")
        os.replace(tmp, path)

    def stop(self) -> None:
        """Stop accepting, stop services in reverse order, close the store."""
        log.info("stopping")
        self.scp.stop()
        while self._started:
            svc = self._started.pop()
            try:
                svc.stop()
            except Exception:
                log.exception("error stopping %s", type(svc).__name__)
        try:
            (self.data_dir / PORT_FILENAME).unlink(missing_ok=True)
        except OSError:
            pass
        self.store.close()
        self.telemetry.audit.close()
        log.info("stopped")


def build_node(cfg: Config) -> Node:
    """The node ``medclf-node serve`` runs: intake + dispatch, plus the pipeline when enabled.

    Models are loaded (sha256-verified, warmed up) before the listener opens, so a bad model
    stops start-up with a :class:`~medclf_node.inference.registry.ModelLoadError`.
    """
    node = Node(cfg)
    if not cfg.pipeline.enabled:
        log.warning("pipeline disabled: completed series are stored and wait in state 'complete'")
        return node
    try:
        node.start_health()  # /healthz answers and /readyz says "not ready" while models load
        registry = ModelRegistry.from_config(cfg)
        warm_up_reporting()
    except BaseException:
        node.stop()
        raise
    node.attach_models(registry)
    return node
