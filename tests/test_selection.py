"""Series selection rules: filters, criteria, first-match-wins, skip reasons, config-check problems."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
from ctseries import hu_phantom, make_enhanced, make_series, write_series
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medclf_node.config import Config, RuleSection, parse_config
from medclf_node.ingest.selection import (
    HeaderError,
    Selection,
    Skipped,
    check_rules,
    header_from_dataset,
    read_headers,
    select,
)


def _rule(**kw: Any) -> RuleSection:
    kw.setdefault("name", "r")
    kw.setdefault("models", ["m"])
    return RuleSection(**kw)


@pytest.fixture()
def chest_series(tmp_path: Path) -> tuple[list[Path], Path]:
    """Ten axial slices plus one localizer mixed into the same series."""
    ds = make_series(hu_phantom(10))
    scout = make_series(
        hu_phantom(1),
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        study_uid=ds[0].StudyInstanceUID,
        series_uid=ds[0].SeriesInstanceUID,
    )
    paths = write_series(ds + scout, tmp_path / "chest")
    return paths, paths[-1]


def test_localizer_dropped_and_rule_selects(chest_series: tuple[list[Path], Path]) -> None:
    paths, scout = chest_series
    result = select(read_headers(paths), [_rule(name="ct", models=["a", "b"], min_slices=10)])
    assert isinstance(result, Selection)
    assert result.rule == "ct" and result.models == ("a", "b")
    assert scout not in result.paths and result.dropped == (scout,)
    assert set(result.paths) == set(paths[:-1])


def test_first_match_wins(chest_series: tuple[list[Path], Path]) -> None:
    headers = read_headers(chest_series[0])
    first = _rule(name="specific", models=["x"], body_part_examined=["chest"])
    second = _rule(name="general", models=["y"])
    assert select(headers, [first, second]).rule == "specific"  # type: ignore[union-attr]
    assert select(headers, [second, first]).rule == "general"  # type: ignore[union-attr]
    third = _rule(name="abdomen", models=["z"], body_part_examined=["ABDOMEN"])  # CHEST falls through
    assert select(headers, [third, second]).rule == "general"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("criteria", "reason"),
    [
        ({"modality": ["MR"]}, "modality CT not in ['MR']"),
        ({"image_type_includes": ["HELICAL"]}, "lacks HELICAL"),
        ({"slice_thickness_mm": (0.5, 1.5)}, "SliceThickness 2.5 mm outside [0.5, 1.5]"),
        ({"min_slices": 11}, "10 slice(s) < min_slices 11"),
        ({"body_part_examined": ["HEAD"]}, "BodyPartExamined CHEST not in ['HEAD']"),
        ({"series_description_regex": "^lung"}, "does not match /^lung/"),
        ({"sop_class_uids": ["1.2.840.10008.5.1.4.1.1.4"]}, "no instance left"),
        ({"image_type_excludes": ["ORIGINAL"]}, "no instance left"),
    ],
)
def test_each_criterion_can_reject(
    chest_series: tuple[list[Path], Path], criteria: dict[str, Any], reason: str
) -> None:
    result = select(read_headers(chest_series[0]), [_rule(name="only", **criteria)])
    assert isinstance(result, Skipped)
    assert "rule 'only'" in result.reason and reason in result.reason


@pytest.mark.parametrize(
    "criteria",
    [
        {"modality": ["ct"]},
        {"image_type_includes": ["axial", "ORIGINAL"]},
        {"slice_thickness_mm": (2.0, 3.0)},
        {"body_part_examined": ["chest", "abdomen"]},
        {"series_description_regex": "axial"},
        {"sop_class_uids": ["1.2.840.10008.5.1.4.1.1.2"]},
    ],
)
def test_each_criterion_can_accept(chest_series: tuple[list[Path], Path], criteria: dict[str, Any]) -> None:
    assert isinstance(select(read_headers(chest_series[0]), [_rule(**criteria)]), Selection)


def test_skip_reason_lists_every_rule(chest_series: tuple[list[Path], Path]) -> None:
    rules = [_rule(name="mr", modality=["MR"]), _rule(name="thin", slice_thickness_mm=(0.0, 1.0))]
    result = select(read_headers(chest_series[0]), rules)
    assert isinstance(result, Skipped)
    assert "rule 'mr'" in result.reason and "rule 'thin'" in result.reason
    assert isinstance(select([], rules), Skipped)
    assert isinstance(select(read_headers(chest_series[0]), []), Skipped)


def test_non_image_instances_dropped(tmp_path: Path, chest_series: tuple[list[Path], Path]) -> None:
    paths, _ = chest_series
    first = read_headers(paths[:1])[0]
    sr = Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    sr.SOPInstanceUID = generate_uid()
    sr.StudyInstanceUID = first.study_instance_uid
    sr.SeriesInstanceUID = first.series_instance_uid
    sr.Modality = "SR"
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    sr_path = tmp_path / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    result = select(read_headers([*paths, sr_path]), [_rule()])
    assert isinstance(result, Selection) and sr_path in result.dropped and sr_path not in result.paths


def test_enhanced_ct_thickness_and_frames(tmp_path: Path) -> None:
    paths = write_series([make_enhanced(hu_phantom(6))], tmp_path / "e")
    headers = read_headers(paths)
    assert headers[0].number_of_frames == 6 and headers[0].slice_thickness == 2.5
    assert isinstance(select(headers, [_rule(min_slices=6, slice_thickness_mm=(2.0, 3.0))]), Selection)
    assert isinstance(select(headers, [_rule(min_slices=7)]), Skipped)


def test_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(HeaderError, match="x.dcm"):
        read_headers([bad])


def test_rules_from_toml_config_and_default_rule(chest_series: tuple[list[Path], Path]) -> None:
    cfg = parse_config(
        {
            "rules": [
                {"name": "thin-chest", "models": ["nodule-3d"], "slice_thickness_mm": [0.0, 1.5]},
                {"name": "chest", "models": ["nodule-2p5d-int8"], "body_part_examined": ["CHEST"]},
            ]
        }
    )
    result = select(read_headers(chest_series[0]), cfg.effective_rules())
    assert isinstance(result, Selection) and result.rule == "chest"
    default = select(read_headers(chest_series[0]), Config().effective_rules())
    assert isinstance(default, Selection) and default.models == ("nodule-2p5d-int8",)


def test_check_rules_reports_problems() -> None:
    rules = [
        _rule(name="all-ct", models=["a"]),
        _rule(name="chest", models=["a"], body_part_examined=["CHEST"]),  # shadowed by all-ct
        _rule(name="ghost", models=["missing"], modality=["MR"]),
        _rule(name="clash", models=["a"], modality=["PT"], image_type_includes=["LOCALIZER"]),
        _rule(name="bad-uid", models=["a"], modality=["NM"], sop_class_uids=["1.2.x"]),
        _rule(name="none", models=[], modality=["US"]),
        _rule(name="never", models=["a"], modality=[]),
    ]
    problems = check_rules(rules, known_models=["a"])
    text = "\n".join(problems)
    assert "rules[1] ('chest'): can never match, because rules[0] ('all-ct')" in text
    assert "model 'missing' is not loaded" in text
    assert "both required and excluded" in text
    assert "'1.2.x' is not a valid UID" in text
    assert "rules[5] ('none'): names no models" in text
    assert "rules[6] ('never'): modality is empty" in text
    assert "rules[2] ('ghost'): can never match" not in text  # MR is not covered by a CT rule
    assert len(problems) == 6


def test_check_rules_clean_and_narrow_first_is_fine() -> None:
    rules = [
        _rule(name="thin-chest", models=["a"], slice_thickness_mm=(0.0, 1.5), body_part_examined=["CHEST"]),
        _rule(name="chest", models=["b"], body_part_examined=["CHEST"]),
        _rule(name="any", models=["b"]),
    ]
    assert check_rules(rules, known_models=["a", "b"]) == []
    assert check_rules([_rule(models=["unknown"])], known_models=None) == []  # no model directory to check


def test_fast_header_read_equals_pydicom(tmp_path: Path, chest_series: tuple[list[Path], Path]) -> None:
    odd = make_series(hu_phantom(1))[0]
    odd.SpecificCharacterSet = "ISO_IR 192"
    odd.SeriesDescription = "Thorax nativ \u00e4\u00f6"  # non-ASCII: must go through pydicom's decoding
    odd.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", ""]
    files = [*chest_series[0][:2], chest_series[1], *write_series([odd], tmp_path / "odd")]
    files += write_series([make_enhanced(hu_phantom(2))], tmp_path / "enh")
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert read_headers([path]) == [header_from_dataset(path, ds)], path
    assert read_headers(files[3:4])[0].series_description == "Thorax nativ \u00e4\u00f6"


def _config_check(tmp_path: Path, toml: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "node.toml"
    cfg.write_text(toml, encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "medclf_node.cli", "config-check", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_check_cli_reports_rule_problems(tmp_path: Path) -> None:
    models = '[models]\ndirectory = "no-such-dir"\n'
    bad = _config_check(
        tmp_path,
        models + '[[rules]]\nname = "all"\nmodels = ["m"]\n'
        '[[rules]]\nname = "chest"\nmodels = ["m"]\nbody_part_examined = ["CHEST"]\n',
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "rules[1] ('chest'): can never match" in bad.stdout
    assert "model names in rules not checked" in bad.stdout
    good = _config_check(tmp_path, models + '[[rules]]\nname = "all"\nmodels = ["m"]\n')
    assert good.returncode == 0, good.stdout + good.stderr
