"""Readiness follows model loading: /healthz answers at once, /readyz only once models are in."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from fixtures_models import tiny_models_dir  # noqa: F401  (fixture)

from medclf_node.config import parse_config
from medclf_node.inference.registry import ModelRegistry
from medclf_node.node import METRICS_PORT_FILENAME, Node


def _get(port: int, path: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=10) as rsp:
            return rsp.status, rsp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_not_ready_until_models_are_attached(tmp_path: Path, tiny_models_dir: Path) -> None:  # noqa: F811
    cfg = parse_config({
        "node": {"port": 0, "data_dir": str(tmp_path / "data")},
        "models": {"directory": str(tiny_models_dir)},
        "rules": [{"name": "ct", "models": ["test-2p5d-int8"]}],
        "metrics": {"port": 0},
    })
    node = Node(cfg)
    try:
        node.start_health()
        port = int((tmp_path / "data" / METRICS_PORT_FILENAME).read_text())
        assert _get(port, "/healthz")[0] == 200
        status, body = _get(port, "/readyz")
        assert status == 503
        assert json.loads(body)["failing"] == ["models_loaded"]

        node.attach_models(ModelRegistry.from_config(cfg))
        assert _get(port, "/readyz")[0] == 200
        metrics = _get(port, "/metrics")[1].decode()
        assert "medclf_models_loaded 1.0" in metrics
    finally:
        node.stop()


def test_store_only_node_is_ready_without_models(tmp_path: Path) -> None:
    cfg = parse_config({
        "node": {"port": 0, "data_dir": str(tmp_path / "data")},
        "pipeline": {"enabled": False},
        "metrics": {"port": 0},
    })
    node = Node(cfg)
    try:
        node.start_health()
        port = int((tmp_path / "data" / METRICS_PORT_FILENAME).read_text())
        assert _get(port, "/readyz")[0] == 200
    finally:
        node.stop()
