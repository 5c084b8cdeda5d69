"""Deterministic result UIDs: same inputs give the same UID, every UID is valid DICOM."""

from __future__ import annotations

import pydicom.uid
from hypothesis import given, settings
from hypothesis import strategies as st

from medclf_node.reporting.uids import derive_uid, device_uid, is_valid_uid, result_uids

SRC = "1.2.826.0.1.3680043.8.498.1234567890"


def test_derive_uid_is_deterministic_and_valid() -> None:
    a = derive_uid(SRC, "nodule", "1.0.0", "sr")
    assert a == derive_uid(SRC, "nodule", "1.0.0", "sr")
    assert a.startswith("2.25.")
    assert is_valid_uid(a)
    assert pydicom.uid.UID(a).is_valid


def test_derive_uid_part_boundaries_matter() -> None:
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    assert derive_uid("abc") != derive_uid("ab", "c")


def test_result_uids_differ_by_kind_model_and_version() -> None:
    base = result_uids(SRC, "nodule", "1.0.0", "sr")
    assert base == result_uids(SRC, "nodule", "1.0.0", "sr")
    others = [
        result_uids(SRC, "nodule", "1.0.0", "sc"),
        result_uids(SRC, "nodule", "1.0.1", "sr"),
        result_uids(SRC, "other", "1.0.0", "sr"),
        result_uids(SRC + ".1", "nodule", "1.0.0", "sr"),
    ]
    seen = {base.series_instance_uid, base.sop_instance_uid}
    for o in others:
        assert o.series_instance_uid not in seen and o.sop_instance_uid not in seen
        seen |= {o.series_instance_uid, o.sop_instance_uid}
    assert base.series_instance_uid != base.sop_instance_uid


def test_device_uid_stable_and_ignores_ae_padding() -> None:
    assert device_uid("MEDCLF", "node-a") == device_uid("MEDCLF  ", "node-a")
    assert device_uid("MEDCLF", "node-a") != device_uid("MEDCLF", "node-b")


def test_is_valid_uid_rejects_bad_grammar() -> None:
    for bad in ["", "1.02.3", "1..2", "1.2.", "a.1", "1." + "1" * 63]:
        assert not is_valid_uid(bad), bad
    assert is_valid_uid("0.1.2")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=80), min_size=1, max_size=5))
def test_derive_uid_always_valid(parts: list[str]) -> None:
    uid = derive_uid(*parts)
    assert len(uid) <= 64
    assert is_valid_uid(uid)
    assert uid == derive_uid(*parts)
