"""Result objects: the TID 1500 SR and the Secondary Capture key image.

Built from realistic CT source datasets (pydicom, from numpy), then read back with highdicom
and pydicom, validated with dicom3tools' dciodvfy and read by DCMTK's dsrdump.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from medclf_node.domain import Code, ModelResult, NodeIdentity, SliceRef
from medclf_node.reporting import DISCLAIMER, build_sc, build_sr, result_uids, sc_to_png
from medclf_node.reporting.sc import apply_window, colormap, key_image_layout, render_key_image

NODULE = Code("427359005", "SCT", "Solitary nodule of lung")
IDENTITY = NodeIdentity(ae_title="MEDCLF", device_name="medclf-node-test", institution_name="Test Hospital")
ROWS = COLS = 64
N_SLICES = 6
KEY = 3
HOT = (20, 40)  # (row, col) centre of the heat-map hot spot on the key slice


# --- source CT series ------------------------------------------------------------------------


def ct_volume() -> npt.NDArray[np.float32]:
    """Soft-tissue body, two air-filled lungs, a small nodule on the key slice."""
    yy, xx = np.mgrid[:ROWS, :COLS]
    vol = np.full((N_SLICES, ROWS, COLS), -1000.0, np.float32)
    body = (yy - 32) ** 2 / 30**2 + (xx - 32) ** 2 / 28**2 < 1
    lung_l = (yy - 30) ** 2 / 18**2 + (xx - 20) ** 2 / 9**2 < 1
    lung_r = (yy - 30) ** 2 / 18**2 + (xx - 44) ** 2 / 9**2 < 1
    vol[:, body] = 40.0
    vol[:, lung_l | lung_r] = -850.0
    vol[KEY][(yy - HOT[0]) ** 2 + (xx - HOT[1]) ** 2 < 9] = 20.0
    return vol


def ct_series(*, body_part: bool = True, study_uid: str | None = None) -> list[Dataset]:
    """One CT Image Storage dataset per slice, as a scanner would send them."""
    study_uid = study_uid or generate_uid()
    series_uid, for_uid = generate_uid(), generate_uid()
    out = []
    for i, hu in enumerate(ct_volume()):
        ds = Dataset()
        sop = generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.PatientName, ds.PatientID = "Müller^Anna", "PAT-001"
        ds.PatientBirthDate, ds.PatientSex = "19650412", "F"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20261125", "101500", "42"
        ds.AccessionNumber, ds.ReferringPhysicianName = "ACC123", "Ref^Doc"
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "CT", "SynthCT", 3, i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        if body_part:
            ds.BodyPartExamined = "CHEST"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-160.0, -160.0, -100.0 + 2.5 * i]
        ds.PixelSpacing, ds.SliceThickness, ds.KVP = [5.0, 5.0], 2.5, 120
        ds.Rows, ds.Columns, ds.SamplesPerPixel = ROWS, COLS, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        out.append(ds)
    return out


def hot_heatmap() -> npt.NDArray[np.float32]:
    yy, xx = np.mgrid[:ROWS, :COLS]
    return np.exp(-((yy - HOT[0]) ** 2 + (xx - HOT[1]) ** 2) / (2 * 4.0**2)).astype(np.float32)


def model_result(probability: float = 0.93, *, version: str = "1.0.0", heatmap: bool = True) -> ModelResult:
    return ModelResult(
        model_name="nodule-2p5d-int8",
        model_version=version,
        finding=NODULE,
        probability=probability,
        threshold=0.5,
        positive=probability >= 0.5,
        key_slice_index=KEY,
        slice_scores=np.linspace(0.1, probability, N_SLICES, dtype=np.float32),
        heatmap=hot_heatmap() if heatmap else None,
    )


# --- external validators ---------------------------------------------------------------------


def dciodvfy_errors(ds: Dataset, tmp_path: Path, name: str) -> list[str]:
    """dciodvfy's error lines for ``ds`` written as a Part 10 file (warnings are allowed)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith(("Error", "E:"))]


# --- SR --------------------------------------------------------------------------------------


def measurement_groups(sr: Dataset) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The TID 1501 groups of an SR, parsed by highdicom as a reader would."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_image_measurement_groups()
    return list(groups)


def evaluation_of(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> tuple[str, str, str]:
    """(finding code value, answer code value, answer meaning) of the group's one evaluation."""
    (evaluation,) = group.get_qualitative_evaluations()
    answer = evaluation.value  # highdicom annotates this as a number; it is a CodedConcept
    assert isinstance(answer, hd.sr.CodedConcept)
    assert answer.scheme_designator == "SCT"
    return (evaluation.name.value, answer.value, answer.meaning)


def test_sr_reads_back_with_finding_probability_evidence_and_study(tmp_path: Path) -> None:
    sources = ct_series()
    built = build_sr(sources, model_result(0.93), IDENTITY)
    path = tmp_path / "sr.dcm"
    built.save_as(path, enforce_file_format=True)

    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert sr.PatientName == "Müller^Anna" and sr.PatientID == "PAT-001"
    assert sr.AccessionNumber == "ACC123"
    assert DISCLAIMER in sr.SeriesDescription
    assert sr.Manufacturer == "medclf-node" and sr.InstitutionName == "Test Hospital"

    groups = measurement_groups(sr)
    assert len(groups) == 1
    group = groups[0]
    assert group.finding_type is not None and group.finding_type.value == NODULE.value
    assert evaluation_of(group) == (NODULE.value, "52101004", "Present")
    (prob,) = group.get_measurements()
    assert prob.name.meaning == "Probability"
    assert prob.value == pytest.approx(0.93)
    assert prob.unit.scheme_designator == "UCUM"
    (key_ref,) = group.source_images
    assert key_ref.referenced_sop_instance_uid == sources[KEY].SOPInstanceUID

    evidence = {e[2] for e in sr.get_evidence()}
    assert evidence == {ds.SOPInstanceUID for ds in sources}


def test_sr_names_device_observer_and_algorithm(tmp_path: Path) -> None:
    sr = build_sr(ct_series(), model_result(), IDENTITY)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    root = pydicom.dcmread(path)

    def walk(items: list[Dataset]) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeMeaning
            if it.ValueType == "TEXT":
                found.append((name, it.TextValue))
            elif it.ValueType == "CODE":
                found.append((name, it.ConceptCodeSequence[0].CodeValue))
            found += walk(list(it.get("ContentSequence", [])))
        return found

    items = walk(list(root.ContentSequence))
    assert ("Observer Type", "121007") in items  # DCM Device
    assert ("Device Observer Name", "medclf-node-test") in items
    assert ("Algorithm Name", "nodule-2p5d-int8") in items
    assert ("Algorithm Version", "1.0.0") in items
    assert root.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_sr_absent_below_threshold() -> None:
    group = measurement_groups(build_sr(ct_series(), model_result(0.12), IDENTITY))[0]
    assert evaluation_of(group) == (NODULE.value, "2667000", "Absent")
    assert group.get_measurements()[0].value == pytest.approx(0.12)


def test_sr_uids_are_deterministic() -> None:
    sources = ct_series()
    a = build_sr(sources, model_result(), IDENTITY)
    b = build_sr(sources, model_result(), IDENTITY)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    expected = result_uids(sources[0].SeriesInstanceUID, "nodule-2p5d-int8", "1.0.0", "sr")
    assert a.SOPInstanceUID == expected.sop_instance_uid
    c = build_sr(sources, model_result(version="1.1.0"), IDENTITY)
    assert c.SOPInstanceUID != a.SOPInstanceUID


def test_sr_key_by_slice_ref_and_bad_key() -> None:
    sources = ct_series()
    key = SliceRef(CTImageStorage, sources[1].SOPInstanceUID)
    sr = build_sr(sources, model_result(), IDENTITY, key_ref=key)
    ref = measurement_groups(sr)[0].source_images[0]
    assert ref.referenced_sop_instance_uid == sources[1].SOPInstanceUID
    with pytest.raises(ValueError, match="not among"):
        build_sr(sources, model_result(), IDENTITY, key_ref=SliceRef(CTImageStorage, "1.2.3"))
    with pytest.raises(ValueError, match="outside"):
        build_sr(sources[:2], model_result(), IDENTITY)
    with pytest.raises(ValueError, match="at least one"):
        build_sr([], model_result(), IDENTITY)


def test_sr_and_sc_reference_the_key_frame_of_a_multiframe_source(tmp_path: Path) -> None:
    enhanced = ct_series()[0]
    enhanced.SOPClassUID = EnhancedCTImageStorage
    enhanced.NumberOfFrames = N_SLICES
    key = SliceRef(EnhancedCTImageStorage, enhanced.SOPInstanceUID, frame_number=KEY + 1)
    sr = build_sr([enhanced], model_result(), IDENTITY, key_ref=key)
    ref = measurement_groups(sr)[0].source_images[0]
    assert ref.referenced_sop_instance_uid == enhanced.SOPInstanceUID
    assert ref.referenced_frame_numbers == [KEY + 1]
    assert dciodvfy_errors(sr, tmp_path, "sr.dcm") == []
    sc = build_sc(enhanced, key_hu(), model_result(), IDENTITY, key_frame_number=KEY + 1)
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == KEY + 1
    assert dciodvfy_errors(sc, tmp_path, "sc.dcm") == []


def test_sr_validates_with_dciodvfy(tmp_path: Path) -> None:
    for p in (0.93, 0.12):
        assert dciodvfy_errors(build_sr(ct_series(), model_result(p), IDENTITY), tmp_path, "sr.dcm") == []


def test_sr_readable_by_dsrdump(tmp_path: Path) -> None:
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (DCMTK) not installed")
    path = tmp_path / "sr.dcm"
    build_sr(ct_series(), model_result(0.93), IDENTITY).save_as(path, enforce_file_format=True)
    proc = subprocess.run(
        ["dsrdump", str(path)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "Imaging Measurement Report" in proc.stdout
    assert "52101004" in proc.stdout and "nodule-2p5d-int8" in proc.stdout


def test_sr_and_sc_from_sources_missing_type2_attributes(tmp_path: Path) -> None:
    sources = ct_series()
    dropped = ("PatientSex", "PatientBirthDate", "AccessionNumber", "StudyID", "ReferringPhysicianName")
    for ds in sources:
        for kw in dropped:
            delattr(ds, kw)
    sr = build_sr(sources, model_result(), IDENTITY)
    assert all(kw not in sources[0] for kw in dropped)  # the caller's datasets are untouched
    assert sr.PatientID == "PAT-001" and sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert dciodvfy_errors(sr, tmp_path, "sr.dcm") == []
    sc = build_sc(sources[KEY], key_hu(), model_result(), IDENTITY)
    assert dciodvfy_errors(sc, tmp_path, "sc.dcm") == []


def test_sr_without_body_part(tmp_path: Path) -> None:
    sr = build_sr(ct_series(body_part=False), model_result(), IDENTITY)
    assert dciodvfy_errors(sr, tmp_path, "sr.dcm") == []


# --- SC --------------------------------------------------------------------------------------


def key_hu() -> npt.NDArray[np.float32]:
    return ct_volume()[KEY]


def image_part(sc: Dataset) -> npt.NDArray[np.uint8]:
    """The key slice's pixels in the picture (inside the frame), scaled back to source rows/cols."""
    px = np.asarray(sc.pixel_array)
    layout = key_image_layout((ROWS, COLS), model_result())
    ys, xs = layout.image_box(ROWS, COLS)
    return np.asarray(px[ys, xs][:: layout.scale, :: layout.scale], dtype=np.uint8)


def test_sc_is_in_source_study_with_patient_and_new_series(tmp_path: Path) -> None:
    sources = ct_series()
    sc = build_sc(sources[KEY], key_hu(), model_result(), IDENTITY)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert back.StudyInstanceUID == sources[0].StudyInstanceUID
    assert back.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert (back.PatientName, back.PatientID, back.PatientSex) == ("Müller^Anna", "PAT-001", "F")
    assert (back.AccessionNumber, back.StudyID) == ("ACC123", "42")
    assert back.PhotometricInterpretation == "RGB" and back.BitsAllocated == 8
    assert back.pixel_array.shape == (back.Rows, back.Columns, 3)
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[KEY].SOPInstanceUID
    assert DISCLAIMER in back.SeriesDescription
    expected = result_uids(sources[0].SeriesInstanceUID, "nodule-2p5d-int8", "1.0.0", "sc")
    assert (back.SeriesInstanceUID, back.SOPInstanceUID) == (
        expected.series_instance_uid, expected.sop_instance_uid
    )
    again = build_sc(sources[KEY], key_hu(), model_result(), IDENTITY)
    assert again.SOPInstanceUID == back.SOPInstanceUID
    sr = build_sr(sources, model_result(), IDENTITY)
    assert sr.SeriesInstanceUID != back.SeriesInstanceUID and sr.SOPInstanceUID != back.SOPInstanceUID


def test_sc_validates_with_dciodvfy_with_and_without_body_part(tmp_path: Path) -> None:
    with_bp = ct_series(body_part=True)
    without_bp = ct_series(body_part=False)
    assert "BodyPartExamined" not in without_bp[KEY]
    for sources in (with_bp, without_bp):
        sc = build_sc(sources[KEY], key_hu(), model_result(), IDENTITY)
        assert dciodvfy_errors(sc, tmp_path, "sc.dcm") == []
    assert build_sc(with_bp[KEY], key_hu(), model_result(), IDENTITY).BodyPartExamined == "CHEST"


def test_sc_heatmap_changes_pixels_only_where_hot() -> None:
    sources = ct_series()
    plain = image_part(build_sc(sources[KEY], key_hu(), model_result(heatmap=False), IDENTITY))
    heated = image_part(build_sc(sources[KEY], key_hu(), model_result(heatmap=True), IDENTITY))
    # without a heat map the image is exactly the grey lung window
    grey = apply_window(key_hu(), -600.0, 1500.0)
    assert np.array_equal(plain, np.repeat(grey[..., None], 3, axis=-1))
    diff = np.abs(heated.astype(int) - plain.astype(int)).sum(axis=-1)
    assert diff[HOT] > 60  # the hot spot is visibly coloured
    assert np.all(diff[hot_heatmap() < 0.2] == 0)  # cold regions are untouched
    r, g, b = heated[HOT].astype(int)
    assert r > b  # hot end of the colour map is red


def test_sc_coarse_heatmap_is_resized() -> None:
    coarse = hot_heatmap()[::4, ::4].copy()
    result = model_result()
    result = ModelResult(**{**result.__dict__, "heatmap": coarse})
    img = render_key_image(key_hu(), result)
    assert img.shape[1] >= 512 and img.shape[2] == 3


def test_sc_banner_differs_between_present_and_absent() -> None:
    sources = ct_series()
    pos = np.asarray(build_sc(sources[KEY], key_hu(), model_result(0.93), IDENTITY).pixel_array)
    neg = np.asarray(build_sc(sources[KEY], key_hu(), model_result(0.10), IDENTITY).pixel_array)
    banner_rows = pos.shape[0] - ROWS * (pos.shape[1] // COLS)
    assert banner_rows >= 40  # three readable lines of text
    banner_pos, banner_neg = pos[:banner_rows], neg[:banner_rows]
    assert (banner_pos.max(axis=-1) > 200).sum() > 500  # plenty of bright text pixels
    assert not np.array_equal(banner_pos, banner_neg)
    # the finding line is red when present, green when absent
    red = (banner_pos[..., 0] > 200) & (banner_pos[..., 1] < 120)
    green = (banner_neg[..., 1] > 200) & (banner_neg[..., 0] < 160)
    assert red.sum() > 50 and green.sum() > 50


def test_sc_to_png_roundtrip(tmp_path: Path) -> None:
    sc = build_sc(ct_series()[KEY], key_hu(), model_result(), IDENTITY)
    out = sc_to_png(sc, tmp_path / "key.png")
    with Image.open(out) as im:
        assert im.size == (sc.Columns, sc.Rows) and im.mode == "RGB"
        assert np.array_equal(np.asarray(im), sc.pixel_array)


def test_window_and_colormap() -> None:
    w = apply_window(np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0]), -600.0, 1500.0)
    assert list(w) == [0, 0, 128, 255, 255]
    cm = colormap(np.array([0.0, 0.5, 1.0]))
    assert cm.shape == (3, 3)
    assert cm[0, 2] > cm[0, 0]  # cold is blue
    assert cm[2, 0] > cm[2, 2]  # hot is red


def test_sr_and_sc_from_series_written_by_training_dicom_writer(tmp_path: Path) -> None:
    """Sources as the node sees them: Part 10 files on disk, headers read without pixels."""
    writer = pytest.importorskip("medclf_node.synthetic.dicom_writer")
    vol = ct_volume()
    paths = writer.write_ct_series(
        vol, (2.5, 5.0, 5.0), tmp_path / "ct", patient_id="PAT-002", patient_name="Müller^Anna",
        accession_number="ACC9",
    )
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    for ds in headers:
        del ds.BodyPartExamined  # the BodyPartExamined-less case, on realistic files
    sr = build_sr(headers, model_result(), IDENTITY)
    sc = build_sc(headers[KEY], vol[KEY], model_result(), IDENTITY)
    assert dciodvfy_errors(sr, tmp_path, "sr.dcm") == []
    assert dciodvfy_errors(sc, tmp_path, "sc.dcm") == []
    back = hd.sr.srread(tmp_path / "sr.dcm")
    assert back.PatientName == "Müller^Anna" and back.AccessionNumber == "ACC9"
    assert {e[2] for e in back.get_evidence()} == {h.SOPInstanceUID for h in headers}
    assert pydicom.dcmread(tmp_path / "sc.dcm").StudyInstanceUID == headers[0].StudyInstanceUID


@pytest.mark.parametrize(("probability", "answer"), [(0.5, "Present"), (0.4999, "Absent")])
def test_sr_threshold_boundary_is_inclusive(probability: float, answer: str) -> None:
    group = measurement_groups(build_sr(ct_series(), model_result(probability), IDENTITY))[0]
    assert evaluation_of(group)[2] == answer


def test_warm_up_builds_both_objects() -> None:
    from medclf_node.reporting import warm_up

    assert warm_up() > 0.0
    assert warm_up() > 0.0  # idempotent, no state left behind
