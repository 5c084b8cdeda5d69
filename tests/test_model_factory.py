"""Every model family builds for the preprocess spec, runs forward, and trains a step (fp32 and bf16)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medclf_node.preprocess import PreprocessSpec, Window
from training.modeling.cbam3d import cbam_block
from training.modeling.config import ModelConfig
from training.modeling.factory import build_model, model_input_shape
from training.precision import PrecisionUnsupportedError, choose_policy, probe
from training.tfenv import keras, tf
from training.train import precision_policy

WINDOWS = (Window(center=-600, width=1500),)
SPEC_25D = PreprocessSpec(mode="2.5d", windows=WINDOWS, input_shape=(32, 32), context_slices=1)
SPEC_2D_2W = PreprocessSpec(mode="2d", windows=(*WINDOWS, Window(center=40, width=400)), input_shape=(32, 32))
SPEC_3D = PreprocessSpec(mode="3d", windows=WINDOWS, input_shape=(8, 16, 16))

CASES = [
    ("cnn2d", SPEC_25D, {}),
    ("multiscale2d", SPEC_2D_2W, {}),
    ("efficientnet", SPEC_25D, {"efficientnet_variant": "B0"}),
    ("cnn3d_cbam", SPEC_3D, {}),
    ("densenet3d", SPEC_3D, {"growth_rate": 4, "block_config": (2, 2)}),
]


@pytest.mark.parametrize(("family", "spec", "extra"), CASES, ids=[c[0] for c in CASES])
def test_family_builds_and_predicts(family: str, spec: PreprocessSpec, extra: dict[str, object]) -> None:
    model = build_model(ModelConfig(family=family, base_filters=4, **extra), spec)
    assert model.input_shape[1:] == model_input_shape(spec) == (*spec.input_shape, spec.channels)
    x = np.random.default_rng(0).random((3, *model.input_shape[1:]), dtype=np.float32)
    p = model(x, training=False).numpy()
    assert p.shape == (3, 1) and p.dtype == np.float32
    assert np.all((p >= 0) & (p <= 1))
    keras.backend.clear_session()


@pytest.mark.parametrize("family", ["cnn3d_cbam", "densenet3d"])
def test_3d_nets_have_no_3d_pooling(family: str) -> None:
    model = build_model(ModelConfig(family=family, base_filters=4, growth_rate=4, block_config=(2, 2)), SPEC_3D)
    kinds = {type(layer).__name__ for layer in model.layers}
    assert not kinds & {"MaxPooling3D", "AveragePooling3D"}
    assert any(k == "Conv3D" for k in kinds)
    strided = [la for la in model.layers if type(la).__name__ == "Conv3D" and max(la.strides) > 1]
    assert strided, "downsampling must be done by strided Conv3D"
    keras.backend.clear_session()


@pytest.mark.parametrize(("family", "spec", "extra"), CASES, ids=[c[0] for c in CASES])
def test_head_pooling_selects_the_global_pool(family: str, spec: PreprocessSpec, extra: dict[str, object]) -> None:
    """``head_pooling='max'``: a global max layer feeds the head; 'avg' (default) keeps global average pooling."""
    pooled = {
        "max": ("GlobalMaxPooling2D", "GlobalMaxPooling3D"),
        "avg": ("GlobalAveragePooling2D", "GlobalAveragePooling3D"),
    }
    for how, kinds in pooled.items():
        model = build_model(ModelConfig(family=family, base_filters=4, head_pooling=how, **extra), spec)
        producer = model.get_layer("head_logit").input._keras_history.layer
        while type(producer).__name__ == "Dropout":
            producer = producer.input._keras_history.layer
        assert type(producer).__name__ in kinds, (how, type(producer).__name__)
        keras.backend.clear_session()


def test_cbam_keeps_shape_and_derives_width_from_channels() -> None:
    inp = keras.Input((4, 6, 6, 24))
    out = cbam_block(inp, reduction=8, name="t")
    m = keras.Model(inp, out)
    assert tuple(out.shape[1:]) == (4, 6, 6, 24)
    assert m.get_layer("t_mlp1").units == 3 and m.get_layer("t_mlp2").units == 24
    x = np.random.default_rng(1).random((2, 4, 6, 6, 24), dtype=np.float32)
    y = m(x).numpy()
    assert np.all(np.abs(y) <= np.abs(x) + 1e-6)  # attention only scales down (sigmoid gates)
    keras.backend.clear_session()


def test_3d_cnn_depth_follows_the_input_size() -> None:
    small = build_model(ModelConfig(family="cnn3d_cbam", base_filters=4), SPEC_3D)
    big_spec = PreprocessSpec(mode="3d", windows=WINDOWS, input_shape=(32, 64, 64))
    big = build_model(ModelConfig(family="cnn3d_cbam", base_filters=4), big_spec)
    n_cbam = lambda m: sum(1 for la in m.layers if la.name.endswith("_cbam_mlp1"))  # noqa: E731
    assert n_cbam(small) == 1 and n_cbam(big) == 3  # log2(min spatial / 4) stages
    assert big.get_layer("stage2_cbam_mlp2").units == 4 * 2**3
    keras.backend.clear_session()


def test_cbam_inplane_stages_keep_the_slices() -> None:
    """``inplane_stages=1``: stem and first stage convolve/downsample in-plane only; later stages are 3D."""
    spec = PreprocessSpec(mode="3d", windows=WINDOWS, input_shape=(8, 32, 32))
    model = build_model(ModelConfig(family="cnn3d_cbam", base_filters=4, min_feature_size=2, inplane_stages=1), spec)
    assert model.get_layer("stem_conv").kernel_size == (1, 3, 3)
    assert model.get_layer("stage0_down_conv").strides == (1, 2, 2)
    assert model.get_layer("stage0_down_conv").kernel_size == (1, 3, 3)
    assert model.get_layer("stage1_down_conv").strides == (2, 2, 2)
    assert tuple(model.get_layer("stage0_cbam_sp_mul").output.shape[1:4]) == (8, 16, 16)  # z kept
    assert tuple(model.get_layer("stage1_cbam_sp_mul").output.shape[1:4]) == (4, 8, 8)
    plain = build_model(ModelConfig(family="cnn3d_cbam", base_filters=4, min_feature_size=2), spec)
    assert plain.get_layer("stage0_down_conv").strides == (2, 2, 2)
    keras.backend.clear_session()


def test_efficientnet_stem_sees_the_inputs_unscaled(tmp_path: Path) -> None:
    """Our inputs are already in [0, 1]: keras' built-in Rescaling(1/255) is made an identity (QAT gave NaN on
    [0, 1/255] stems), also after a config round trip (a saved model); backbone weights still load by name."""
    model = build_model(ModelConfig(family="efficientnet"), SPEC_25D)
    rescalings = [la for la in model.layers if isinstance(la, keras.layers.Rescaling)]
    assert [(la.scale, la.offset) for la in rescalings] == [(1.0, 0.0)]
    x = np.random.default_rng(3).random((2, *model.input_shape[1:]), dtype=np.float32)
    np.testing.assert_array_equal(keras.Model(model.input, rescalings[0].output)(x).numpy(), x)
    clone = keras.Model.from_config(model.get_config())
    assert [la.get_config()["scale"] for la in clone.layers if isinstance(la, keras.layers.Rescaling)] == [1.0]
    path = tmp_path / "b0.weights.h5"
    model.save_weights(str(path))
    loaded = build_model(ModelConfig(family="efficientnet", weights=path), SPEC_25D)
    for name in ("stem_conv", "block3a_expand_conv", "top_bn"):
        for a, b in zip(loaded.get_layer(name).get_weights(), model.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    keras.backend.clear_session()


def test_family_and_spec_dimensionality_must_agree() -> None:
    with pytest.raises(ValueError, match="3D"):
        build_model(ModelConfig(family="densenet3d"), SPEC_25D)
    with pytest.raises(ValueError, match="2D"):
        build_model(ModelConfig(family="cnn2d"), SPEC_3D)


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize(("family", "spec"), [("cnn2d", SPEC_25D), ("cnn3d_cbam", SPEC_3D)])
def test_train_step_under_precision(family: str, spec: PreprocessSpec, precision: str) -> None:
    """One step in-process where the machine can run it; where the subprocess probe saw the policy crash
    (bf16 Conv3D backward on AVX-512-BF16 CPUs), the product must refuse or fall back instead."""
    cfg = ModelConfig(family=family, base_filters=4)
    if precision != "float32":
        verdict = probe(precision, cfg, spec)
        if not verdict.ok:
            assert choose_policy("auto", cfg, spec, gpu=False) == "float32"
            with pytest.raises(PrecisionUnsupportedError, match="fit.precision = 'mixed_bfloat16' cannot train"):
                choose_policy(precision, cfg, spec, gpu=False)
            pytest.skip(f"{precision} {family} cannot train on this CPU ({verdict.reason}); fallback checked")
    with precision_policy(precision):
        model = build_model(cfg, spec)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the block
    compute = model.get_layer("head_logit").compute_dtype
    assert compute == "float32"  # the output layer stays float32 under mixed precision
    if precision == "mixed_bfloat16":
        convs = [la for la in model.layers if "conv" in la.name]
        assert convs[0].compute_dtype == "bfloat16"
    rng = np.random.default_rng(2)
    x = rng.random((4, *model.input_shape[1:]), dtype=np.float32)
    y = np.array([[0], [1], [0], [1]], np.float32)
    before = [w.numpy().copy() for w in model.trainable_weights]
    opt = keras.optimizers.Adam(1e-2)
    with tf.GradientTape() as tape:  # one eager step: cheap, and exercises the same graph as fit()
        loss = keras.losses.binary_crossentropy(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_weights)
    opt.apply_gradients(zip(grads, model.trainable_weights, strict=True))
    assert np.all(np.isfinite(loss.numpy()))
    assert all(g is not None for g in grads)
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(before, model.trainable_weights, strict=True))
    assert model(x).dtype == tf.float32
    keras.backend.clear_session()


def test_unknown_family_is_refused_with_the_known_ones() -> None:
    """No fallback architecture: an unregistered family fails at config validation and at build time."""
    from pydantic import ValidationError

    from training.modeling.families import UnknownFamilyError, known_families

    with pytest.raises(ValidationError, match="unknown model family 'densenet2d'; registered families: cnn2d"):
        ModelConfig(family="densenet2d")
    unchecked = ModelConfig.model_construct(family="resnet3d")  # e.g. a config built without validation
    with pytest.raises(UnknownFamilyError, match="registered families: " + ", ".join(known_families())):
        build_model(unchecked, SPEC_3D)
    assert {"cnn2d", "multiscale2d", "efficientnet", "cnn3d_cbam", "densenet3d"} <= set(known_families())


def test_a_registered_family_is_built_by_its_builder() -> None:
    from training.modeling.families import register_family, unregister_family

    def tiny_dense(input_shape: tuple[int, ...], cfg: ModelConfig) -> keras.Model:
        inp = keras.Input(input_shape)
        out = keras.layers.Dense(1, activation="sigmoid", name="probability")(keras.layers.Flatten()(inp))
        return keras.Model(inp, out, name="tiny_dense")

    register_family("tiny_dense_test", 2, tiny_dense)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_family("tiny_dense_test", 2, tiny_dense)
        model = build_model(ModelConfig(family="tiny_dense_test"), SPEC_25D)
        assert model.name == "tiny_dense" and model.input_shape[1:] == (32, 32, 3)
        with pytest.raises(ValueError, match="2D but preprocess mode '3d'"):
            build_model(ModelConfig(family="tiny_dense_test"), SPEC_3D)
    finally:
        unregister_family("tiny_dense_test")
    keras.backend.clear_session()
