"""Issue 17, node side: manifest schema v2, 2D image decoding and preprocessing, per-image inference
with a series summary, and the multiclass / multilabel / binary SR and SC read back (highdicom,
dciodvfy 0 errors 0 warnings)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medclf_node.config import LimitsSection, RuleSection
from medclf_node.domain import Image2D, NodeIdentity, SliceRef
from medclf_node.inference.manifest import ManifestError, load_manifest, parse_manifest, write_manifest
from medclf_node.inference.predict_image import decode_class, predict_images
from medclf_node.inference.registry import ModelLoadError, load_model
from medclf_node.ingest.image2d import ImageError, image_from_dataset, read_image
from medclf_node.ingest.selection import Selection, header_from_dataset, read_headers, select
from medclf_node.preprocess import PreprocessSpec, image_input
from medclf_node.reporting.sc_image import build_image_sc
from medclf_node.reporting.sr_image import build_image_sr
from tests.fixtures_image_models import FINDING_A, FINDING_B, GRADES, coloured, image_models_dir, op_image

__all__ = ["image_models_dir"]

IDENTITY = NodeIdentity(ae_title="MEDCLF", device_name="medclf-test", institution_name="Test Hospital")
REPO = Path(__file__).resolve().parent.parent


# --- manifest v2 ---------------------------------------------------------------------------


def _manifest_data(image_models_dir: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((image_models_dir / name / "manifest.json").read_text())
    return data


@pytest.mark.parametrize("change, key", [
    (lambda d: d.update(schema_version=1), "task"),
    (lambda d: d.update(classes=d["classes"][:1]), "classes"),
    (lambda d: d.update(ordinal=False, decoding="expected"), "decoding"),
    (lambda d: d.update(positive_classes=[7]), "positive_classes"),
    (lambda d: d.update(findings=[{"code": GRADES[0].model_dump()}]), "findings"),
    (lambda d: d["input"].update(kind="volume"), "input.kind"),
    (lambda d: d["input"].update(shape=[32, 32, 1]), "input.shape"),
    (lambda d: d["preprocessing"].update(normalization="window01"), "normalization"),
    (lambda d: d["preprocessing"].update(windows=[{"center": 40, "width": 400}]), "windows"),
    (lambda d: d["classes"][0].update(colour="red"), "classes[0].colour"),
])
def test_v2_manifest_errors_name_the_key(image_models_dir: Path, change: Any, key: str) -> None:
    data = _manifest_data(image_models_dir, "test-dr-grade")
    parse_manifest(data)  # the original is valid
    change(data)
    with pytest.raises(ManifestError) as err:
        parse_manifest(data, "dr/manifest.json")
    assert key in str(err.value) and "dr/manifest.json" in str(err.value)


def test_multilabel_manifest_needs_findings(image_models_dir: Path) -> None:
    data = _manifest_data(image_models_dir, "test-findings")
    data["findings"] = []
    with pytest.raises(ManifestError, match="findings"):
        parse_manifest(data)


@pytest.mark.parametrize("model", ["nodule-2p5d-int8", "nodule-3d-cbam"])
def test_v1_manifests_load_and_write_back_byte_for_byte(model: str, tmp_path: Path) -> None:
    src = REPO / "models" / model / "manifest.json"
    man = load_manifest(src.parent)
    assert man.schema_version == 1 and man.kind == "binary" and man.input.kind == "volume"
    write_manifest(man, tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text()) == json.loads(src.read_text())


def test_registry_refuses_an_artifact_with_the_wrong_number_of_outputs(image_models_dir: Path,
                                                                        tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(image_models_dir / "test-dr-grade", d)
    data = json.loads((d / "manifest.json").read_text())
    data["classes"] = data["classes"][:4]
    data["positive_classes"] = [2, 3]
    (d / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=r"classes: the manifest names 4 .* 5 output"):
        load_model(d)


def test_registry_refuses_a_multiclass_volume_model_it_cannot_report(tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(REPO / "models" / "nodule-2p5d-int8", d)
    data = json.loads((d / "manifest.json").read_text())
    code = data["labels"]["finding"]
    data.update(schema_version=2, task="multiclass", classes=[{"code": code}, {"code": {**code, "value": "2"}}])
    (d / "manifest.json").write_text(json.dumps(data))
    assert load_manifest(d).kind == "multiclass"  # a valid manifest...
    with pytest.raises(ModelLoadError, match="task: 'multiclass' is served for input.kind 'image' only"):
        load_model(d)  # ...that this node does not serve


# --- decoding and preprocessing ------------------------------------------------------------


def _testfile(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None
    return Path(str(path))


@pytest.mark.parametrize("name", ["SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                                  "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_small_odd.dcm"])
def test_colour_encodings_decode_to_rgb(name: str) -> None:
    img = read_image(_testfile(name), LimitsSection())
    assert img.pixels.dtype == np.float32 and img.is_colour
    assert float(img.pixels.min()) >= 0.0 and float(img.pixels.max()) <= 1.0
    if name != "SC_rgb_small_odd.dcm":  # pydicom's SC_rgb_* images: a red band on top, a blue one lower
        np.testing.assert_allclose(img.pixels[0, 0], [1.0, 0.0, 0.0], atol=0.03)


def test_jpeg_ybr_full_422_op_image_comes_back_as_its_rgb(tmp_path: Path) -> None:
    rgb = coloured((0.7, 0.35, 0.1), size=48, seed=3)
    path = op_image(tmp_path / "op.dcm", rgb, study_uid=generate_uid(), series_uid=generate_uid())
    assert pydicom.dcmread(path).PhotometricInterpretation == "YBR_FULL_422"
    img = read_image(path, LimitsSection())
    np.testing.assert_allclose(img.pixels.reshape(-1, 3).mean(axis=0), [0.7, 0.35, 0.1], atol=0.02)


def _native(pixels: np.ndarray, photometric: str, planar: int | None = None, **extra: Any) -> Dataset:
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.BitsAllocated = ds.BitsStored = 8 if pixels.dtype == np.uint8 else 16
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if planar is not None:
        ds.PlanarConfiguration = planar
        data = np.moveaxis(pixels, 2, 0) if planar == 1 else pixels
        ds.PixelData = np.ascontiguousarray(data).tobytes()
    else:
        ds.PixelData = pixels.tobytes()
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_planar_configurations(planar: int, tmp_path: Path) -> None:
    px = np.zeros((4, 6, 3), np.uint8)
    px[..., 0], px[..., 1], px[..., 2] = 255, 128, 0
    img = image_from_dataset(_native(px, "RGB", planar), tmp_path / "x.dcm", LimitsSection())
    np.testing.assert_allclose(img.pixels[2, 3], [1.0, 128 / 255, 0.0], atol=1e-6)


def test_monochrome1_is_inverted_and_the_voi_window_applies(tmp_path: Path) -> None:
    px = np.array([[0, 1000], [2000, 4000]], np.uint16)
    m2 = image_from_dataset(_native(px, "MONOCHROME2", WindowCenter=2000, WindowWidth=4001), tmp_path / "a",
                            LimitsSection())
    m1 = image_from_dataset(_native(px, "MONOCHROME1", WindowCenter=2000, WindowWidth=4001), tmp_path / "b",
                            LimitsSection())
    assert m2.pixels.shape == (2, 2, 1)
    np.testing.assert_allclose(m2.pixels[..., 0], [[0.0, 0.25], [0.5, 1.0]], atol=1e-3)
    np.testing.assert_allclose(m1.pixels[..., 0], 1.0 - m2.pixels[..., 0], atol=1e-6)
    no_window = image_from_dataset(_native(px, "MONOCHROME2"), tmp_path / "c", LimitsSection())
    np.testing.assert_allclose(no_window.pixels[..., 0], [[0.0, 0.25], [0.5, 1.0]], atol=1e-6)


def test_palette_colour_and_oversized_images_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as err:
        read_image(_testfile("examples_palette.dcm"), LimitsSection())
    assert err.value.code == "unsupported_photometric" and "PALETTE COLOR" in err.value.message
    px = np.zeros((64, 64), np.uint8)
    with pytest.raises(ImageError) as big:
        image_from_dataset(_native(px, "MONOCHROME2"), tmp_path / "x", LimitsSection(max_frame_pixels=1000))
    assert big.value.code == "too_large"


def test_a_lying_jpeg_header_is_refused_before_decoding(tmp_path: Path) -> None:
    path = op_image(tmp_path / "op.dcm", coloured((0.5, 0.5, 0.5), size=32), study_uid=generate_uid(),
                    series_uid=generate_uid())
    ds = pydicom.dcmread(path)
    ds.Rows = 16  # the JPEG codestream still says 32
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageError) as err:
        read_image(path, LimitsSection())
    assert err.value.code == "codec_mismatch"


def test_a_truncated_jpeg_is_a_decode_failure_not_a_crash(tmp_path: Path) -> None:
    path = op_image(tmp_path / "op.dcm", coloured((0.5, 0.5, 0.5), size=32), study_uid=generate_uid(),
                    series_uid=generate_uid())
    ds = pydicom.dcmread(path)
    frame = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1).__next__()
    ds.PixelData = pydicom.encaps.encapsulate([frame[: len(frame) // 3]])
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageError) as err:
        read_image(path, LimitsSection())
    assert err.value.code == "decode_failed"


def test_image_input_resizes_reorders_and_normalises() -> None:
    img = np.zeros((100, 50, 3), np.float32)
    img[..., 0] = 1.0  # red
    img[:50, :, 2] = 0.5
    stretch = image_input(img, PreprocessSpec(mode="image", input_shape=(20, 20), normalization="unit"))
    assert stretch.shape == (20, 20, 3)
    np.testing.assert_allclose(stretch[0, 0], [1.0, 0.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(stretch[-1, -1], [1.0, 0.0, 0.0], atol=1e-6)
    bgr = image_input(img, PreprocessSpec(mode="image", input_shape=(20, 20), normalization="unit",
                                          channel_order="bgr"))
    np.testing.assert_allclose(bgr[..., ::-1], stretch)
    pad = image_input(img, PreprocessSpec(mode="image", input_shape=(20, 20), normalization="unit", resize="pad"))
    assert float(pad[:, :5].max()) == 0.0 and float(pad[:, 15:].max()) == 0.0  # pillar-boxed: 10 wide, centred
    np.testing.assert_allclose(pad[10, 5:15, 0], 1.0)
    grey = image_input(img, PreprocessSpec(mode="image", input_shape=(10, 10), color="grey", normalization="unit"))
    assert grey.shape == (10, 10, 1)
    np.testing.assert_allclose(grey[-1, -1, 0], 0.299, atol=1e-5)
    ms = image_input(img, PreprocessSpec(mode="image", input_shape=(10, 10), normalization="mean_std",
                                         mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    np.testing.assert_allclose(ms[-1, -1], [2.0, -2.0, -2.0], atol=1e-5)


def test_ordinal_expected_decoding_differs_from_argmax(image_models_dir: Path) -> None:
    man = load_manifest(image_models_dir / "test-dr-grade")
    p = np.array([0.4, 0.0, 0.0, 0.3, 0.3])
    assert decode_class(p, man) == 0
    assert decode_class(p, man.model_copy(update={"decoding": "expected"})) == 2  # 0.9 + 1.2 = 2.1


# --- inference and reporting ---------------------------------------------------------------


def _series(tmp_path: Path, colours: list[tuple[float, float, float]], spot: int | None = None
            ) -> tuple[list[Path], list[Image2D], list[Dataset]]:
    study, series = generate_uid(), generate_uid()
    paths = [op_image(tmp_path / f"im{i}.dcm", coloured(c, seed=i, spot=(i == spot)), study_uid=study,
                      series_uid=series, laterality="RL"[i % 2], instance=i + 1) for i, c in enumerate(colours)]
    images = [read_image(p, LimitsSection()) for p in paths]
    return paths, images, [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def dciodvfy_messages(ds: Dataset, path: Path) -> list[str]:
    """dciodvfy's error and warning lines for ``ds`` as a Part 10 file."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(("Error", "Warning", "E:", "W:"))]


def _groups(sr: Dataset) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, hd.sr.MeasurementReport)
    return list(report.get_image_measurement_groups())


def _texts(item: Dataset, concept: str) -> list[str]:
    """TEXT values of content items named DCM ``concept`` anywhere below ``item``."""
    out = []
    for child in item.get("ContentSequence", []):
        if child.ValueType == "TEXT" and child.ConceptNameCodeSequence[0].CodeValue == concept:
            out.append(str(child.TextValue))
        out += _texts(child, concept)
    return out


def _answer(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> tuple[str, str]:
    (evaluation,) = group.get_qualitative_evaluations()
    value = evaluation.value
    assert isinstance(value, hd.sr.CodedConcept)
    return evaluation.name.value, value.value


@pytest.mark.parametrize("artifact", ["model_fp32.tflite", "model_int8.tflite"])
def test_multiclass_ordinal_per_image_grades_worst_grade_summary_and_sr(
        image_models_dir: Path, tmp_path: Path, artifact: str) -> None:
    model = load_model(image_models_dir / "test-dr-grade", artifact=artifact)
    # grade 2; grade 3 only because of the red spot (mean red 0.6 is grade 2, the spot lifts it to ~0.64)
    _, images, headers = _series(tmp_path, [(0.5, 0.3, 0.2), (0.6, 0.3, 0.2)], spot=1)
    result = predict_images(model, images)
    assert [o.predicted for o in result.images] == [2, 3]
    assert result.summary.predicted == 3 and result.key_image == 1 and result.summary.positive
    assert result.images[1].heatmap is not None and result.images[0].heatmap is None
    heat = result.images[1].heatmap
    assert heat is not None and float(heat.max()) > 0.2  # hiding the spot drops P(grade >= 3)
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    assert peak[0] < 32 and peak[1] < 32  # the bright red spot sits in the upper left quadrant
    sr = build_image_sr(headers, result, IDENTITY)
    groups = _groups(sr)
    assert len(groups) == 3  # two images, one summary
    for group, header, grade in zip(groups, [*headers, headers[1]], [2, 3, 3], strict=True):
        assert _answer(group) == ("4855003", GRADES[grade].value)
        probs = {m.name.value: m.value for m in group.get_measurements()}
        assert set(probs) == {g.value for g in GRADES}
        assert abs(sum(float(v) for v in probs.values()) - 1.0) < 0.02
        assert group.source_images[0].referenced_sop_instance_uid == header.SOPInstanceUID
    assert len(groups[2].source_images) == 2  # the summary cites both images, key image first
    (num,) = [m for m in groups[1].get_measurements() if m.name.value == GRADES[3].value]
    assert num.referenced_coordinates and num.referenced_coordinates[0].GraphicType == "POINT"
    assert dciodvfy_messages(sr, tmp_path / "sr.dcm") == []
    sc = build_image_sc(pydicom.dcmread(tmp_path / "im1.dcm"), images[1], result, IDENTITY)
    assert "Moderate" not in sc.ImageComments and "Severe nonproliferative" in sc.ImageComments
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == headers[1].SOPInstanceUID
    assert sc.LossyImageCompression == "01" and sc.Laterality == "L"
    assert dciodvfy_messages(sc, tmp_path / "sc.dcm") == []


def test_multilabel_one_group_per_finding_per_image_and_any_positive_summary(
        image_models_dir: Path, tmp_path: Path) -> None:
    model = load_model(image_models_dir / "test-findings")
    # image 1: red (A present), P(B) ~0.6: present at 0.5 but below its own threshold 0.7; image 3: B present
    _, images, headers = _series(tmp_path, [(0.8, 0.2, 0.52), (0.2, 0.2, 0.2), (0.2, 0.2, 0.9)])
    result = predict_images(model, images)
    present = [[f.present for f in o.findings] for o in result.images]
    assert present == [[True, False], [False, False], [False, True]]
    assert [f.present for f in result.summary.findings] == [True, True]
    sr = build_image_sr(headers, result, IDENTITY)
    groups = _groups(sr)
    assert len(groups) == 8  # 3 images x 2 findings + 2 summary groups
    answers = [_answer(g) for g in groups]
    absent, pres = "2667000", "52101004"
    assert answers == [(FINDING_A.value, pres), (FINDING_B.value, absent), (FINDING_A.value, absent),
                       (FINDING_B.value, absent), (FINDING_A.value, absent), (FINDING_B.value, pres),
                       (FINDING_A.value, pres), (FINDING_B.value, pres)]
    assert [_texts(g[0], "111002") for g in groups[:2]] == [["operating threshold=0.5"], ["operating threshold=0.7"]]
    probs = [float(m.value) for g in groups[:2] for m in g.get_measurements()]
    assert probs[0] > 0.9 and 0.5 < probs[1] < 0.7
    assert dciodvfy_messages(sr, tmp_path / "sr.dcm") == []
    k = result.key_image
    sc = build_image_sc(pydicom.dcmread(tmp_path / f"im{k}.dcm"), images[k], result, IDENTITY)
    assert dciodvfy_messages(sc, tmp_path / "sc.dcm") == []


def test_binary_grey_image_model(image_models_dir: Path, tmp_path: Path) -> None:
    model = load_model(image_models_dir / "test-binary-image")
    _, images, headers = _series(tmp_path, [(0.9, 0.9, 0.9)])
    result = predict_images(model, images)
    assert result.kind == "binary" and result.summary.positive
    sr = build_image_sr(headers, result, IDENTITY)
    groups = _groups(sr)
    assert len(groups) == 1 and _answer(groups[0]) == ("36222008", "52101004")
    assert dciodvfy_messages(sr, tmp_path / "sr.dcm") == []
    grey = Image2D(images[0].pixels.mean(axis=2, keepdims=True), images[0].ref, "MONOCHROME2", None)
    sc = build_image_sc(pydicom.dcmread(tmp_path / "im0.dcm"), grey, result, IDENTITY)
    assert sc.PhotometricInterpretation == "RGB" and "Opacity: PRESENT" in sc.ImageComments
    assert dciodvfy_messages(sc, tmp_path / "sc.dcm") == []


# --- routing -------------------------------------------------------------------------------


def test_rules_route_2d_studies_by_modality_sop_class_body_part_and_laterality(tmp_path: Path) -> None:
    paths, _, _ = _series(tmp_path, [(0.5, 0.5, 0.5), (0.5, 0.5, 0.5)])  # R and L
    headers = read_headers(paths)
    assert [h.laterality for h in headers] == ["R", "L"]
    assert headers == [header_from_dataset(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in paths]
    ct = RuleSection(name="ct", models=["m"])
    fundus = RuleSection(name="fundus", models=["dr"], modality=["OP", "XC"], body_part_examined=["EYE"],
                         sop_class_uids=["1.2.840.10008.5.1.4.1.1.77.1.5.1"], image_type_includes=["ORIGINAL"])
    right = RuleSection(name="right", models=["dr"], modality=["OP"], laterality=["R"])
    choice = select(headers, [ct, right, fundus])
    assert isinstance(choice, Selection) and choice.rule == "fundus" and len(choice.paths) == 2
    skipped = select(headers, [ct, right])
    assert "laterality L not in ['R']" in getattr(skipped, "reason", "")
    with pytest.raises(ValueError, match="laterality"):
        RuleSection(name="x", models=["m"], laterality=["left"])


def test_image_ref_is_the_sop_instance(tmp_path: Path) -> None:
    paths, images, headers = _series(tmp_path, [(0.5, 0.5, 0.5)])
    assert images[0].ref == SliceRef(str(headers[0].SOPClassUID), str(headers[0].SOPInstanceUID))
