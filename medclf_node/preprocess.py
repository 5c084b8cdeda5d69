"""THE one implementation of preprocessing, shared by the node and the training package.

numpy/scipy only, no TensorFlow.  A :class:`PreprocessSpec` travels inside every model
manifest, so a model is always fed exactly the pixels it was trained on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Window(BaseModel):
    """An HU window; each window becomes one channel scaled to [0, 1]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    center: float
    width: float = Field(gt=0)


class PreprocessSpec(BaseModel):
    """How a volume in HU becomes model input.

    ``mode``:
      * ``"2d"``: one slice -> (rows, cols, channels) with channels = windows.
      * ``"2.5d"``: one slice with ``context_slices`` neighbours on each side, one window ->
        channels = 2 * context_slices + 1 (with several windows: slices x windows, slice-major).
      * ``"3d"``: the whole (resampled) volume cropped/padded to ``input_shape`` (z, y, x), channels = windows.
    ``target_spacing`` is (slice, row, column) mm; None keeps the source spacing.  For 2D modes
    only the in-plane part is used unless ``resample_z`` is set.
    ``input_shape`` is (rows, cols) for 2D modes and (slices, rows, cols) for 3D.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["2d", "2.5d", "3d"]
    windows: tuple[Window, ...] = Field(min_length=1)
    input_shape: tuple[int, ...]
    target_spacing: tuple[float, float, float] | None = None
    resample_z: bool = False
    context_slices: int = Field(0, ge=0)
    normalization: Literal["window01", "zscore"] = "window01"
    pad_value_hu: float = -1024.0

    @model_validator(mode="after")
    def _check(self) -> PreprocessSpec:
        want = 3 if self.mode == "3d" else 2
        if len(self.input_shape) != want or any(s < 1 for s in self.input_shape):
            raise ValueError(f"input_shape must have {want} positive entries for mode {self.mode!r}")
        if self.mode != "2.5d" and self.context_slices:
            raise ValueError("context_slices is only meaningful for mode '2.5d'")
        return self

    @property
    def channels(self) -> int:
        if self.mode == "2.5d":
            return (2 * self.context_slices + 1) * len(self.windows)
        return len(self.windows)
