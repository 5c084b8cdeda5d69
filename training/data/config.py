"""Configuration of `medclf-train convert` (TOML -> pydantic).

The preprocessing spec is the node's own :class:`~medclf_node.preprocess.PreprocessSpec`; it is
written into the dataset summary and, later, into the model manifest, so the node feeds a
model exactly the pixels it was trained on.  A TOML file holds ``[preprocess]`` (with
``[[preprocess.windows]]``) and an optional ``[convert]`` table; other tables are ignored so
one experiment file can serve every command.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medclf_node.preprocess import PreprocessSpec

log = logging.getLogger(__name__)


class ConvertConfigError(ValueError):
    """The convert configuration cannot be used; the message names the file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleSection(_Section):
    """How a case becomes samples."""

    negative_slice_stride: int = Field(
        1, ge=1, description="2D/2.5D: keep every n-th negative slice (positives are always kept)."
    )
    batch_slices: int = Field(64, ge=1, description="2D/2.5D: slices preprocessed at once (bounds memory).")
    window_stride: int | None = Field(
        None, ge=1, description="3D: sliding-window step in preprocessed slices (None: half the window depth)."
    )
    positive_windows_per_candidate: int = Field(
        2, ge=0, description="3D: extra windows centred (with jitter) on each positive candidate."
    )
    positive_jitter: int = Field(2, ge=0, description="3D: max random shift (slices) of candidate-centred windows.")
    skip_unlabelled: bool = Field(True, description="Skip cases without a usable label (else it is an error).")


class ConvertSection(_Section):
    samples: SampleSection = Field(default_factory=SampleSection)
    shards: int = Field(8, ge=1, description="Number of TFRecord shards (patients are hashed into them).")
    compression: Literal["", "GZIP"] = Field("", description="TFRecord compression.")
    seed: int = Field(0, description="Seed for candidate-window jitter.")


class ConvertConfig(_Section):
    preprocess: PreprocessSpec
    convert: ConvertSection = Field(default_factory=ConvertSection)


def parse_convert_config(data: dict[str, object], source: str = "config") -> ConvertConfig:
    picked = {k: data[k] for k in ("preprocess", "convert") if k in data}
    try:
        return ConvertConfig.model_validate(picked)
    except ValidationError as exc:
        lines = [f"{source}: invalid convert configuration:"]
        lines += [f"  - {'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()]
        raise ConvertConfigError("\n".join(lines)) from None


def load_convert_config(path: Path) -> ConvertConfig:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConvertConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConvertConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_convert_config(data, str(path))
