"""Fuzz the path stored bytes -> spool -> selection -> volume -> inference -> SR/SC.

Valid CT slices are mutated (byte flips, truncation, VR and length fields overwritten) and
pushed through ``Spool.store`` and ``Pipeline.process`` exactly as the node does.  The only
acceptable outcomes are the documented ones: ``StoreError`` (with 0xA700/0xC210/0xC211) at
intake, and a series that ends ``reported``, ``skipped`` or ``failed`` with a precise reason
code, never ``internal_error`` (an exception nobody anticipated).  Bounded for CI:
``MEDCLF_FUZZ_EXAMPLES`` examples (default 15).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures_models import phantom_volume, tiny_models_dir  # noqa: F401  (fixture)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from stores import open_test_store
from test_faults_common import record

from medclf_node.config import Config, parse_config
from medclf_node.inference.registry import ModelRegistry
from medclf_node.ingest.spool import Spool, StoreError
from medclf_node.pipeline import Pipeline
from medclf_node.synthetic.dicom_writer import write_ct_series

SHAPE = (6, 64, 64)
SPACING = (2.5, 5.0, 5.0)
EXAMPLES = int(os.environ.get("MEDCLF_FUZZ_EXAMPLES", "15"))
DOCUMENTED_STATUSES = {0xA700, 0xC210, 0xC211}

Mutation = tuple[str, int, int]  # (kind, position, value)

mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "truncate", "vr", "length", "zero_run"]),
        st.one_of(st.integers(128, 1500), st.integers(0, 10**6)),  # mostly the header
        st.integers(0, 2**16 - 1),
    ),
    min_size=1,
    max_size=4,
)


def mutate(raw: bytes, muts: list[Mutation]) -> bytes:
    buf = bytearray(raw)
    for kind, pos, value in muts:
        if not buf:
            break
        pos %= len(buf)
        if kind == "flip":
            buf[pos] ^= 1 << (value % 8)
        elif kind == "truncate":
            del buf[max(132, pos):]
        elif kind == "vr":  # overwrite the next VR-looking pair of capitals with another VR
            for at in range(pos, min(len(buf) - 1, pos + 200)):
                if 65 <= buf[at] <= 90 and 65 <= buf[at + 1] <= 90:
                    buf[at:at + 2] = [b"OB", b"SQ", b"UN", b"US", b"UL", b"FD", b"XX", b"UT"][value % 8]
                    break
        elif kind == "length":  # a 16-bit length field becomes arbitrary
            buf[pos:pos + 2] = struct.pack("<H", value)
        elif kind == "zero_run":
            buf[pos:pos + value % 64] = bytes(len(buf[pos:pos + value % 64]))
    return bytes(buf)


@pytest.fixture(scope="module")
def world(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:  # noqa: F811
    base = tmp_path_factory.mktemp("fuzz")
    hu = phantom_volume(SHAPE, SPACING, None, seed=2)
    originals = [p.read_bytes() for p in write_ct_series(hu, SPACING, base / "src", patient_id="FUZZ", uid_seed="fuzz")]
    cfg0 = _config(base / "probe", tiny_models_dir)
    registry = ModelRegistry.from_config(cfg0)
    outcomes: dict[str, int] = {}
    yield World(base, tiny_models_dir, originals, registry, outcomes)
    record("fuzz stored bytes -> report", "hypothesis mutates one slice of a 6-slice CT series (flip, truncate, "
           "VR, length, zero run); spool + pipeline must end in a documented outcome",
           rounds=sum(outcomes.values()), instances=6 * sum(outcomes.values()),
           undocumented_errors=outcomes.get("failed [internal_error]", 0), outcomes=dict(sorted(outcomes.items())))


@dataclass(repr=False)
class World:
    """What every example shares (the repr stays short in hypothesis reports)."""

    base: Path
    models: Path
    originals: list[bytes]
    registry: ModelRegistry
    outcomes: dict[str, int]

    def __repr__(self) -> str:
        return f"World({self.base})"


def _config(data: Path, models: Path) -> Config:
    return parse_config({
        "node": {"data_dir": str(data)},
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        "results": {"destinations": ["pacs"]},
        "models": {"directory": str(models)},
        "rules": [{"name": "ct", "models": ["test-2p5d-int8"], "min_slices": 3}],
    })


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(which=st.integers(0, SHAPE[0] - 1), muts=mutations)
@example(which=0, muts=[("vr", 347, 4)])  # SpecificCharacterSet as UL: BytesLengthException, was internal_error
@example(which=0, muts=[("vr", 701, 3)])  # ManufacturerModelName as US: an SR that could not be written
def test_mutated_slice_ends_in_a_documented_outcome(world: World, which: int, muts: list[Mutation]) -> None:
    base, models, originals, registry, outcomes = world.base, world.models, world.originals, world.registry, \
        world.outcomes
    data = Path(tempfile.mkdtemp(dir=base))
    cfg = _config(data, models)
    index = open_test_store(data, durable=False)
    try:
        spool = Spool(data, index, durable=False)
        series: set[str] = set()
        for k, raw in enumerate(originals):
            payload = mutate(raw, muts) if k == which else raw
            try:
                series.add(spool.store(payload, calling_ae="PACS", assoc_id="fuzz").record.series_uid)
            except StoreError as exc:
                assert exc.status in DOCUMENTED_STATUSES
                outcomes[f"intake 0x{exc.status:04X}"] = outcomes.get(f"intake 0x{exc.status:04X}", 0) + 1
        pipeline = Pipeline(cfg, index, registry)
        for uid in sorted(series):
            index.mark_complete(uid, "forced")
            row = index.claim_next_complete("fuzz")
            assert row is not None
            state = pipeline.process(row)
            final = index.get_series(row.series_uid)
            assert final is not None
            assert state in ("reported", "skipped", "failed")
            assert final.reason_code != "internal_error", final.reason_text
            key = f"{state}" + (f" [{final.reason_code}]" if state != "reported" and final.reason_code else "")
            outcomes[key] = outcomes.get(key, 0) + 1
    finally:
        index.close()
        shutil.rmtree(data, ignore_errors=True)
