"""convert: node-preprocess pixels in patient-grouped shards, 2D/2.5D slices and 3D windows."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from medclf_node.preprocess import PreprocessSpec, Window, slices_2d, volume_3d
from medclf_node.synthetic.phantoms import make_phantom
from training.data.config import ConvertConfig, ConvertSection, SampleSection, parse_convert_config
from training.data.convert import SkipCase, convert, load_summary, samples_3d
from training.data.readers import Case, iter_dicom_cases
from training.data.synth import iter_synthesize, phantom_case
from training.data.tfrecords import read_examples, shard_of

SHAPE = (20, 48, 48)
LUNG, MEDIASTINUM = Window(center=-600, width=1500), Window(center=40, width=400)
SPEC_25D = PreprocessSpec(
    mode="2.5d", windows=(LUNG,), input_shape=(32, 32), target_spacing=(5.0, 10.0, 10.0), context_slices=1
)
SPEC_3D = PreprocessSpec(
    mode="3d", windows=(LUNG, MEDIASTINUM), input_shape=(8, 24, 24), target_spacing=(40.0, 12.0, 12.0)
)


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    out = [phantom_case(make_phantom(s, shape=SHAPE, nodules=1 if s % 2 else 0)) for s in range(100, 105)]
    # A second series of the first patient: must land in the same shard.
    out.append(replace(out[0], case_id="second-series", hu=out[0].hu[::-1].copy()))
    return out


def _cfg(spec: PreprocessSpec, shards: int = 3, **samples: object) -> ConvertConfig:
    return ConvertConfig(preprocess=spec, convert=ConvertSection(shards=shards, samples=SampleSection(**samples)))


def test_2p5d_records_are_node_preprocess_output(cases: list[Case], tmp_path: Path) -> None:
    summary = convert(cases, tmp_path, _cfg(SPEC_25D), progress=False)
    recs = read_examples(sorted(tmp_path.glob("shard-*.tfrecord")), (32, 32, 3))
    assert len(recs) == summary["totals"]["samples"] == len(cases) * SHAPE[0]
    by_case = {c.case_id: c for c in cases}
    expected = {cid: slices_2d(c.hu, c.spacing, SPEC_25D) for cid, c in by_case.items()}
    for r in recs:
        case = by_case[r["case_id"]]
        np.testing.assert_array_equal(r["image"], expected[r["case_id"]][r["position"]])
        assert case.slice_labels is not None and r["label"] == case.slice_labels[r["position"]]
    assert summary["totals"]["positives"] == sum(int(c.slice_labels.sum()) for c in cases if c.slice_labels is not None)


def test_shards_grouped_by_patient(cases: list[Case], tmp_path: Path) -> None:
    summary = convert(cases, tmp_path, _cfg(SPEC_25D, shards=4, negative_slice_stride=4), progress=False)
    where: dict[str, set[str]] = defaultdict(set)
    for shard in sorted(tmp_path.glob("shard-*.tfrecord")):
        for r in read_examples([shard], (32, 32, 3)):
            where[r["patient_id"]].add(shard.name)
    assert all(len(s) == 1 for s in where.values()), where
    for pid, info in summary["patients"].items():
        assert where[pid] == {summary["shards"][info["shard"]]["file"]}
        assert info["shard"] == shard_of(pid, 4)
    assert len(summary["patients"][cases[0].patient_id]["cases"]) == 2
    on_disk = sorted(load_summary(tmp_path)["patients"])
    assert on_disk == sorted({c.patient_id for c in cases})


def test_negative_slice_stride_keeps_all_positives(cases: list[Case]) -> None:
    from training.data.convert import samples_2d

    pos_case = next(c for c in cases if c.label == 1)
    full = list(samples_2d(pos_case, SPEC_25D, SampleSection()))
    thin = list(samples_2d(pos_case, SPEC_25D, SampleSection(negative_slice_stride=5)))
    assert sum(s.label for s in thin) == sum(s.label for s in full) > 0
    assert len(thin) < len(full)


def test_3d_windows_label_by_candidate(cases: list[Case]) -> None:
    pos_case = next(c for c in cases if c.label == 1)
    rng = np.random.default_rng(0)
    cfg = SampleSection(window_stride=2, positive_windows_per_candidate=2, positive_jitter=1)
    spec = SPEC_3D.model_copy(update={"input_shape": (4, 24, 24), "target_spacing": (5.0, 12.0, 12.0)})
    samples = list(samples_3d(pos_case, spec, cfg, rng))
    assert all(s.image.shape == (4, 24, 24, 2) and s.image.dtype == np.float32 for s in samples)
    cz = pos_case.candidates[0].center_zyx[0] * pos_case.spacing[0] / 5.0
    for s in samples:
        assert s.label == int(s.position - 0.5 <= cz < s.position + 4 - 0.5)
    assert sum(s.label for s in samples) >= 2  # sliding + candidate-centred windows
    assert any(s.label == 0 for s in samples)


def test_3d_single_window_equals_volume_3d(cases: list[Case], tmp_path: Path) -> None:
    summary = convert(cases[:3], tmp_path, _cfg(SPEC_3D, shards=2), progress=False)
    assert summary["image_shape"] == [8, 24, 24, 2]
    recs = read_examples(sorted(tmp_path.glob("shard-*.tfrecord")), (8, 24, 24, 2))
    by_case = {c.case_id: c for c in cases}
    assert len(recs) == 3  # 20 slices x 15 mm at 40 mm: 8 slices = the window depth, one window each
    for r in recs:
        c = by_case[r["case_id"]]
        np.testing.assert_array_equal(r["image"], volume_3d(c.hu, c.spacing, SPEC_3D))


def test_positive_without_slice_labels_is_skipped(cases: list[Case], tmp_path: Path) -> None:
    pos = next(c for c in cases if c.label == 1)
    bare = replace(pos, slice_labels=None, candidates=())
    summary = convert([bare, cases[0]], tmp_path, _cfg(SPEC_25D), progress=False)
    assert summary["totals"]["skipped_cases"] == 1 and summary["skipped"][0]["case_id"] == bare.case_id
    with pytest.raises(SkipCase):
        convert([bare], tmp_path / "strict", _cfg(SPEC_25D, skip_unlabelled=False), progress=False)


def test_dicom_series_end_to_end(tmp_path: Path) -> None:
    list(iter_synthesize(tmp_path / "dicom", 2, seed=9, shape=(12, 40, 40), positive_fraction=0.5))
    dicom_cases = list(iter_dicom_cases(tmp_path / "dicom"))
    summary = convert(dicom_cases, tmp_path / "tfr", _cfg(SPEC_25D, shards=2), progress=False)
    recs = read_examples(sorted((tmp_path / "tfr").glob("shard-*.tfrecord")), (32, 32, 3))
    assert len(recs) == summary["totals"]["samples"] == 24
    by_case = {c.case_id: c for c in dicom_cases}
    for r in recs[:6]:
        c = by_case[r["case_id"]]
        np.testing.assert_array_equal(r["image"], slices_2d(c.hu, c.spacing, SPEC_25D, indices=[r["position"]])[0])


def test_config_from_toml_mapping() -> None:
    cfg = parse_convert_config(
        {
            "preprocess": {"mode": "2d", "windows": [{"center": -600, "width": 1500}], "input_shape": [64, 64]},
            "convert": {"shards": 2, "samples": {"negative_slice_stride": 3}},
            "fit": {"epochs": 3},  # other commands' tables are ignored
        }
    )
    assert cfg.convert.shards == 2 and cfg.convert.samples.negative_slice_stride == 3
    with pytest.raises(ValueError, match="convert.shards"):
        parse_convert_config({"preprocess": cfg.preprocess.model_dump(), "convert": {"shards": 0}})
