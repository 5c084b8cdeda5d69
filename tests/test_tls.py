"""DICOM TLS: DCMTK echoscu/storescu (+tls) and the node's own SCU against a TLS listener.

Certificates are made per test session with the openssl CLI: a CA, a server certificate for
127.0.0.1, a client certificate from the CA and one from a rogue CA.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import NODE_AE, SENDER_AE, RunningNode, dcmtk_env, needs_dcmtk, write_config
from intake_series import write_ct_series
from test_faults_common import dcmtk_tls_capable, index_state, record

from medclf_node.config import TlsSection
from medclf_node.net.scu import Peer, SendError, echo, send_files
from medclf_node.net.tls import client_context

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
needs_dcmtk_tls = pytest.mark.skipif(not dcmtk_tls_capable(), reason="this DCMTK build has no TLS")


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN={name}", cwd=d)


def _leaf(d: Path, name: str, ca: str, san: str | None) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", str(ext), cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogueca")
    _leaf(d, "server", "ca", "IP:127.0.0.1")
    _leaf(d, "client", "ca", None)
    _leaf(d, "rogue", "rogueca", None)
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
               d / "rogue.pem", d / "rogue.key")


def _tls_node(node_factory: Callable[..., RunningNode], pki: Pki, *, mutual: bool = True) -> RunningNode:
    return node_factory(tls={"enabled": True, "cert": str(pki.server_cert), "key": str(pki.server_key),
                             "ca": str(pki.ca), "require_client_cert": mutual})


def _dcmtk(tool: str, port: int, tls: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [tool, "-aet", SENDER_AE, "-aec", NODE_AE, *tls, "127.0.0.1", str(port), *extra]
    return subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=60)


def _with_cert(pki: Pki, cert: Path | None = None, key: Path | None = None) -> list[str]:
    return ["+tls", str(key or pki.client_key), str(cert or pki.client_cert), "+cf", str(pki.ca)]


def _client_ctx(pki: Pki, *, ca: Path | None = None, cert: bool = True) -> Peer:
    tls = TlsSection(cert=pki.client_cert if cert else None, key=pki.client_key if cert else None, ca=ca or pki.ca)
    return Peer(NODE_AE, "127.0.0.1", 0, tls=client_context(tls))


@needs_dcmtk
@needs_dcmtk_tls
def test_dcmtk_echo_and_store_over_mutual_tls(
    node_factory: Callable[..., RunningNode], pki: Pki, tmp_path: Path
) -> None:
    node = _tls_node(node_factory, pki)
    proc = _dcmtk("echoscu", node.port, _with_cert(pki))
    assert proc.returncode == 0, proc.stderr
    paths = write_ct_series(tmp_path / "s", 5, 64, 64, seed=1)
    proc = _dcmtk("storescu", node.port, _with_cert(pki), *map(str, paths))
    assert proc.returncode == 0, proc.stderr
    lost = 5 - len(index_state(node.data_dir).instances)
    assert lost == 0
    refused = 0
    for tls in (["+tla", "+cf", str(pki.ca)],  # no client certificate
                _with_cert(pki, pki.rogue_cert, pki.rogue_key),  # certificate from another CA
                []):  # plain TCP
        t0 = time.monotonic()
        proc = _dcmtk("echoscu", node.port, tls)
        assert proc.returncode != 0, f"{tls}: must be refused"
        assert time.monotonic() - t0 < 20
        refused += 1
        assert _dcmtk("echoscu", node.port, _with_cert(pki)).returncode == 0, "the node keeps serving"
    assert "TLS handshake" in node.log()
    record("TLS (DCMTK)", "echoscu/storescu +tls with a client certificate; refused: no client certificate, "
           "rogue CA, plain TCP", rounds=1, instances=5, losses=lost, refused_clients=refused)


@needs_dcmtk
@needs_dcmtk_tls
def test_dcmtk_server_verification_fails_against_an_untrusted_node(
    node_factory: Callable[..., RunningNode], pki: Pki
) -> None:
    node = _tls_node(node_factory, pki, mutual=False)
    rogue_trust = ["+tla", "+cf", str(pki.rogue_cert)]  # trusts only the rogue chain
    assert _dcmtk("echoscu", node.port, rogue_trust).returncode != 0
    assert _dcmtk("echoscu", node.port, ["+tla", "+cf", str(pki.ca)]).returncode == 0, "anonymous client allowed"


def test_node_scu_over_tls_and_silent_clients_do_not_block(
    node_factory: Callable[..., RunningNode], pki: Pki, tmp_path: Path
) -> None:
    node = _tls_node(node_factory, pki)
    peer = _client_ctx(pki)
    peer = Peer(peer.ae_title, peer.host, node.port, tls=peer.tls)
    # connections that never start the handshake must not hold up the acceptor
    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
    try:
        t0 = time.monotonic()
        assert echo(peer, local_ae=SENDER_AE, timeout=10) == 0
        assert time.monotonic() - t0 < 5
        paths = write_ct_series(tmp_path / "own", 4, 64, 64, seed=2)
        assert [r.status for r in send_files(peer, paths, local_ae=SENDER_AE, timeout=10)] == [0] * 4
    finally:
        for s in silent:
            s.close()
    wrong_ca = _client_ctx(pki, ca=pki.rogue_cert)
    with pytest.raises(SendError):
        echo(Peer(NODE_AE, "127.0.0.1", node.port, tls=wrong_ca.tls), local_ae=SENDER_AE, timeout=10)
    no_cert = _client_ctx(pki, cert=False)
    with pytest.raises(SendError):
        echo(Peer(NODE_AE, "127.0.0.1", node.port, tls=no_cert.tls), local_ae=SENDER_AE, timeout=10)
    plain = Peer(NODE_AE, "127.0.0.1", node.port)
    with pytest.raises(SendError):
        echo(plain, local_ae=SENDER_AE, timeout=10)
    assert echo(peer, local_ae=SENDER_AE, timeout=10) == 0
    lost = 4 - len(index_state(node.data_dir).instances)
    assert lost == 0
    record("TLS (node SCU)", "node's own SCU with mutual TLS; 3 silent TCP clients held open; refused: wrong CA, "
           "no client certificate, plain TCP", rounds=1, instances=4, losses=lost, refused_clients=3)


def test_cli_echo_to_a_tls_peer(node_factory: Callable[..., RunningNode], pki: Pki, tmp_path: Path) -> None:
    """`medclf-node echo` uses TLS for a peer with tls = true (client certificate from [tls])."""
    node = _tls_node(node_factory, pki)
    sections = {
        "node": {"ae_title": SENDER_AE, "data_dir": str(tmp_path / "cli")},
        "peers": [{"name": "secure", "ae_title": NODE_AE, "host": "127.0.0.1", "port": node.port, "tls": True},
                  {"name": "plain", "ae_title": NODE_AE, "host": "127.0.0.1", "port": node.port}],
        "tls": {"cert": str(pki.client_cert), "key": str(pki.client_key), "ca": str(pki.ca)},
    }
    cfg = write_config(tmp_path / "cli.toml", sections)
    run = [sys.executable, "-m", "medclf_node.cli", "echo", "--config", str(cfg)]
    ok = subprocess.run([*run, "secure"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    plain = subprocess.run([*run, "plain"], capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0


def test_silent_and_stalled_tls_clients_take_no_thread_and_end_at_artim(
    node_factory: Callable[..., RunningNode], pki: Pki
) -> None:
    """The gate runs the TLS handshake without a thread: a client that never says hello, or stops in the
    middle of the handshake, costs nothing and is closed after limits.artim_timeout_seconds."""
    node = node_factory(tls={"enabled": True, "cert": str(pki.server_cert), "key": str(pki.server_key),
                             "ca": str(pki.ca), "require_client_cert": True},
                        limits={"artim_timeout_seconds": 1.5})
    time.sleep(0.5)
    status = Path(f"/proc/{node.proc.pid}/status")
    threads = lambda: int(next(ln.split()[1] for ln in status.read_text().splitlines()  # noqa: E731
                               if ln.startswith("Threads:")))
    before = threads()
    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(30)]
    stalled = socket.create_connection(("127.0.0.1", node.port))
    stalled.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the first bytes of a ClientHello
    try:
        time.sleep(0.3)
        assert threads() <= before + 1
        peer = _client_ctx(pki)
        assert echo(Peer(peer.ae_title, peer.host, node.port, tls=peer.tls), local_ae=SENDER_AE, timeout=10) == 0
        t0 = time.monotonic()
        for s in [*silent, stalled]:
            s.settimeout(5)
            try:
                assert s.recv(4096) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - t0 < 4
    finally:
        for s in [*silent, stalled]:
            s.close()
