"""Retention: free-disk watermark and spool purge on real files."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from stores import open_test_store, walk

from medclf_node.config import parse_config
from medclf_node.retention import MB, DiskWatermark, RetentionPolicy, RetentionService, free_disk_ok, purge_spool
from medclf_node.store import Store

DAY = 86400.0


def test_free_disk_ok_against_the_real_file_system(tmp_path: Path) -> None:
    free_mb = shutil.disk_usage(tmp_path).free // MB
    assert free_disk_ok(tmp_path, 0)
    assert free_disk_ok(tmp_path, 1)
    assert not free_disk_ok(tmp_path, free_mb + 10_000_000)  # more than any disk here has
    assert free_disk_ok(tmp_path / "not" / "yet" / "created", 1)  # measured on the nearest existing parent


def test_watermark_is_cached_per_interval(tmp_path: Path) -> None:
    wm = DiskWatermark(tmp_path, min_free_mb=1, interval_s=10.0)
    assert wm.ok(now=100.0)
    wm.min_free_mb = 10**12  # an impossible watermark
    assert wm.ok(now=105.0)  # still the cached answer
    assert not wm.ok(now=110.0)  # re-checked after the interval
    wm.min_free_mb = 0
    assert wm.ok(now=120.0)


def test_policy_from_config() -> None:
    cfg = parse_config({"retention": {"spool_days": 2, "delete_after_sent": False, "min_free_disk_mb": 0}})
    policy = RetentionPolicy(cfg.retention.spool_days, cfg.retention.delete_after_sent)
    assert policy.min_age_seconds(all_sent=True) == 2 * DAY
    default = parse_config({}).retention
    assert (default.spool_days, default.delete_after_sent, default.min_free_disk_mb) == (7.0, True, 1024)
    assert RetentionPolicy(7, True).min_age_seconds(all_sent=True) == 0
    assert RetentionPolicy(7, True).min_age_seconds(all_sent=False) == 7 * DAY


def _spool_file(root: Path, rel: str, size: int = 100) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x" * size)
    return p


def test_purge_deletes_only_old_files_inside_the_spool(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    root = data_dir / "spool"
    now = 1_000_000.0
    old_a = _spool_file(root, "1.2/1.2.3/1.2.3.1.dcm", 100)
    old_b = _spool_file(root, "1.2/1.2.3/1.2.3.2.dcm", 50)
    fresh = _spool_file(root, "1.2/1.2.4/1.2.4.1.dcm", 70)
    outside = _spool_file(tmp_path, "precious.dcm")
    escape = "spool/../../precious.dcm"  # a relative path climbing out of the spool
    link = root / "1.2/1.2.4/link.dcm"
    os.symlink(outside, link)
    gone = root / "1.2/1.2.9/missing.dcm"

    result = purge_spool(
        [
            (old_a, now - 8 * DAY),
            ("spool/1.2/1.2.3/1.2.3.2.dcm", now - 8 * DAY),  # relative to data_dir, as the index stores them
            (fresh, now - 1 * DAY),
            (outside, now - 30 * DAY),
            (escape, now - 30 * DAY),
            (link, now - 30 * DAY),
            (gone, now - 30 * DAY),
        ],
        root=root,
        base=data_dir,
        older_than_s=7 * DAY,
        now=now,
    )
    assert sorted(p.name for p in result.deleted) == ["1.2.3.1.dcm", "1.2.3.2.dcm"]
    assert result.bytes_freed == 150
    assert result.kept == [fresh]
    assert [p.name for p in result.refused] == ["precious.dcm", "precious.dcm", "link.dcm"]
    assert result.missing == [gone]
    assert sorted(p.name for p in result.removed) == ["1.2.3.1.dcm", "1.2.3.2.dcm", "missing.dcm"]
    assert not old_a.exists() and not old_b.exists()
    assert fresh.exists() and outside.exists() and link.is_symlink()
    assert not (root / "1.2/1.2.3").exists()  # emptied series directory removed
    assert (root / "1.2/1.2.4").is_dir() and root.is_dir()  # non-empty one and the root stay


def test_purge_after_sent_with_zero_age_and_errors_reported(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    f = _spool_file(root, "1/2/3.dcm", 10)
    result = purge_spool([(f, 1000.0)], root=root, older_than_s=0.0, now=1000.0)
    assert result.deleted == [f] and not f.exists()
    assert root.is_dir()
    d = _spool_file(root, "1/2/dir.dcm/inner", 1).parent  # a directory where a file was expected
    result = purge_spool([(d, 0.0)], root=root, older_than_s=0.0, now=1.0)
    assert result.refused == [d] and d.is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_purge_reports_permission_errors(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    f = _spool_file(root, "1/2/3.dcm", 10)
    f.parent.chmod(0o500)
    try:
        result = purge_spool([(f, 0.0)], root=root, older_than_s=0.0, now=1.0)
    finally:
        f.parent.chmod(0o700)
    assert [p for p, _ in result.errors] == [f] and f.exists()


def _spooled_series(tmp_path: Path, name: str, n: int = 3) -> tuple[Store, str, list[Path]]:
    from intake_series import write_ct_series

    from medclf_node.ingest.spool import Spool

    data = tmp_path / "data"
    index = open_test_store(data)
    spool = Spool(data, index, durable=False)
    uid = ""
    for p in write_ct_series(tmp_path / name, n, 16, 16, seed=len(name)):
        uid = spool.store(p.read_bytes(), calling_ae="SCANNER", assoc_id="a").record.series_uid
    return index, uid, index.series_paths(uid)


def test_service_purges_sent_series_at_once_and_others_after_spool_days(tmp_path: Path) -> None:
    index, sent_uid, sent_paths = _spooled_series(tmp_path, "sent")
    _, failed_uid, failed_paths = _spooled_series(tmp_path, "failedseries")
    _, open_uid, open_paths = _spooled_series(tmp_path, "stillreceiving")
    walk(index, sent_uid, "sent")
    walk(index, failed_uid, "failed", "gap", "a gap")
    svc = RetentionService(index, tmp_path / "data", RetentionPolicy(spool_days=1.0, delete_after_sent=True))

    first = svc.run_once()
    assert sorted(first.deleted) == sorted(sent_paths)
    assert not any(p.exists() for p in sent_paths)
    assert all(p.exists() for p in failed_paths + open_paths), "failed: kept for spool_days; open: never"
    assert index.series_paths(sent_uid) == []
    row = index.get_series(sent_uid)
    assert row is not None and row.state == "sent" and row.n_instances == 3, "history stays for `jobs`"

    later = svc.run_once(now=time.time() + 2 * 86400)
    assert sorted(later.deleted) == sorted(failed_paths)
    assert all(p.exists() for p in open_paths)
    assert not (tmp_path / "data" / "spool" / index.get_series(failed_uid).study_uid / failed_uid).exists()  # type: ignore[union-attr]


def test_service_keeps_sent_series_when_configured(tmp_path: Path) -> None:
    index, uid, paths = _spooled_series(tmp_path, "keep")
    walk(index, uid, "sent")
    svc = RetentionService(index, tmp_path / "data", RetentionPolicy(spool_days=7.0, delete_after_sent=False))
    assert svc.run_once().deleted == []
    assert all(p.exists() for p in paths)
