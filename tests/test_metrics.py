"""Metrics and health endpoints, through the real HTTP server on a free loopback port."""

from __future__ import annotations

import json
import shutil
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from medclf_node.metrics import STAGES, Metrics, MetricsServer, label_code, readiness_checks


def _get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def served() -> Iterator[tuple[Metrics, MetricsServer]]:
    metrics = Metrics(series_states=("received", "complete", "sent"))
    server = MetricsServer(metrics, "127.0.0.1", 0)
    server.start()
    try:
        yield metrics, server
    finally:
        server.stop()


def test_counters_move_and_text_format_parses(served: tuple[Metrics, MetricsServer], tmp_path: Path) -> None:
    metrics, server = served
    assert server.port > 0
    status, ctype, text = _get(server.port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    before = _samples(text)
    assert before[("medclf_instances_received_total", ())] == 0

    for size in (1000, 2000, 500):
        metrics.instance_received(size)
    metrics.association(True)
    metrics.association(False, "Calling AE not allowed")
    metrics.association(False, "calling_ae_not_allowed")
    metrics.dispatch_failures.labels(destination="pacs").inc()
    metrics.models_loaded.set(2)
    with metrics.time_stage("inference"):
        pass
    metrics.observe_stage("completion", 12.5)

    after = _samples(_get(server.port, "/metrics")[2])
    assert after[("medclf_instances_received_total", ())] == 3
    assert after[("medclf_bytes_received_total", ())] == 3500
    assert after[("medclf_associations_total", (("reason", "ok"), ("result", "accepted")))] == 1
    assert after[("medclf_associations_total", (("reason", "calling_ae_not_allowed"), ("result", "rejected")))] == 2
    assert after[("medclf_dispatch_failures_total", (("destination", "pacs"),))] == 1
    assert after[("medclf_models_loaded", ())] == 2
    assert after[("medclf_stage_seconds_count", (("stage", "inference"),))] == 1
    assert after[("medclf_stage_seconds_sum", (("stage", "completion"),))] == 12.5
    # every stage is exported from the start, so dashboards and alerts see all of them
    for stage in STAGES:
        assert ("medclf_stage_seconds_count", (("stage", stage),)) in after


def test_callback_gauges_read_at_scrape_time(served: tuple[Metrics, MetricsServer], tmp_path: Path) -> None:
    metrics, server = served
    counts = {"received": 2, "sent": 5}
    depth = [3]
    metrics.watch_series_states(lambda: counts)
    metrics.watch_outbox_depth(lambda: depth[0])
    metrics.watch_free_disk(tmp_path)

    s1 = _samples(_get(server.port, "/metrics")[2])
    assert s1[("medclf_series_state", (("state", "received"),))] == 2
    assert s1[("medclf_series_state", (("state", "sent"),))] == 5
    assert s1[("medclf_series_state", (("state", "complete"),))] == 0  # known state, absent from counts
    assert s1[("medclf_outbox_depth", ())] == 3
    free = shutil.disk_usage(tmp_path).free
    assert 0 < s1[("medclf_free_disk_bytes", ())] and abs(s1[("medclf_free_disk_bytes", ())] - free) < 0.05 * free

    counts["received"] = 0
    counts["failed"] = 1
    depth[0] = 0
    s2 = _samples(_get(server.port, "/metrics")[2])
    assert s2[("medclf_series_state", (("state", "received"),))] == 0
    assert s2[("medclf_series_state", (("state", "failed"),))] == 1
    assert s2[("medclf_outbox_depth", ())] == 0


def test_failing_callbacks_do_not_break_the_scrape(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served

    def broken() -> dict[str, int]:
        raise sqlite3.OperationalError("database is locked")

    metrics.watch_series_states(broken)
    metrics.watch_outbox_depth(lambda: 1 // 0)
    metrics.instance_received(10)
    status, _, text = _get(server.port, "/metrics")
    assert status == 200
    s = _samples(text)
    assert s[("medclf_instances_received_total", ())] == 1
    assert s[("medclf_outbox_depth", ())] != s[("medclf_outbox_depth", ())]  # NaN: unknown, not 0
    assert not any(name == "medclf_series_state" for name, _ in s)


def test_healthz_and_unknown_path(served: tuple[Metrics, MetricsServer]) -> None:
    _, server = served
    assert _get(server.port, "/healthz")[::2] == (200, "ok\n")
    assert _get(server.port, "/nope")[0] == 404


def test_readyz_flips_with_real_checks(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    conn = sqlite3.connect(data_dir / "index.sqlite", check_same_thread=False)
    loaded = [False]
    checks = readiness_checks(data_dir, lambda: conn.execute("SELECT 1").fetchone(), lambda: loaded[0])
    with MetricsServer(Metrics(), "127.0.0.1", 0, readiness=checks) as server:
        status, ctype, body = _get(server.port, "/readyz")
        assert status == 503 and ctype == "application/json"
        doc = json.loads(body)
        assert doc["ready"] is False and doc["failing"] == ["models_loaded"]
        assert doc["checks"] == {"models_loaded": False, "data_dir_writable": True, "index_reachable": True}

        loaded[0] = True
        status, _, body = _get(server.port, "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
        assert list(data_dir.glob(".readyz-*")) == []  # the probe file is removed again

        conn.close()  # index unreachable: the ping raises
        shutil.rmtree(data_dir)  # data directory gone: not writable (holds even when running as root)
        status, _, body = _get(server.port, "/readyz")
        assert status == 503
        assert json.loads(body)["failing"] == ["data_dir_writable", "index_reachable"]
        assert _get(server.port, "/healthz")[0] == 200  # alive, just not ready


def test_readiness_callback_that_raises_is_not_ready() -> None:
    def broken() -> dict[str, bool]:
        raise RuntimeError("boom")

    with MetricsServer(Metrics(), "127.0.0.1", 0, readiness=broken) as server:
        status, _, body = _get(server.port, "/readyz")
    assert status == 503
    assert json.loads(body)["failing"] == ["readiness_callback: boom"]


def test_stop_releases_the_port_and_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()  # own registries: no "duplicated timeseries" error
    a.instance_received(1)
    assert b"medclf_instances_received_total 0.0" in b.render()
    server = MetricsServer(a, "127.0.0.1", 0)
    server.start()
    port = server.port
    assert _get(port, "/healthz")[0] == 200
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_stage_timing_records_on_error_and_rejects_unknown_stage() -> None:
    m = Metrics()
    with pytest.raises(ZeroDivisionError), m.time_stage("volume"):
        _ = 1 / 0
    assert m.registry.get_sample_value("medclf_stage_seconds_count", {"stage": "volume"}) == 1
    with pytest.raises(ValueError, match="unknown stage"), m.time_stage("volumes"):
        pass
    with pytest.raises(ValueError, match="unknown stage"):
        m.observe_stage("decode", 1.0)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("Calling AE not allowed", "calling_ae_not_allowed"),
        ("  ", "unknown"),
        ("0xA700 disk-full!", "0xa700_disk_full"),
    ],
)
def test_label_code(raw: str, code: str) -> None:
    assert label_code(raw) == code


def test_start_from_config_with_port_file(tmp_path: Path) -> None:
    from medclf_node.config import parse_config
    from medclf_node.metrics import start_metrics_server

    cfg = parse_config({"metrics": {"port": 0}})
    assert (cfg.metrics.enabled, cfg.metrics.host) == (True, "127.0.0.1")  # loopback by default
    assert parse_config({}).metrics.port == 9108
    port_file = tmp_path / "metrics.port"
    server = start_metrics_server(cfg.metrics, Metrics(), lambda: {"ok": True}, port_file=port_file)
    assert server is not None
    try:
        assert int(port_file.read_text()) == server.port
        assert _get(server.port, "/readyz")[0] == 200
    finally:
        server.stop()
    assert not port_file.exists()
    off = parse_config({"metrics": {"enabled": False}}).metrics
    assert start_metrics_server(off, Metrics(), lambda: {}) is None
