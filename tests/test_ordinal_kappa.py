"""Ordinal head (training.modeling.ordinal) and graded metrics (training.evaluate_multiclass)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.evaluate_multiclass import (
    confusion_matrix,
    decode,
    graded_report,
    multilabel_report,
    per_class_rates,
    plot_confusion,
    quadratic_weighted_kappa,
    youden_threshold,
)


def test_qwk_known_values() -> None:
    y = np.array([0, 1, 2, 3, 4] * 4)
    assert quadratic_weighted_kappa(y, y, 5) == pytest.approx(1.0)
    # worked example: truth [0,1,2], prediction [0,2,2] -> O=[[1,0,0],[0,0,1],[0,0,1]]
    # w=[[0,.25,1],[.25,0,.25],[1,.25,0]]; sum wO = .25; E=outer([1,1,1],[1,0,2])/3; sum wE = 2/3+1/4+1/3
    assert quadratic_weighted_kappa([0, 1, 2], [0, 2, 2], 3) == pytest.approx(1 - 0.25 / 1.25)
    # a one-grade miss costs less than a four-grade miss
    near = quadratic_weighted_kappa(y, np.clip(y + 1, 0, 4), 5)
    far = quadratic_weighted_kappa(y, 4 - y, 5)
    assert 0 < near < 1 and far < 0


def test_per_class_rates_confusion_decode() -> None:
    m = confusion_matrix([0, 0, 1, 2], [0, 1, 1, 2], 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    r = per_class_rates([0, 0, 1, 2], [0, 1, 1, 2], 3)
    assert r[0]["sensitivity"] == 0.5 and r[1]["specificity"] == pytest.approx(2 / 3)
    p = np.array([[0.4, 0.3, 0.3], [0.1, 0.2, 0.7]])
    assert decode(p).tolist() == [0, 2] and decode(p, "expected").tolist() == [1, 2]


def test_graded_report_and_plot(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 20)
    good = np.eye(5)[y] * 0.8 + 0.04
    noisy = rng.dirichlet(np.ones(5), len(y))
    a, b = graded_report(y, good, n_boot=100), graded_report(y, noisy, n_boot=100)
    assert a["qwk"] == pytest.approx(1.0) and a["referable_auc"] == pytest.approx(1.0)
    assert b["qwk_ci95"][0] <= b["qwk"] <= b["qwk_ci95"][1] and b["qwk"] < 0.5
    png = plot_confusion(a["confusion"], [str(k) for k in range(5)], tmp_path / "c.png", "t")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_multilabel_report_and_threshold() -> None:
    y = np.array([[0, 1], [1, 0], [1, 1], [0, 0]])
    p = np.array([[0.1, 0.9], [0.8, 0.2], [0.7, 0.6], [0.2, 0.1]])
    t = [youden_threshold(y[:, j], p[:, j]) for j in range(2)]
    assert t[0] == pytest.approx(0.45) and t[1] == pytest.approx(0.4)
    r = multilabel_report(y, p, t, ["a", "b"], n_boot=20)
    assert r["a"]["auc"] == 1.0 and r["a"]["sensitivity"] == 1.0 and r["b"]["specificity"] == 1.0


def test_ordinal_head_gives_ordered_probabilities_and_exports_int8() -> None:
    pytest.importorskip("tensorflow")
    from medclf_node.inference.runtime import LiteRTRuntime
    from medclf_node.preprocess import PreprocessSpec
    from training.export.tflite import convert
    from training.modeling.config import ModelConfig
    from training.modeling.factory import build_model
    from training.modeling.ordinal import expected_grade, ordinal_loss
    from training.tfenv import keras, tf

    spec = PreprocessSpec(mode="image", input_shape=(32, 32), color="rgb", normalization="unit")
    with pytest.raises(ValueError, match="classes >= 3"):
        ModelConfig(family="multiscale2d", head="ordinal", classes=2)
    model = build_model(ModelConfig(family="multiscale2d", base_filters=4, head="ordinal", classes=5), spec)
    x = np.random.default_rng(1).random((8, 32, 32, 3), dtype=np.float32)
    p = model(x).numpy()
    assert p.shape == (8, 5) and np.all(p >= 0) and np.allclose(p.sum(1), 1.0, atol=1e-5)
    head = model.get_layer("probability")
    cut = head.cutpoints().numpy()
    assert np.all(np.diff(cut) > 0)  # ordered by construction
    # the loss is the NLL of the true grade
    y = np.array([0, 1, 2, 3, 4, 0, 1, 2])
    loss = ordinal_loss(tf.constant(y), tf.constant(p)).numpy()
    assert loss == pytest.approx(-np.log(p[np.arange(8), y]), rel=1e-5)
    assert expected_grade(np.eye(5)[[0, 4]]).tolist() == [0.0, 4.0]
    # int8 export keeps the ordinal head in float and stays close to Keras
    flat = convert(model, "int8", x)
    path = Path(__import__("tempfile").mkdtemp()) / "m.tflite"
    path.write_bytes(flat)
    q = LiteRTRuntime(path, threads=1).predict(x)
    assert q.shape == (8, 5) and np.allclose(q.sum(1), 1.0, atol=1e-4) and np.abs(q - p).max() < 0.1
    keras.backend.clear_session()


def test_efficientnet_transfer_family_takes_an_image_spec_and_ordinal_head(tmp_path: Path) -> None:
    """The EfficientNet alternative: weights only from a local file (no download), same ordinal head."""
    pytest.importorskip("tensorflow")
    from medclf_node.preprocess import PreprocessSpec
    from training.modeling.config import ModelConfig
    from training.modeling.factory import build_model
    from training.tfenv import keras

    spec = PreprocessSpec(mode="image", input_shape=(32, 32), color="rgb", normalization="unit")
    model = build_model(ModelConfig(family="efficientnet", head="ordinal", classes=5), spec)
    assert model.output_shape == (None, 5)
    path = tmp_path / "b0.weights.h5"
    model.save_weights(str(path))
    again = build_model(ModelConfig(family="efficientnet", head="ordinal", classes=5, weights=path), spec)
    w0, w1 = model.get_layer("stem_conv").get_weights()[0], again.get_layer("stem_conv").get_weights()[0]
    np.testing.assert_array_equal(w0, w1)
    with pytest.raises(FileNotFoundError):
        build_model(ModelConfig(family="efficientnet", weights=tmp_path / "missing.h5"), spec)
    keras.backend.clear_session()
