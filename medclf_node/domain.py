"""Plain data passed between the node's layers.

``ingest``, ``inference`` and ``reporting`` do not import each other; they exchange
these frozen dataclasses, numpy arrays and pydicom Datasets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from medclf_node import __version__


@dataclass(frozen=True)
class Code:
    """A coded concept (value, coding scheme designator, meaning), e.g. SCT 427359005."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class SliceRef:
    """Reference to the source image that one slice of a volume came from (SR evidence)."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None  # 1-based, for multi-frame sources


@dataclass(frozen=True)
class Volume:
    """A CT volume in Hounsfield units.

    ``array`` is float32 indexed (slice, row, column) in the canonical orientation of
    :mod:`medclf_node.ingest.volume` (slice toward the feet, rows posterior, columns to the
    left).  ``affine`` is a 4x4 matrix mapping (slice, row, column, 1) voxel indices to
    patient LPS millimetres, the same convention as ``highdicom.Volume``.
    ``spacing`` is (slice, row, column) in millimetres.
    ``slice_refs[k]`` names the source image of slice ``k`` (after any resampling, the
    nearest source slice; for a coronal/sagittal acquisition, one image that crosses it).
    ``sources`` names every source image whose pixels went into the array (the SR's evidence),
    which for coronal/sagittal acquisitions is more than ``slice_refs`` can name.
    """

    array: npt.NDArray[np.float32]
    spacing: tuple[float, float, float]
    affine: npt.NDArray[np.float64]
    slice_refs: tuple[SliceRef, ...]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None = None
    notes: tuple[str, ...] = field(default=())  # e.g. "resampled uneven spacing onto 1.25 mm grid"
    sources: tuple[SliceRef, ...] = field(default=())  # empty: the same as slice_refs

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.array.shape
        return (int(s[0]), int(s[1]), int(s[2]))


@dataclass(frozen=True)
class ModelResult:
    """What one model concluded about one series; everything reporting needs.

    ``slice_scores`` holds a per-slice probability for 2D models (None for 3D models).
    ``heatmap`` is a float32 map in [0, 1] with the shape of the key slice (rows, columns).
    """

    model_name: str
    model_version: str
    finding: Code  # e.g. SCT "Pulmonary nodule"
    probability: float
    threshold: float
    positive: bool
    key_slice_index: int
    slice_scores: npt.NDArray[np.float32] | None = None
    heatmap: npt.NDArray[np.float32] | None = None
    inference_seconds: float = 0.0


@dataclass(frozen=True)
class Image2D:
    """One decoded image: ``pixels`` (rows, cols, 1 | 3) float32 display values in [0, 1], RGB order."""

    pixels: npt.NDArray[np.float32]
    ref: SliceRef
    photometric: str  # as stored (before conversion)
    pixel_spacing: tuple[float, float] | None  # (row, column) mm, from PixelSpacing or ImagerPixelSpacing

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))

    @property
    def is_colour(self) -> bool:
        return int(self.pixels.shape[2]) == 3


TaskKind = Literal["binary", "multiclass", "multilabel"]


@dataclass(frozen=True)
class ClassScore:
    """A multiclass model's probability for one of its coded classes."""

    code: Code
    probability: float


@dataclass(frozen=True)
class FindingScore:
    """One finding of a multilabel (or binary) model: its probability and operating point."""

    code: Code
    probability: float
    threshold: float

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class ImageOutcome:
    """One image model's result on one 2D image, or (``ref`` None) the summary over a series' images.

    multiclass: ``classes`` holds every class probability and ``predicted`` the decoded class
    (for a summary, the worst grade / most probable class over the images, with the
    probabilities of the image it came from); binary and multilabel: ``findings``, one per
    finding (a summary: the highest probability over the images, present when any image has it).
    ``heatmap`` (rows, cols) in [0, 1] on the image's own pixel grid: the drop in the headline
    score when a region is hidden.
    """

    ref: SliceRef | None
    kind: TaskKind
    classes: tuple[ClassScore, ...] = ()
    predicted: int | None = None
    findings: tuple[FindingScore, ...] = ()
    positive: bool = False
    heatmap: npt.NDArray[np.float32] | None = None

    @property
    def score(self) -> float:
        """The headline score: P(predicted class), or the highest finding probability."""
        if self.kind == "multiclass":
            assert self.predicted is not None
            return self.classes[self.predicted].probability
        return max(f.probability for f in self.findings)

    @property
    def predicted_class(self) -> ClassScore:
        assert self.predicted is not None, "only a multiclass outcome has a predicted class"
        return self.classes[self.predicted]


@dataclass(frozen=True)
class ImageModelResult:
    """What one image model concluded about the 2D images of one series.

    ``images`` in the order evaluated (sorted by SOP Instance UID), ``summary`` over all of them,
    ``key_image`` the index of the image the summary came from (the SC shows it).
    ``concept`` is the manifest's ``labels.finding`` (what a multiclass value is the value of).
    """

    model_name: str
    model_version: str
    kind: TaskKind
    concept: Code
    ordinal: bool
    images: tuple[ImageOutcome, ...]
    summary: ImageOutcome
    key_image: int
    inference_seconds: float = 0.0


@dataclass(frozen=True)
class NodeIdentity:
    """Who wrote a result object: the node as device observer and equipment of SR/SC."""

    ae_title: str
    device_name: str
    manufacturer: str = "medclf-node"
    software_version: str = __version__
    institution_name: str | None = None
