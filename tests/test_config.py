"""Configuration: validation errors name the key and say what to do; defaults; generated reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medclf_node.config import ConfigError, load_config, parse_config
from medclf_node.config_reference import render_reference

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_loopback_and_valid() -> None:
    cfg = parse_config({})
    assert cfg.node.host == "127.0.0.1"
    assert cfg.node.port == 11112
    assert cfg.node.ae_title == "MEDCLF"
    assert cfg.completion.on_release is True
    assert cfg.completion.quiet_seconds == 10
    # no rules configured -> the built-in CT rule routes to the default model
    (rule,) = cfg.effective_rules()
    assert rule.models == [cfg.models.default_model]


def test_issue_example_parses(tmp_path: Path) -> None:
    cfg_file = tmp_path / "node.toml"
    cfg_file.write_text(
        """
[node]
ae_title = "MEDCLF"
host = "127.0.0.1"
port = 11112
data_dir = "var"
[[peers]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
[accept]
calling_ae_titles = ["PACS"]
[completion]
on_release = true
quiet_seconds = 10
[results]
destinations = ["pacs"]
"""
    )
    cfg = load_config(cfg_file)
    assert cfg.node.data_dir == (tmp_path / "var").resolve()
    assert cfg.peer("pacs").port == 4242
    assert cfg.allowed_calling_ae_titles() == {"PACS"}
    assert cfg.peer_by_ae_title("PACS ") is not None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"node": {"aetitle": "X"}}, "node.aetitle: unknown key"),
        ({"node": {"port": 70000}}, "node.port"),
        ({"node": {"ae_title": "A\\B"}}, "node.ae_title"),
        ({"node": {"ae_title": "THIS_IS_WAY_TOO_LONG"}}, "node.ae_title"),
        ({"peers": [{"name": "pacs", "host": "h", "port": 1}]}, "peers[0].ae_title: required key is missing"),
        ({"results": {"destinations": ["nowhere"]}}, "'nowhere' is neither a peer nor a folder"),
        ({"accept": {"calling_ae_titles": ["*", "PACS"]}}, "accept.calling_ae_titles"),
        ({"rules": [{"name": "r", "models": ["m"], "series_description_regex": "("}]}, "not a valid regular"),
        ({"rules": [{"name": "r", "models": ["m"], "slice_thickness_mm": [3, 1]}]}, "slice_thickness_mm"),
        ({"volume": {"uneven_spacing": "guess"}}, "volume.uneven_spacing"),
    ],
)
def test_errors_name_the_key(data: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="node.toml")
    assert expected in str(info.value)
    assert str(info.value).startswith("node.toml: invalid configuration")


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_shipped_configs_are_valid() -> None:
    configs = sorted((ROOT / "deploy").rglob("*.toml"))
    assert configs, "deploy/ ships example configurations"
    for path in configs:
        load_config(path)


def test_config_check_cli_reports_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nae_titel = "X"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "medclf_node.cli", "config-check", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "node.ae_titel: unknown key" in proc.stderr


def test_readme_holds_the_generated_reference() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert render_reference() in readme, "regenerate with: python -m medclf_node.config_reference"
