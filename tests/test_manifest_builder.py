"""One manifest builder (training.export.manifest_builder) for every recipe and for `medclf-train export`.

The package version comes from the installed distribution's metadata (it used to be the model's
version, 1.0.0, in both recipes); each writer is checked to go through the builder by replacing
the version source and seeing the change in its manifest.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from medclf_node.inference.manifest import Aggregation, Artifact, Manifest, load_manifest
from training.export import manifest_builder

SHA = "0" * 64
ROOT = Path(__file__).resolve().parent.parent


def _manifests() -> dict[str, Manifest]:
    from training.export.bundle import build_manifest as bundle_manifest
    from training.recipes.default_models import FP32_FILE, INT8_FILE, manifest_2p5d
    from training.recipes.model_3d import FP16_FILE, SAVED_MODEL_DIR, _manifest
    from training.train_config import TrainConfig

    two = [Artifact(path=INT8_FILE, format="tflite", precision="int8", sha256=SHA, input_dtype="int8"),
           Artifact(path=FP32_FILE, format="tflite", precision="fp32", sha256=SHA)]
    three = [Artifact(path=FP16_FILE, format="tflite", precision="fp16", sha256=SHA),
             Artifact(path=SAVED_MODEL_DIR, format="saved_model", precision="fp32", sha256=SHA)]
    from training.recipes.default_models import SPEC

    cfg = TrainConfig(name="m", output_dir=Path("/tmp/x"), preprocess=SPEC)
    return {
        "2.5d": manifest_2p5d(artifacts=two, threshold=0.4, aggregation=Aggregation(method="max"),
                              metrics={"auc": 0.9, "nan": float("nan")}, command="c", seed_offset=0,
                              size_name="tiny"),
        "3d": _manifest(three, 0.3, {"auc": 0.8}, "c", 0, "tiny"),
        "export": bundle_manifest(cfg, two[1:], FP32_FILE, 1.5, {"auc": 0.7}),
    }


def test_package_version_is_the_distributions() -> None:
    assert manifest_builder.package_version() == metadata.version("medclf-node")


def test_every_writer_goes_through_the_one_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, man in _manifests().items():
        assert man.training_package_version == metadata.version("medclf-node"), name
    monkeypatch.setattr(manifest_builder, "package_version", lambda: "9.9.9-probe")
    for name, man in _manifests().items():
        assert man.training_package_version == "9.9.9-probe", name
        assert all(v == v for v in man.metrics.values()), name  # NaN dropped by the builder
    m = _manifests()
    assert m["2.5d"].input.dtype == "int8" and m["2.5d"].input.layout == "NHWC"  # from the default artifact
    assert m["3d"].input.layout == "NDHWC" and m["3d"].sliding_window.enabled
    assert m["export"].threshold == 1.0  # clipped to [0, 1]


def test_update_keeps_everything_but_the_changes() -> None:
    man = _manifests()["3d"]
    new = manifest_builder.update_manifest(man, metrics={"auc": 0.5, "bad": float("inf")}, threshold=0.7)
    assert new.metrics == {"auc": 0.5} and new.threshold == 0.7
    assert new.model_dump(exclude={"metrics", "threshold"}) == man.model_dump(exclude={"metrics", "threshold"})


def test_no_other_manifest_constructor_in_training() -> None:
    """Manifest(...) is built in one place only (the builder validates through parse_manifest)."""
    offenders = [p for p in (ROOT / "training").rglob("*.py")
                 if "Manifest(" in p.read_text(encoding="utf-8").replace("update_manifest(", "")
                 .replace("build_manifest(", "").replace("load_manifest(", "").replace("write_manifest(", "")
                 .replace("parse_manifest(", "")]
    assert offenders == []


@pytest.mark.parametrize("model_dir", sorted(p.parent for p in (ROOT / "models").glob("*/manifest.json")),
                         ids=lambda p: p.name)
def test_shipped_manifests_carry_the_package_version(model_dir: Path) -> None:
    assert load_manifest(model_dir).training_package_version == metadata.version("medclf-node")
