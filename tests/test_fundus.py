"""Synthetic fundus photographs (medclf_node.synthetic.fundus) and their OP DICOM writer (fundus_dicom).

The grade is a rule over the drawn features (International Clinical DR scale, 4-2-1 for severe);
the writer's instances must be what a fundus camera sends: OP 8 Bit, YBR_FULL_422 JPEG or RGB,
laterality, dciodvfy-clean, and readable by the node's own image reader.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medclf_node.synthetic.fundus import (
    SEVERE_H_PER_QUADRANT,
    Findings,
    Lesion,
    grade_findings,
    make_fundus,
    referable,
)
from medclf_node.synthetic.fundus_dicom import OP_8BIT_STORAGE, fundus_dataset, write_fundus


def _les(kind: str, n: int, quadrant: int = 0) -> list[Lesion]:
    return [Lesion(kind, 10.0, 10.0, 2.0, quadrant) for _ in range(n)]  # type: ignore[arg-type]


def test_grade_rule_follows_the_international_scale() -> None:
    assert grade_findings(Findings()) == 0
    assert grade_findings(Findings(tuple(_les("MA", 5)))) == 1
    for kind in ("H", "EX", "CWS"):
        assert grade_findings(Findings(tuple(_les("MA", 2) + _les(kind, 1)))) == 2
    assert grade_findings(Findings(beading_quadrants=(1,))) == 2  # venous beading in one quadrant: moderate
    # 4-2-1: > 20 haemorrhages in EACH of 4 quadrants
    many = [x for q in range(4) for x in _les("H", SEVERE_H_PER_QUADRANT + 1, q)]
    assert grade_findings(Findings(tuple(many))) == 3
    three_quadrants = [x for q in range(3) for x in _les("H", 40, q)] + _les("H", SEVERE_H_PER_QUADRANT, 3)
    assert grade_findings(Findings(tuple(three_quadrants))) == 2
    assert grade_findings(Findings(beading_quadrants=(0, 2))) == 3  # beading in 2 quadrants
    assert grade_findings(Findings(tuple(_les("IRMA", 1, 2)))) == 3  # IRMA in 1 quadrant
    assert grade_findings(Findings(tuple(many + _les("NV", 1)))) == 4
    assert grade_findings(Findings(tuple(_les("PRH", 1)))) == 4
    assert [referable(g) for g in range(5)] == [False, False, True, True, True]


@pytest.mark.parametrize("grade", range(5))
def test_generator_draws_what_the_target_grade_needs(grade: int) -> None:
    for seed in range(3):
        f = make_fundus(1000 + 10 * grade + seed, size=128, target_grade=grade)
        assert f.grade == grade_findings(f.findings) == grade
        assert f.image.shape == (128, 128, 3) and f.image.dtype == np.uint8
        assert f.image[0, 0].max() == 0 and f.image[-1, -1].max() == 0  # outside the circular field: black
        assert f.image[64, 40:90].mean() > 40  # inside: lit retina


def test_disc_on_the_nasal_side_and_determinism() -> None:
    r = make_fundus(7, size=256, target_grade=0, laterality="R")
    left = make_fundus(7, size=256, target_grade=0, laterality="L")
    assert r.disc_rc[1] > 128 > left.disc_rc[1]  # right eye: disc on the image right
    assert np.array_equal(make_fundus(7, size=256, target_grade=0, laterality="R").image, r.image)
    # lesions darken the image compared with the same eye without them
    g0, g4 = make_fundus(11, size=256, target_grade=0), make_fundus(11, size=256, target_grade=3)
    assert g4.findings.count("H") > 0 and g0.findings.count("H") == 0


@pytest.mark.parametrize("encoding", ["jpeg", "rgb"])
def test_op_instance_is_valid_and_read_by_the_node(tmp_path: Path, encoding: str) -> None:
    from medclf_node.config import LimitsSection
    from medclf_node.ingest.image2d import read_image

    f = make_fundus(3, size=256, target_grade=2, laterality="L")
    path = write_fundus(f.image, tmp_path / "op.dcm", laterality=f.laterality, patient_id=f.patient_id,
                        encoding=encoding, uid_seed="t")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == OP_8BIT_STORAGE and ds.Modality == "OP" and ds.ImageLaterality == "L"
    if encoding == "jpeg":
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        assert ds.PhotometricInterpretation == "YBR_FULL_422" and ds.LossyImageCompression == "01"
    else:
        assert ds.PhotometricInterpretation == "RGB"
        assert np.array_equal(ds.pixel_array, f.image)
    img = read_image(path, LimitsSection())
    err = np.abs(img.pixels * 255.0 - f.image).mean()
    assert err < (3.0 if encoding == "jpeg" else 1e-3)
    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert errors == []


def test_writer_refuses_what_is_not_an_rgb_photograph() -> None:
    with pytest.raises(ValueError, match="uint8"):
        fundus_dataset(np.zeros((8, 8), np.uint8), laterality="R", patient_id="P")
    with pytest.raises(ValueError, match="laterality"):
        fundus_dataset(np.zeros((8, 8, 3), np.uint8), laterality="X", patient_id="P")  # type: ignore[arg-type]
