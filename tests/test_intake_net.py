"""Intake through the network with real peers: DCMTK echoscu/storescu against `medclf-node serve`."""

from __future__ import annotations

import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    NODE_AE,
    SENDER_AE,
    RunningNode,
    echoscu,
    needs_dcmtk,
    start_node,
    storescu,
)
from intake_series import write_ct_series
from stores import query


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the File Meta group (the part a peer actually sends)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    assert data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) group length, explicit VR LE
    group_len = struct.unpack("<I", data[140:144])[0]
    return data[144 + group_len:]


def index_rows(data_dir: Path, sql: str) -> list[tuple[object, ...]]:
    return query(data_dir, sql)


def tmp_leftovers(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "spool").rglob("*") if p.is_file() and ".tmp-" in p.name]


@needs_dcmtk
def test_echo_and_unknown_calling_ae_rejected(node_factory) -> None:  # type: ignore[no-untyped-def]
    node: RunningNode = node_factory()
    ok = echoscu(node.port)
    assert ok.returncode == 0, ok.stderr
    bad = echoscu(node.port, calling="INTRUDER")
    assert bad.returncode != 0
    assert "Calling AE Title Not Recognized" in bad.stderr + bad.stdout
    wrong_called = echoscu(node.port, called="NOTME")
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stderr + wrong_called.stdout
    assert "calling AE title 'INTRUDER' is not allowed" in node.log()
    # the node keeps serving after rejections
    assert echoscu(node.port).returncode == 0
    assert f"listening on 127.0.0.1:{node.port} as {NODE_AE}" in node.log()
    assert node.stop() == 0  # SIGTERM: clean shutdown
    assert "stopped" in node.log()
    assert not (node.data_dir / "node.port").exists()


@pytest.mark.slow
@needs_dcmtk
def test_300_slice_series_arrives_byte_identical(node_factory, ct_series_300: list[Path]) -> None:  # type: ignore[no-untyped-def]
    node: RunningNode = node_factory()
    res = storescu(node.port, ct_series_300[0].parent)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = index_rows(
        node.data_dir, "SELECT sop_instance_uid, path, size, calling_ae, series_uid, study_uid FROM instances"
    )
    assert len(rows) == 300
    by_uid = {r[0]: r for r in rows}
    from pydicom import dcmread

    for src in ct_series_300:
        ds = dcmread(src, stop_before_pixels=True)
        sop, path, size, calling, series, study = by_uid[ds.SOPInstanceUID]
        stored = node.data_dir / str(path)
        assert stored == node.data_dir / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{sop}.dcm"
        assert stored.stat().st_size == size
        assert dataset_bytes(stored) == dataset_bytes(src)  # pixel data and all elements
        assert calling == SENDER_AE and series == ds.SeriesInstanceUID and study == ds.StudyInstanceUID
    assert wait_rows(node.data_dir, "SELECT state, n_instances, completion FROM series",
                     [("complete", 300, "release")]) == [("complete", 300, "release")]
    assert tmp_leftovers(node.data_dir) == []


@needs_dcmtk
def test_resend_is_idempotent(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = write_ct_series(tmp_path / "s", 3, 32, 32, seed=3)
    node: RunningNode = node_factory()
    for _ in range(2):
        assert storescu(node.port, files).returncode == 0
    assert index_rows(node.data_dir, "SELECT COUNT(*) FROM instances") == [(3,)]
    assert len(list((node.data_dir / "spool").rglob("*.dcm"))) == 3
    assert index_rows(node.data_dir, "SELECT n_instances FROM series") == [(3,)]


Rows = list[tuple[object, ...]]


def wait_rows(data_dir: Path, query: str, expected: Rows, timeout: float = 10.0) -> Rows:
    """The query's rows (sorted) once they equal ``expected``, or whatever they are at the timeout:
    completion on release is recorded just after the sender has seen its A-RELEASE-RP."""
    deadline = time.monotonic() + timeout
    while (rows := sorted(index_rows(data_dir, query))) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return rows


@needs_dcmtk
def test_concurrent_senders(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    series = [write_ct_series(tmp_path / f"s{i}", 20, 64, 64, seed=10 + i) for i in range(4)]
    node: RunningNode = node_factory()
    results: list[subprocess.CompletedProcess[str]] = []
    lock = threading.Lock()

    def send(files: list[Path]) -> None:
        r = storescu(node.port, files)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=send, args=(s,)) for s in series]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr[-500:] for r in results]
    assert index_rows(node.data_dir, "SELECT COUNT(*) FROM instances") == [(80,)]
    expected = [("complete", 20, "release")] * 4
    assert wait_rows(node.data_dir, "SELECT state, n_instances, completion FROM series", expected) == expected


@needs_dcmtk
def test_unwritable_spool_gives_a700_and_node_keeps_serving(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The spool path cannot be created (a plain file is in the way): works even as root."""
    files = write_ct_series(tmp_path / "s", 2, 32, 32, seed=4)
    node: RunningNode = node_factory()
    (node.data_dir / "spool").write_bytes(b"not a directory")
    res = storescu(node.port, files)
    out = res.stdout + res.stderr
    assert "Refused: OutOfResources" in out, out[-2000:]
    assert index_rows(node.data_dir, "SELECT COUNT(*) FROM instances") == [(0,)]
    assert echoscu(node.port).returncode == 0
    (node.data_dir / "spool").unlink()
    assert storescu(node.port, files).returncode == 0
    assert index_rows(node.data_dir, "SELECT COUNT(*) FROM instances") == [(2,)]


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@needs_dcmtk
def test_full_and_read_only_filesystem_give_a700(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Real filesystems (tmpfs, needs mount rights): a full one, then a read-only one."""
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "size=3m"):
        pytest.skip("cannot mount a tmpfs here (not root / no CAP_SYS_ADMIN)")
    try:
        node: RunningNode = node_factory(data_dir=mnt / "data")
        files = write_ct_series(tmp_path / "big", 12, 512, 512, seed=5)  # 12 x 512 KiB > 3 MiB
        res = storescu(node.port, files)
        out = (res.stdout + res.stderr).lower()
        assert "refused: outofresources" in out, out[-2000:]
        assert echoscu(node.port).returncode == 0
        stored = index_rows(node.data_dir, "SELECT COUNT(*) FROM instances")[0][0]
        assert 0 < int(str(stored)) < 12
        assert tmp_leftovers(node.data_dir) == []
        # read-only: the study directory is a read-only filesystem (EROFS)
        ro = node.data_dir / "spool" / "1.2.3.999"
        assert _mount_tmpfs(ro, "size=1m,ro")
        small = write_ct_series(tmp_path / "small", 1, 16, 16, seed=6, study_uid="1.2.3.999")
        res = storescu(node.port, small)
        assert "Refused: OutOfResources" in res.stdout + res.stderr
        assert "Read-only file system" in node.log()
        assert echoscu(node.port).returncode == 0
        node.stop()
    finally:
        _umount(mnt / "data" / "spool" / "1.2.3.999")
        _umount(mnt)


@pytest.mark.slow
def test_kill9_mid_transfer_then_restart(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Every instance acknowledged with 0x0000 before SIGKILL is on disk and indexed after restart."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    files = write_ct_series(tmp_path / "s", 60, 256, 256, seed=7)
    node: RunningNode = node_factory()
    acked: list[str] = []
    ae = AE(ae_title=SENDER_AE)
    ae.dimse_timeout = ae.network_timeout = 3  # a dead peer must not stall the test
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    from pydicom import dcmread

    uids = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    killer = None
    for i, (f, uid) in enumerate(zip(files, uids, strict=True)):
        if i == 25:
            # kill while the next C-STORE is on the wire
            killer = threading.Timer(0.002, node.kill9)
            killer.start()
        rsp = assoc.send_c_store(f)
        if rsp is not None and rsp.get("Status") == 0x0000:
            acked.append(uid)
        if not assoc.is_established:
            break
    if killer is not None:
        killer.join()
    assoc.abort()
    node.kill9()
    assert 20 <= len(acked) < 60
    restarted = start_node(node.config, node.data_dir, tmp_path / "restart.log")
    try:
        indexed = {str(r[0]) for r in index_rows(node.data_dir, "SELECT sop_instance_uid FROM instances")}
        assert set(acked) <= indexed
        for uid in acked:
            (path,) = index_rows(node.data_dir, f"SELECT path FROM instances WHERE sop_instance_uid='{uid}'")[0]
            src = files[uids.index(uid)]
            assert dataset_bytes(node.data_dir / str(path)) == dataset_bytes(src)
        assert tmp_leftovers(node.data_dir) == []
        # every visible .dcm file is complete (parses) - nothing half-written
        for p in (node.data_dir / "spool").rglob("*.dcm"):
            assert dataset_bytes(p) == dataset_bytes(files[uids.index(p.stem)])
    finally:
        restarted.stop()
