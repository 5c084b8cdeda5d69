"""deploy/: files parse, and ports, paths and AE titles agree across the files that must agree."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from medclf_node.config import Config, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _k8s(kind: str) -> dict[str, Any]:
    found = [d for f in sorted(K8S.glob("*.yaml")) for d in _yaml_docs(f) if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def _toml_config(text: str) -> Config:
    return parse_config(tomllib.loads(text), source="embedded")


def test_every_yaml_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 6
    for f in files:
        assert _yaml_docs(f), f"{f} is empty"


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.toml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_toml_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.node.port > 0 and cfg.metrics.port > 0


def test_k8s_manifests_agree_with_the_configmap() -> None:
    cm, dep, svc, pvc = _k8s("ConfigMap"), _k8s("Deployment"), _k8s("Service"), _k8s("PersistentVolumeClaim")
    cfg = _toml_config(cm["data"]["node.toml"])
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"dicom": cfg.node.port, "metrics": cfg.metrics.port}
    # a pod's probes and Service reach the process only if it listens beyond loopback
    assert cfg.node.host == "0.0.0.0" and cfg.metrics.host == "0.0.0.0"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert {p["targetPort"]: p["port"] for p in svc["spec"]["ports"]} == {
        "dicom": cfg.node.port, "metrics": cfg.metrics.port,
    }
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"  # one SQLite writer

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    config_arg = container["args"][container["args"].index("--config") + 1]
    assert config_arg == f"{mounts['config']}/node.toml"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert Path(mounts["data"]) == cfg.node.data_dir
    assert cfg.audit_path().is_relative_to(mounts["data"])  # audit trail lands on the persistent volume
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_compose_agrees_with_its_configs() -> None:
    compose = _yaml_docs(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    assert set(services) >= {"orthanc", "node", "prometheus"}
    node = services["node"]
    context = (DEPLOY / node["build"]["context"]).resolve()
    assert context == ROOT and (context / node["build"]["dockerfile"]).is_file()

    mounts = dict(v.split(":")[:2] for v in node["volumes"])
    config_in_container = node["command"][node["command"].index("--config") + 1]
    host_config = next(src for src, dst in mounts.items() if dst == config_in_container)
    cfg = load_config(DEPLOY / host_config)
    assert mounts["node-data"] == str(cfg.node.data_dir)
    published = {int(p.rsplit(":", 1)[1]) for p in node["ports"]}
    assert published == {cfg.node.port, cfg.metrics.port}
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))

    # Orthanc <-> node pairing
    orthanc = services["orthanc"]
    o_mounts = dict(v.split(":")[:2] for v in orthanc["volumes"])
    o_conf_src = next(src for src, dst in o_mounts.items() if dst.endswith("orthanc.json"))
    o_conf = json.loads((DEPLOY / o_conf_src).read_text())
    pacs = cfg.peer(cfg.results.destinations[0])
    assert (pacs.host, pacs.port, pacs.ae_title) == ("orthanc", o_conf["DicomPort"], o_conf["DicomAet"])
    (modality,) = o_conf["DicomModalities"].values()
    assert (modality["Host"], modality["Port"], modality["AET"]) == ("node", cfg.node.port, cfg.node.ae_title)
    assert cfg.allowed_calling_ae_titles() == {o_conf["DicomAet"]}

    # Prometheus scrapes the node's metrics port
    p_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    prom_src = next(src for src, dst in p_mounts.items() if dst.endswith("prometheus.yml"))
    prom = _yaml_docs(DEPLOY / prom_src)[0]
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"node:{cfg.metrics.port}" in targets


def _dockerfile(name: str) -> tuple[str, list[list[str]]]:
    text = (DEPLOY / name).read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", text)
    instrs = [ln.split() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return joined, instrs


@pytest.mark.parametrize("name", ["Dockerfile.node", "Dockerfile.train"])
def test_dockerfile_sources_exist_and_user_is_not_root(name: str) -> None:
    _, instrs = _dockerfile(name)
    copies = [i[1:] for i in instrs if i[0] == "COPY"]
    assert copies
    for args in copies:
        for src in [a for a in args[:-1] if not a.startswith("--")]:
            assert (ROOT / src).exists(), f"{name}: COPY source {src} does not exist in the repository"
    users = [i[1] for i in instrs if i[0] == "USER"]
    assert users and not users[-1].startswith(("root", "0"))
    assert instrs[0][0] == "FROM" and instrs[0][1].startswith("python:3.11-slim")


def test_node_image_has_no_tensorflow_and_matches_its_config() -> None:
    joined, instrs = _dockerfile("Dockerfile.node")
    pip = [" ".join(i) for i in instrs if i[0] == "RUN" and "pip install" in " ".join(i)]
    assert pip and all("[" not in line for line in pip)  # no extras: LiteRT only
    assert not any(i[0] == "COPY" and "training" in i[1:-1] for i in instrs)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(d.lower().startswith(("tensorflow", "tf-keras")) for d in deps)

    copy_cfg = next(i for i in instrs if i[0] == "COPY" and i[1].startswith("deploy/configs/"))
    cfg = load_config(ROOT / copy_cfg[1])
    cmd = next(i for i in instrs if i[0] == "CMD")
    assert copy_cfg[2] in " ".join(cmd)
    exposed = {int(p) for i in instrs if i[0] == "EXPOSE" for p in i[1:]}
    assert exposed == {cfg.node.port, cfg.metrics.port}
    assert f"127.0.0.1:{cfg.metrics.port}/healthz" in joined
    assert cfg.metrics.host == "0.0.0.0"
    copy_models = next(i for i in instrs if i[0] == "COPY" and i[1] == "models")
    assert Path(copy_models[2]) == cfg.models.directory
    assert "VOLUME" in {i[0] for i in instrs} and str(cfg.node.data_dir) in joined

    train_joined, train_instrs = _dockerfile("Dockerfile.train")
    assert '".[train]"' in train_joined


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / "medclf-node.service", encoding="utf-8")
    return parser


def test_systemd_unit_keys() -> None:
    unit = _unit()
    svc = unit["Service"]
    assert svc["Type"] == "simple" and svc["User"] == "medclf"
    exec_start = svc["ExecStart"].split()
    assert exec_start[0].startswith("/") and exec_start[1:3] == ["serve", "--config"]
    cfg = load_config(DEPLOY / "configs" / "container.toml")  # the /var/lib/medclf layout
    assert svc["WorkingDirectory"] == str(cfg.node.data_dir)
    assert f"/var/lib/{svc['StateDirectory']}" == str(cfg.node.data_dir)
    assert svc["ReadWritePaths"] == str(cfg.node.data_dir)
    for key, value in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "Restart": "on-failure",
    }.items():
        assert svc[key] == value, key
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"]


def test_logrotate_rotates_the_audit_log_of_the_standard_layout() -> None:
    text = (DEPLOY / "logrotate" / "medclf-node").read_text()
    cfg = load_config(DEPLOY / "configs" / "container.toml")
    assert f"{cfg.audit_path()} {{" in text and "copytruncate" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """Verify the unit as shipped except ExecStart, pointed at this checkout's real entry point."""
    entry = ROOT / ".venv" / "bin" / "medclf-node"
    if not entry.exists():
        entry = Path(shutil.which("medclf-node") or "/bin/true")
    text = (DEPLOY / "systemd" / "medclf-node.service").read_text()
    shipped = _unit()["Service"]["ExecStart"].split()[0]
    unit = tmp_path / "medclf-node.service"
    unit.write_text(text.replace(shipped, str(entry)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Unknown" not in output and "ignoring" not in output, output
