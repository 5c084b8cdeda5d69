"""The model manifest: the one contract between the training package (writer) and the node (reader).

A model directory holds ``manifest.json`` plus its artifacts.  The manifest says what the model
finds (the codes the SR uses), how its input is built (:class:`PreprocessSpec`), how to read its
output, how per-slice scores become a series score, which threshold decides "present", and the
sha256 of every artifact so that a corrupted or swapped file is refused at start-up.

Schema 1 (the shipped CT models) knows one task: ``series_classification``, one finding
present/absent on a volume.  Schema 2 adds task kinds and input kinds:

* ``task = "binary"``: schema 1's task under its v2 name.
* ``task = "multiclass"``: a softmax over ``classes`` (each a code the SR reports); with
  ``ordinal = true`` the classes are grades in order, decoded by ``decoding`` (``argmax`` or
  ``expected``: the probability-weighted mean grade, rounded) and summarised over a study's images
  as the worst (highest) grade.  ``positive_classes`` (default: all but the first) decide the
  index's "positive" flag (e.g. referable DR = grade >= 2).
* ``task = "multilabel"``: ``findings``, one independent output unit each, each with its own code
  and threshold; summarised per finding as present when any image has it.
* ``input.kind = "volume"`` (CT/MR series, as schema 1) or ``"image"`` (one 2D image per instance:
  DX, CR, MG, OP/XC photographs; ``preprocessing.mode = "image"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medclf_node.domain import Code
from medclf_node.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 2  # the newest this node reads; 1 is still read and served unchanged
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the model directory and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_Strict):
    """A coded concept as written in JSON; ``to_code()`` gives the domain :class:`Code`."""

    value: str = Field(min_length=1)
    scheme: str = Field(min_length=1, description="Coding scheme designator, e.g. SCT, DCM.")
    meaning: str = Field(min_length=1)

    def to_code(self) -> Code:
        return Code(value=self.value, scheme=self.scheme, meaning=self.meaning)


class Labels(_Strict):
    """The finding the model scores and the qualitative values the SR reports for it."""

    finding: CodeSpec = Field(description='What is evaluated, e.g. SCT 427359005 "Pulmonary nodule".')
    positive: CodeSpec = Field(
        CodeSpec(value="52101004", scheme="SCT", meaning="Present"),
        description="Value reported when probability >= threshold.",
    )
    negative: CodeSpec = Field(
        CodeSpec(value="2667000", scheme="SCT", meaning="Absent"),
        description="Value reported when probability < threshold.",
    )


class InputSpec(_Strict):
    """The model input without the batch axis: (rows, cols, channels) or (slices, rows, cols, channels).

    ``kind``: ``volume`` (a series assembled into a volume, as schema 1) or ``image`` (each
    instance is one 2D image, schema 2 only)."""

    kind: Literal["volume", "image"] = "volume"
    shape: tuple[int, ...]
    layout: Literal["NHWC", "NDHWC"]
    dtype: Literal["float32", "int8", "uint8"] = Field(
        "float32",
        description="Input dtype of the default artifact as seen by the runtime (quantisation is "
        "handled by the runtime from the tensor's scale/zero point; per artifact: artifacts[].input_dtype).",
    )

    @model_validator(mode="after")
    def _check(self) -> InputSpec:
        want = 3 if self.layout == "NHWC" else 4
        if len(self.shape) != want or any(s < 1 for s in self.shape):
            raise ValueError(f"shape needs {want} positive entries (no batch axis) for layout {self.layout}")
        return self


class OutputSpec(_Strict):
    """How to turn the raw output tensor into P(finding present)."""

    kind: Literal["probability", "logit"] = Field(
        "probability",
        description="'probability': already sigmoid/softmax; 'logit': the node applies sigmoid "
        "(one unit) or softmax (several units).",
    )
    positive_index: int = Field(0, ge=0, description="Index of the positive class in the last axis.")


class ClassSpec(_Strict):
    """One class of a multiclass model, in output-unit order: the code the SR reports for it."""

    code: CodeSpec


class FindingSpec(_Strict):
    """One finding of a multilabel model, in output-unit order, with its own operating point."""

    code: CodeSpec = Field(description="What is evaluated, e.g. SCT 60046008 \"Pleural effusion\".")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Present when P(finding) >= threshold.")


class Aggregation(_Strict):
    """How per-slice scores of a 2D/2.5D model become the series score."""

    method: Literal["max", "topk_mean"] = "max"
    k: int = Field(1, ge=1, description="Number of top slice scores averaged by 'topk_mean'.")


class SlidingWindow(_Strict):
    """For 3D models on series longer than the input depth: windows along z, series score = max."""

    enabled: bool = False
    stride: int = Field(1, ge=1, description="Window step in (preprocessed) slices.")


class Artifact(_Strict):
    """One exported form of the model, relative to the model directory."""

    path: str = Field(description="Relative POSIX path inside the model directory; no '..'.")
    format: Literal["tflite", "saved_model"]
    precision: Literal["fp32", "fp16", "int8", "dynamic"]
    sha256: str = Field(description="Hex sha256 of the file; for a saved_model directory see sha256_path().")
    input_dtype: Literal["float32", "int8", "uint8"] = "float32"

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        p = PurePosixPath(v)
        if not v or p.is_absolute() or ".." in p.parts or "\\" in v or v.startswith("~"):
            raise ValueError("must be a relative path inside the model directory without '..'")
        return str(p)

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        v = v.lower()
        if not _SHA_RE.match(v):
            raise ValueError("must be 64 lowercase hex digits")
        return v


class Provenance(_Strict):
    """Where the training data came from and how to reproduce the model."""

    dataset: str = Field(description="Human description of the training data, e.g. 'synthetic CT phantoms'.")
    seed: int | None = None
    command: str | None = Field(None, description="The command line that trained/exported the model.")
    notes: str | None = None


class Manifest(_Strict):
    """Everything the node needs to serve a model; see module docstring."""

    schema_version: Literal[1, 2] = 1
    name: str = Field(description="Model name used by config rules; 1-64 of A-Z a-z 0-9 . _ -.")
    version: str = Field(min_length=1, max_length=64)
    task: Literal["series_classification", "binary", "multiclass", "multilabel"] = "series_classification"
    description: str = ""
    labels: Labels = Field(description="binary: the finding; multiclass: the concept whose value is the "
                           "class (e.g. the DR grade); multilabel: the panel the findings belong to.")
    classes: tuple[ClassSpec, ...] = Field(default=(), description="multiclass: the classes, output order.")
    ordinal: bool = Field(False, description="multiclass: the classes are grades in increasing order.")
    decoding: Literal["argmax", "expected"] = Field(
        "argmax", description="multiclass: argmax, or (ordinal only) the rounded expected grade."
    )
    positive_classes: tuple[int, ...] | None = Field(
        None, description="multiclass: class indices flagged positive in the index (default: all but 0)."
    )
    findings: tuple[FindingSpec, ...] = Field(default=(), description="multilabel: the findings, output order.")
    input: InputSpec
    preprocessing: PreprocessSpec
    output: OutputSpec = Field(default_factory=lambda: OutputSpec())
    aggregation: Aggregation | None = Field(None, description="Required for 2d/2.5d models.")
    sliding_window: SlidingWindow = Field(default_factory=lambda: SlidingWindow())
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Operating point on P(positive).")
    metrics: dict[str, float] = Field(default_factory=dict, description="Validation metrics, e.g. auc.")
    artifacts: tuple[Artifact, ...] = Field(min_length=1)
    default_artifact: str = Field(description="Path of the artifact the node serves.")
    provenance: Provenance
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    training_package_version: str = "unknown"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("a model name is 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        self._check_task()
        spec = self.preprocessing
        if self.input.kind == "image" or spec.mode == "image":
            return self._check_image_input()
        is_3d = spec.mode == "3d"
        if (self.input.layout == "NDHWC") != is_3d:
            raise ValueError(f"input.layout {self.input.layout} does not fit preprocessing.mode {spec.mode}")
        expected = (*spec.input_shape, spec.channels)
        if tuple(self.input.shape) != expected:
            raise ValueError(
                f"input.shape {list(self.input.shape)} differs from the preprocessing output {list(expected)}"
            )
        if not is_3d and self.aggregation is None:
            raise ValueError("aggregation is required for 2d/2.5d models")
        if not is_3d and self.sliding_window.enabled:
            raise ValueError("sliding_window is only for 3d models")
        return self._check_artifacts()

    def _check_task(self) -> None:
        """Task keys for the task kind; each error names the key."""
        v1 = self.schema_version == 1
        if v1 and self.task != "series_classification":
            raise ValueError(f"task {self.task!r} needs schema_version 2")
        if not v1 and self.task == "series_classification":
            raise ValueError("task: schema_version 2 spells schema 1's task 'binary'")
        if v1 and self.input.kind != "volume":
            raise ValueError("input.kind 'image' needs schema_version 2")
        multiclass, multilabel = self.task == "multiclass", self.task == "multilabel"
        if multiclass and len(self.classes) < 2:
            raise ValueError("classes: a multiclass model needs at least 2 classes")
        if not multiclass and (self.classes or self.ordinal or self.decoding != "argmax"
                               or self.positive_classes is not None):
            raise ValueError("classes/ordinal/decoding/positive_classes are for task 'multiclass' only")
        if multiclass and self.decoding == "expected" and not self.ordinal:
            raise ValueError("decoding 'expected' needs ordinal = true (it averages grades)")
        if multiclass and self.output.positive_index:
            raise ValueError("output.positive_index is for task 'binary' only")
        if self.positive_classes is not None:
            bad = [i for i in self.positive_classes if not 0 <= i < len(self.classes)]
            if bad:
                raise ValueError(f"positive_classes {bad} are not class indices 0..{len(self.classes) - 1}")
        if multilabel and not self.findings:
            raise ValueError("findings: a multilabel model needs at least 1 finding")
        if not multilabel and self.findings:
            raise ValueError("findings are for task 'multilabel' only")
        if multilabel and self.output.positive_index:
            raise ValueError("output.positive_index is for task 'binary' only")
        for key, codes in (("classes", [c.code for c in self.classes]), ("findings", [f.code for f in self.findings])):
            seen = [(c.scheme, c.value) for c in codes]
            if len(set(seen)) != len(seen):
                raise ValueError(f"{key}: codes must be unique")

    def _check_image_input(self) -> Manifest:
        spec = self.preprocessing
        if self.input.kind != "image" or spec.mode != "image":
            raise ValueError(f"input.kind {self.input.kind!r} does not fit preprocessing.mode {spec.mode!r} "
                             "(an image model has input.kind 'image' and preprocessing.mode 'image')")
        if self.input.layout != "NHWC":
            raise ValueError("input.layout: an image model takes NHWC")
        expected = (*spec.input_shape, spec.channels)
        if tuple(self.input.shape) != expected:
            raise ValueError(
                f"input.shape {list(self.input.shape)} differs from the preprocessing output {list(expected)}"
            )
        if self.aggregation is not None or self.sliding_window.enabled:
            raise ValueError("aggregation/sliding_window: an image model scores each image on its own")
        return self._check_artifacts()

    def _check_artifacts(self) -> Manifest:
        paths = [a.path for a in self.artifacts]
        if len(set(paths)) != len(paths):
            raise ValueError("artifacts: paths must be unique")
        if self.default_artifact not in paths:
            raise ValueError(f"default_artifact {self.default_artifact!r} is not in artifacts[].path {paths}")
        if self.artifact().input_dtype != self.input.dtype:
            raise ValueError(
                f"input.dtype {self.input.dtype} differs from the default artifact's input_dtype "
                f"{self.artifact().input_dtype}"
            )
        return self

    def artifact(self, path: str | None = None) -> Artifact:
        """The artifact with ``path``, or the default one."""
        want = path or self.default_artifact
        for a in self.artifacts:
            if a.path == want:
                return a
        raise KeyError(want)

    @property
    def finding(self) -> Code:
        return self.labels.finding.to_code()

    @property
    def kind(self) -> Literal["binary", "multiclass", "multilabel"]:
        """The task kind (schema 1's ``series_classification`` is ``binary``)."""
        return "binary" if self.task in ("series_classification", "binary") else self.task  # type: ignore[return-value]

    @property
    def output_units(self) -> int | None:
        """How many output units the model must have (None: binary, 1 or more with positive_index)."""
        if self.task == "multiclass":
            return len(self.classes)
        if self.task == "multilabel":
            return len(self.findings)
        return None

    def positive_class_indices(self) -> tuple[int, ...]:
        """multiclass: the class indices counted positive (default: every class but the first)."""
        if self.positive_classes is not None:
            return self.positive_classes
        return tuple(range(1, len(self.classes)))


_V2_KEYS = ("classes", "ordinal", "decoding", "positive_classes", "findings")
_IMAGE_PREPROCESS_KEYS = ("color", "channel_order", "resize", "pad_value", "mean", "std")


def _hash_file(path: Path, h: hashlib._Hash) -> None:
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a directory (saved_model) as: for each file in sorted relative
    POSIX path order, the path bytes, a NUL, the file's sha256 hex digest, a newline."""
    path = Path(path)
    if path.is_file():
        h = hashlib.sha256()
        _hash_file(path, h)
        return h.hexdigest()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    outer = hashlib.sha256()
    files = sorted(
        (p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix()
    )
    for p in files:
        inner = hashlib.sha256()
        _hash_file(p, inner)
        rel = p.relative_to(path).as_posix().encode("utf-8")
        outer.update(rel + b"\0" + inner.hexdigest().encode() + b"\n")
    return outer.hexdigest()


def _format(exc: ValidationError, where: str) -> str:
    lines = [f"{where}: invalid model manifest ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  - {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def parse_manifest(data: object, where: str = "manifest") -> Manifest:
    """Validate a manifest mapping; errors name ``where`` and each offending key."""
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(_format(exc, where)) from None


def load_manifest(model_dir: Path) -> Manifest:
    """Read and validate ``model_dir/manifest.json`` (artifacts are not checked: see verify_artifacts)."""
    path = Path(model_dir) / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON: {exc}") from None
    return parse_manifest(data, str(path))


def verify_artifacts(manifest: Manifest, model_dir: Path, *, only: str | None = None) -> None:
    """Check every artifact (or just ``only``) exists inside ``model_dir`` with the recorded sha256."""
    root = Path(model_dir).resolve()
    for art in manifest.artifacts:
        if only is not None and art.path != only:
            continue
        target = (root / art.path).resolve()
        if not target.is_relative_to(root):
            raise ManifestError(f"{root}: artifacts[{art.path!r}].path leaves the model directory")
        if not target.exists():
            raise ManifestError(f"{root}: artifacts[{art.path!r}]: file is missing")
        if art.format == "saved_model" and not target.is_dir():
            raise ManifestError(f"{root}: artifacts[{art.path!r}]: a saved_model must be a directory")
        if art.format == "tflite" and not target.is_file():
            raise ManifestError(f"{root}: artifacts[{art.path!r}]: a tflite artifact must be a file")
        actual = sha256_path(target)
        if actual != art.sha256:
            raise ManifestError(
                f"{root}: artifacts[{art.path!r}].sha256 mismatch: manifest {art.sha256}, file {actual}"
            )
    log.debug("verified artifacts of %s %s in %s", manifest.name, manifest.version, root)


def write_manifest(manifest: Manifest, model_dir: Path) -> Path:
    """Write ``manifest.json`` atomically (temp file + rename); returns its path."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    data = manifest.model_dump(mode="json")
    if manifest.schema_version == 1:  # a schema 1 manifest is written as schema 1 knows it
        for key in _V2_KEYS:
            data.pop(key, None)
        data["input"].pop("kind", None)
    if manifest.preprocessing.mode != "image":
        for key in _IMAGE_PREPROCESS_KEYS:
            data["preprocessing"].pop(key, None)
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
