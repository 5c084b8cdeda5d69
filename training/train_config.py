"""Training run configuration (TOML -> pydantic): model, preprocessing, data, fit, evaluation, export.

One file describes a whole experiment so `train`, `cv`, `evaluate` and `export` all read the same
choices; unknown keys are errors, as in the node's config.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medclf_node.inference.manifest import Aggregation, CodeSpec
from medclf_node.preprocess import PreprocessSpec
from training.data.augment import AugmentConfig
from training.modeling.config import ModelConfig

log = logging.getLogger(__name__)

Precision = Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]
StrategyName = Literal["auto", "default", "mirrored", "multi_worker"]
ExportMode = Literal["saved_model", "fp32", "fp16", "dynamic", "int8", "qat_int8"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSection(_Section):
    """Where the examples come from."""

    tfrecord_dir: Path | None = Field(
        None, description="Directory of TFRecord shards written by `medclf-train convert` (relative to the file)."
    )
    shuffle_buffer: int = Field(1024, ge=1, description="tf.data shuffle buffer (examples).")
    augment: AugmentConfig | None = Field(
        default_factory=AugmentConfig,
        description="Training-time augmentation ([data.augment]: flips, rotation, contrast, brightness, "
        "elastic deformation); a strength of 0 turns an operation off.",
    )
    balance: bool = Field(False, description="Draw positive and negative training samples 50/50.")


class FitSection(_Section):
    """Optimisation settings."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1, description="Global batch size (split across replicas).")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate after warmup.")
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="Final learning rate / peak.")
    restart_epochs: float = Field(0.0, ge=0, description="> 0: cosine with warm restarts, first cycle length.")
    restart_t_mul: float = Field(2.0, ge=1)
    restart_m_mul: float = Field(1.0, gt=0, le=1)
    weight_decay: float = Field(1e-4, ge=0, description="AdamW decoupled weight decay.")
    precision: Precision = Field(
        "auto", description="auto: mixed_float16 on GPU, mixed_bfloat16 on CPU (fp16 is ~20x slower on CPU); a mixed "
        "policy is first probed with one training step in a subprocess (training/precision.py): 'auto' falls back "
        "to float32 when it fails, a forced policy is an error.",
    )
    class_weights: bool = Field(True, description="Weight classes inversely to their training frequency.")
    early_stopping_patience: int = Field(5, ge=1, description="Epochs without val AUC gain before stopping.")
    strategy: StrategyName = Field(
        "auto", description="auto: MultiWorkerMirrored if TF_CONFIG is set, Mirrored with >1 GPU, else default."
    )
    seed: int = 1234
    steps_per_epoch: int | None = Field(None, ge=1, description="Limit steps per epoch (None: whole split).")


class EvalSection(_Section):
    """Evaluation and operating point."""

    aggregation: Aggregation = Field(default_factory=lambda: Aggregation(method="topk_mean", k=3))
    threshold_rule: Literal["youden", "sensitivity"] = Field(
        "youden", description="How the threshold is picked on VALIDATION: max Youden J, or a target sensitivity."
    )
    target_sensitivity: float = Field(0.9, gt=0, le=1)
    bootstrap: int = Field(1000, ge=10, description="Bootstrap resamples for the AUC 95% CI.")
    calibration_bins: int = Field(10, ge=2)


class ExportSection(_Section):
    """What `export` writes."""

    modes: tuple[ExportMode, ...] = Field(("saved_model", "fp32", "fp16", "dynamic", "int8"), min_length=1)
    default: ExportMode = Field("int8", description="Artifact the node serves.")
    representative_samples: int = Field(64, ge=1, description="Training samples used to calibrate int8.")
    qat_epochs: int = Field(1, ge=1)
    parity_samples: int = Field(32, ge=1, description="Validation samples used for TFLite-vs-Keras checks.")
    finding: CodeSpec = Field(
        default_factory=lambda: CodeSpec(value="427359005", scheme="SCT", meaning="Pulmonary nodule")
    )
    dataset_description: str = "synthetic CT phantoms"

    @model_validator(mode="after")
    def _default_exported(self) -> ExportSection:
        if self.default not in self.modes:
            raise ValueError(f"export.default {self.default!r} must be one of export.modes {list(self.modes)}")
        return self


class PipelineSection(_Section):
    """`medclf-train pipeline`: where the data comes from and which steps run (each skipped when done)."""

    source: Literal["synth", "dicom", "luna16", "nifti"] = Field(
        "synth", description="'synth': generate phantoms; otherwise read input_dir in that format."
    )
    input_dir: Path | None = Field(None, description="Cases to read when source is not 'synth'.")
    synth_count: int = Field(40, ge=4, description="Phantoms to generate (source 'synth').")
    synth_shape: tuple[int, int, int] = Field((64, 128, 128), description="Phantom Z, Y, X voxels.")
    synth_seed: int = 0
    synth_positive_fraction: float | None = Field(None, gt=0, lt=1, description="Exact positive share (None: ~half).")
    work_dir: Path = Field(Path("work"), description="DICOM, TFRecords (unless data.tfrecord_dir) and the export.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share of patients held out as the test split.")
    run_cv: bool = Field(True, description="Run k-fold cross-validation before the final model.")
    fold: int = Field(0, ge=0, description="Validation fold of the model that is evaluated and exported.")


class TrainConfig(_Section):
    """A whole experiment."""

    name: str = Field("nodule-2p5d", description="Model name written to the manifest.")
    version: str = "0.1.0"
    output_dir: Path = Field(Path("runs"), description="Runs are written to output_dir/name (relative to the file).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    preprocess: PreprocessSpec
    data: DataSection = Field(default_factory=DataSection)
    fit: FitSection = Field(default_factory=FitSection)
    cv_folds: int = Field(5, ge=2)
    evaluate: EvalSection = Field(default_factory=EvalSection)
    export: ExportSection = Field(default_factory=ExportSection)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name


class TrainConfigError(ValueError):
    """The training config cannot be used; the message names the file and key."""


def parse_train_config(data: dict[str, object], base_dir: Path | None = None, source: str = "config") -> TrainConfig:
    """Validate a mapping; relative paths resolve against ``base_dir``.

    A ``[convert]`` table (read by `medclf-train convert`) is ignored so one experiment file serves
    every command.
    """
    data = {k: v for k, v in data.items() if k != "convert"}
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid training configuration:"]
        lines += [f"  - {'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()]
        raise TrainConfigError("\n".join(lines)) from None
    if base_dir is not None:
        upd: dict[str, object] = {}
        if not cfg.output_dir.is_absolute():
            upd["output_dir"] = (base_dir / cfg.output_dir).resolve()
        d = cfg.data.tfrecord_dir
        if d is not None and not d.is_absolute():
            upd["data"] = cfg.data.model_copy(update={"tfrecord_dir": (base_dir / d).resolve()})
        pl = cfg.pipeline
        pl_upd = {k: (base_dir / v).resolve() for k, v in (("work_dir", pl.work_dir), ("input_dir", pl.input_dir))
                  if v is not None and not v.is_absolute()}
        if pl_upd:
            upd["pipeline"] = pl.model_copy(update=pl_upd)
        w = cfg.model.weights
        if w is not None and not w.is_absolute():
            upd["model"] = cfg.model.model_copy(update={"weights": (base_dir / w).resolve()})
        cfg = cfg.model_copy(update=upd)
    return cfg


def load_train_config(path: Path) -> TrainConfig:
    """Read and validate a TOML training config."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise TrainConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise TrainConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_train_config(data, Path(path).resolve().parent, str(path))
