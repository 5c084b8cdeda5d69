"""Bad demographics never cost a result: SR and SC from sources with invalid patient/study values.

Sources are written as Part 10 files and read back (as the node reads its spool), so wrongly
encoded bytes reach the sanitiser raw.  Every object must build and pass dciodvfy with no
error and no warning beyond those of the same object built from clean sources.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from test_reporting import IDENTITY, KEY, ct_series, key_hu, model_result

from medclf_node.reporting import build_sc, build_sr
from medclf_node.reporting.demographics import carried, clean_person_name, clean_value, shorten

pytestmark = pytest.mark.filterwarnings("ignore:(Invalid value|The value length):UserWarning")

LONG_TEXT = "Thorax CT with contrast, follow-up of the right upper lobe nodule seen in March last year"


def _dciodvfy(ds: Dataset, path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of dciodvfy for ``ds`` written to ``path``."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    # the file name is part of each line; strip it so runs compare
    lines = [ln.replace(str(path), "FILE") for ln in lines]
    errors = [ln for ln in lines if ln.startswith(("Error", "E:"))]
    return errors, [ln for ln in lines if ln.startswith(("Warning", "W:"))]


def _written(sources: list[Dataset], folder: Path) -> list[Dataset]:
    """The sources as the node sees them: Part 10 files on disk, headers read without pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Dataset] = []
    for i, ds in enumerate(sources):
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(pydicom.dcmread(path, stop_before_pixels=True))
    return out


def _set_raw(ds: Dataset, keyword: str, vr: str, raw: bytes) -> None:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    assert tag is not None
    ds.add(DataElement(tag, vr, raw))


def _bad_in_values(ds: Dataset) -> None:
    ds.PatientName = "Doe\\Jane^Q"  # multi-valued PN (the case that cost a whole result)
    ds.PatientID = "P" * 70  # LO > 64
    ds.PatientBirthDate = "1965-04-12"
    ds.PatientSex = "female"
    ds.PatientAge = "45y"
    ds.StudyDate, ds.StudyTime = "2020-01-01", "10:15:00"
    ds.AccessionNumber = "ACC-1234567890-XYZ"  # SH > 16
    ds.StudyID = "STUDY\\2"  # multi-valued SH of VM 1
    ds.ReferringPhysicianName = "Dr. Who"  # no caret: highdicom refuses it in the SC
    ds.StudyDescription = LONG_TEXT  # LO > 64, free text
    ds.PatientComments = "line one\x01\x02 with controls\r\nline two"


def _latin1_undeclared(ds: Dataset) -> None:
    """Latin-1 bytes with no Specific Character Set (the default repertoire is ASCII)."""
    del ds.SpecificCharacterSet
    _set_raw(ds, "PatientName", "PN", b"M\xfcller^J\xf6rg")


def _utf8_under_latin1(ds: Dataset) -> None:
    """Declared ISO_IR 100, but the bytes are UTF-8."""
    _set_raw(ds, "PatientName", "PN", b"M\xc3\xbcller^J\xc3\xb6rg")
    _set_raw(ds, "InstitutionName", "LO", b"Universit\xc3\xa4tsklinikum")


def _latin1_under_utf8(ds: Dataset) -> None:
    """Declared UTF-8, but the bytes are Latin-1."""
    ds.SpecificCharacterSet = "ISO_IR 192"
    _set_raw(ds, "PatientName", "PN", b"M\xfcller^J\xf6rg")
    _set_raw(ds, "StudyDescription", "LO", b"Th\xf6rax")


def _long_name(ds: Dataset) -> None:
    """A PN component group over 64 bytes, with more than five components."""
    ds.PatientName = "A" * 70 + "^B^C^D^E^F^G"


CASES: dict[str, Callable[[Dataset], None]] = {
    "values": _bad_in_values,
    "latin1-undeclared": _latin1_undeclared,
    "utf8-under-latin1": _utf8_under_latin1,
    "latin1-under-utf8": _latin1_under_utf8,
    "long-name": _long_name,
}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """dciodvfy warnings of SR and SC from clean sources: the bad ones may add none."""
    tmp = tmp_path_factory.mktemp("clean")
    sources = _written(ct_series(), tmp / "src")
    sr_err, sr_warn = _dciodvfy(build_sr(sources, model_result(), IDENTITY), tmp / "sr.dcm")
    sc_err, sc_warn = _dciodvfy(build_sc(sources[KEY], key_hu(), model_result(), IDENTITY), tmp / "sc.dcm")
    assert sr_err == [] and sc_err == []
    return {"sr": sr_warn, "sc": sc_warn}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_demographics_still_give_valid_sr_and_sc(case: str, tmp_path: Path,
                                                     baseline: dict[str, list[str]]) -> None:
    raw = ct_series()
    for ds in raw:
        CASES[case](ds)
    sources = _written(raw, tmp_path / "src")
    sr = build_sr(sources, model_result(), IDENTITY)
    sc = build_sc(sources[KEY], key_hu(), model_result(), IDENTITY)
    for name, obj in (("sr", sr), ("sc", sc)):
        errors, warnings = _dciodvfy(obj, tmp_path / f"{name}.dcm")
        assert errors == [], (name, errors)
        assert [w for w in warnings if w not in baseline[name]] == [], (name, warnings)
        back = pydicom.dcmread(tmp_path / f"{name}.dcm")
        assert back.StudyInstanceUID == raw[0].StudyInstanceUID  # same study, whatever the values
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert "\ufffd" not in str(back.PatientName)  # no replacement characters: letters kept
        if "latin1" in case:
            assert back.PatientName == "Müller^Jörg"  # decoded in the charset the bytes fit, no mojibake
        if case != "values":
            assert back.PatientID == "PAT-001"


def test_bad_values_are_carried_repaired() -> None:
    ds = ct_series()[0]
    _bad_in_values(ds)
    c = carried(ds)
    assert c.PatientName == "Doe^"  # first value; a lone family name keeps its caret
    assert c.PatientID == "P" * 64
    assert (c.PatientBirthDate, c.StudyDate, c.StudyTime) == ("19650412", "20200101", "101500")
    assert (c.PatientSex, c.PatientAge) == ("F", "045Y")
    assert c.AccessionNumber == "ACC-1234567890-X"  # SH: 16
    assert c.StudyID == "STUDY"
    assert c.ReferringPhysicianName == "Dr. Who^"
    assert len(c.StudyDescription.encode()) <= 64 and LONG_TEXT.startswith(c.StudyDescription)
    assert c.StudyDescription.endswith("upper lobe")  # cut at a word boundary (65 with "nodule")
    assert c.PatientComments == "line one with controls\r\nline two"
    assert [str(v) for v in ds.PatientName] == ["Doe", "Jane^Q"]  # the source is untouched
    # valid values are carried unchanged
    clean = carried(ct_series()[0])
    assert (clean.PatientName, clean.PatientID, clean.StudyDate) == ("Müller^Anna", "PAT-001", "20261125")


@pytest.mark.parametrize(("raw", "charset", "expected"), [
    (b"M\xfcller^J\xf6rg", None, "Müller^Jörg"),
    (b"M\xc3\xbcller^J\xc3\xb6rg", "ISO_IR 100", "Müller^Jörg"),
    (b"M\xfcller^J\xf6rg", "ISO_IR 192", "Müller^Jörg"),
    (b"M\xfcller^J\xf6rg", "ISO_IR 100", "Müller^Jörg"),
    (b"Smith^John", None, "Smith^John"),
])
def test_text_is_decoded_in_the_charset_it_fits(raw: bytes, charset: str | None, expected: str,
                                               tmp_path: Path) -> None:
    ds = ct_series()[0]
    if charset is None:
        del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = charset
    _set_raw(ds, "PatientName", "PN", raw)
    (back,) = _written([ds], tmp_path)
    assert str(carried(back).PatientName) == expected


def test_clean_value_rules() -> None:
    assert clean_value("2020/1/5", "DA") == "20200105"
    assert clean_value("2020-13-01", "DA") == ""  # no such date: empty (Type 2)
    assert clean_value("20200101", "DA") == "20200101"
    assert clean_value("12:30", "TM") == "1230"
    assert clean_value("25:00:00", "TM") == ""
    assert clean_value("m", "CS", "PatientSex") == "M"
    assert clean_value("unknown", "CS", "PatientSex") == ""
    assert clean_value("chest/abdomen", "CS") == "CHEST_ABDOMEN"
    assert clean_value("12.0", "IS") == "12"
    assert clean_value("a\\b", "LO") == "a/b"
    assert clean_person_name("Doe") == "Doe^"
    assert clean_person_name("^^") == ""
    assert clean_person_name("Yamada^Tarou=山田^太郎=やまだ^たろう") == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert len(clean_person_name("X" * 100 + "^Y").encode()) <= 64


def test_shorten_at_word_boundary() -> None:
    assert shorten("short", 64) == "short"
    assert shorten("AI result \u2014 not for primary diagnosis key image (nodule-2p5d-int8)", 64) == (
        "AI result \u2014 not for primary diagnosis key image")
    assert shorten("x" * 80, 64) == "x" * 64  # one long word: cut inside
    assert len(shorten("ü" * 40, 64).encode()) <= 64


def test_sr_series_description_is_shortened_at_a_word_boundary() -> None:
    from dataclasses import replace

    from medclf_node.reporting.sr import series_description

    long_model = replace(model_result(), model_name="chest-ct-nodule-classifier-int8")
    text = series_description(long_model)
    assert len(text.encode()) <= 64 and "(" not in text  # the model name is dropped whole, not cut mid-word
    assert series_description(model_result()).endswith(f"({model_result().model_name})")
