"""The durable spool: UID validation, atomic idempotent writes, DICOM status mapping, crash leftovers."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from intake_series import write_ct_series
from pydicom import dcmread
from stores import open_test_store

from medclf_node.ingest.spool import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    Spool,
    StoreError,
    is_valid_uid,
    parse_header,
)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    idx = open_test_store(tmp_path / "data")
    yield Spool(tmp_path / "data", idx)
    idx.close()


@pytest.fixture(scope="module")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("small"), 3, 16, 16, seed=2)


def with_uid(path: Path, **uids: str) -> bytes:
    ds = dcmread(path)
    for k, v in uids.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    "uid,ok",
    [("1.2.840.10008.1.2", True), ("0.1", True), ("1.02", False), ("1..2", False), ("1.2.", False),
     ("../../etc", False), ("1/2", False), ("", False), ("1.2.3\n", False), ("1." + "1" * 62, True),
     ("1." + "1" * 63, False)],
)
def test_uid_grammar(uid: str, ok: bool) -> None:
    assert is_valid_uid(uid) is ok


@given(st.text(max_size=80))
def test_valid_uids_are_safe_path_components(text: str) -> None:
    if is_valid_uid(text):
        assert "/" not in text and ".." not in text and text not in (".", "") and len(text) <= 64


def test_store_writes_exact_bytes_and_indexes(spool: Spool, small_series: list[Path]) -> None:
    data = small_series[0].read_bytes()
    stored = spool.store(data, calling_ae="SCANNER", assoc_id="a1")
    target = spool.data_dir / stored.record.path
    assert target.read_bytes() == data
    assert spool.db.has_instance(stored.record.sop_instance_uid)
    # re-send: same single row, file replaced atomically, no temporary files left
    again = spool.store(data, calling_ae="SCANNER", assoc_id="a2")
    assert again.outcome.replaced
    assert spool.db.instance_paths() == [stored.record.path]
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_uid_reused_in_another_series_keeps_one_file(spool: Spool, small_series: list[Path]) -> None:
    first = spool.store(small_series[0].read_bytes(), calling_ae="X", assoc_id="a")
    moved = spool.store(with_uid(small_series[0], SeriesInstanceUID="1.2.3.4"), calling_ae="X", assoc_id="b")
    assert moved.outcome.previous_path == first.record.path
    assert not (spool.data_dir / first.record.path).exists()
    assert (spool.data_dir / moved.record.path).is_file()
    assert spool.db.instance_paths() == [moved.record.path]
    assert [(s.series_uid, s.n_instances) for s in spool.db.list_series()] in (
        [("1.2.3.4", 1), (first.record.series_uid, 0)], [(first.record.series_uid, 0), ("1.2.3.4", 1)]
    )


def test_unparsable_gives_c210(spool: Spool) -> None:
    with pytest.raises(StoreError) as err:
        spool.store(b"\x00" * 128 + b"DICM" + b"garbage" * 10, calling_ae="X", assoc_id="a")
    assert err.value.status == STATUS_CANNOT_UNDERSTAND


def test_hostile_uid_never_becomes_a_path(spool: Spool, small_series: list[Path]) -> None:
    data = with_uid(small_series[0], SeriesInstanceUID="../../../../tmp/evil")
    with pytest.raises(StoreError) as err:
        spool.store(data, calling_ae="X", assoc_id="a")
    assert err.value.status == STATUS_CANNOT_UNDERSTAND
    assert not spool.root.exists() or not any(spool.root.rglob("*"))


def test_missing_uid_gives_c210(small_series: list[Path]) -> None:
    ds = dcmread(small_series[0])
    del ds.StudyInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(StoreError) as err:
        parse_header(buf.getvalue())
    assert err.value.status == STATUS_CANNOT_UNDERSTAND


def test_os_error_gives_a700_and_leaves_nothing(spool: Spool, small_series: list[Path]) -> None:
    spool.root.parent.mkdir(parents=True, exist_ok=True)
    spool.root.write_bytes(b"a file where the spool directory should be")
    with pytest.raises(StoreError) as err:
        spool.store(small_series[0].read_bytes(), calling_ae="X", assoc_id="a")
    assert err.value.status == STATUS_OUT_OF_RESOURCES
    assert spool.db.instance_paths() == []


def test_leftover_tmp_files_are_removed(spool: Spool, small_series: list[Path]) -> None:
    stored = spool.store(small_series[0].read_bytes(), calling_ae="X", assoc_id="a")
    d = (spool.data_dir / stored.record.path).parent
    (d / ".1.2.3.dcm.tmp-deadbeef").write_bytes(b"half")
    assert spool.remove_leftover_tmp_files() == 1
    assert [p.name for p in d.iterdir()] == [Path(stored.record.path).name]
