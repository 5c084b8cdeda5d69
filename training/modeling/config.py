"""Model configuration: which architecture to build and its width/depth knobs.

The input shape and channel count never appear here: they come from the preprocess spec, so a
model is always built for exactly the tensors the data pipeline (and the node) produce.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from training.modeling.families import get_family

#: A registered family name (training.modeling.families); validated against the registry, not a fixed list.
ModelFamily = str


class ModelConfig(BaseModel):
    """Architecture choice and its hyper-parameters (TOML table ``[model]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: ModelFamily = Field("cnn2d", description="Architecture family: a name registered in "
                                "training.modeling.families (an unknown one is refused with the known list).")
    efficientnet_variant: Literal["B0", "B1", "B2", "B3"] = Field(
        "B0", description="EfficientNet size (family 'efficientnet' only)."
    )
    weights: Path | None = Field(
        None,
        description="Local weights file (.h5) for the EfficientNet backbone, loaded by layer name; layers "
        "whose shapes differ (e.g. the stem when channels != 3) keep their random init.",
    )
    base_filters: int = Field(16, ge=1, description="Filters of the first stage (cnn2d, multiscale2d, cnn3d_cbam).")
    max_stages: int = Field(5, ge=1, le=8, description="Upper bound on the number of stride-2 stages.")
    min_feature_size: int = Field(
        4, ge=1, description="Stop adding stride-2 stages when the smallest spatial size reaches this."
    )
    inplane_stages: int = Field(
        0,
        ge=0,
        description="cnn3d_cbam: leading stages (and the stem) that convolve and downsample in-plane only "
        "(1x3x3 kernels, 1x2x2 strides), for volumes whose slices are thicker than their pixels (as nnU-Net "
        "does for anisotropic data); later stages are fully 3D.",
    )
    cbam_reduction: int = Field(8, ge=1, description="Channel-attention MLP reduction ratio (cnn3d_cbam).")
    growth_rate: int = Field(32, ge=1, description="DenseNet growth rate k (densenet3d).")
    block_config: tuple[int, ...] = Field(
        (6, 12, 24, 16), min_length=1, description="Dense layers per block; (6,12,24,16) is DenseNet-121."
    )
    compression: float = Field(0.5, gt=0, le=1, description="DenseNet transition compression.")
    head_pooling: Literal["avg", "max"] = Field(
        "avg",
        description="Global pooling before the output: 'avg' for findings that fill the image, 'max' for small "
        "objects such as nodules (the strongest position decides, as in multiple-instance learning).",
    )
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout before the output layer.")
    head: Literal["binary", "softmax", "ordinal", "multilabel"] = Field(
        "binary",
        description="Output layer: 'binary' one sigmoid (P(finding)); 'softmax' one probability per class; 'ordinal' "
        "one score through ordered cut-points to per-class probabilities (cumulative link, for graded scales such as "
        "DR 0-4); 'multilabel' one independent sigmoid per finding.",
    )
    classes: int = Field(1, ge=1, description="Classes (softmax, ordinal) or findings (multilabel); 1 for binary.")

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        get_family(v)  # UnknownFamilyError (a ValueError) lists the registered families
        return v

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.head == "binary" and self.classes != 1:
            raise ValueError("model.classes must be 1 for head 'binary'")
        if self.head in ("softmax", "ordinal") and self.classes < (3 if self.head == "ordinal" else 2):
            raise ValueError(f"model.head {self.head!r} needs classes >= {3 if self.head == 'ordinal' else 2}")
        if self.weights is not None and self.family != "efficientnet":
            raise ValueError("model.weights is only supported for family 'efficientnet'")
        return self

    @property
    def dims(self) -> int:
        """2 for slice classifiers, 3 for volume classifiers."""
        return get_family(self.family).dims
