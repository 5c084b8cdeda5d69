"""Run one image model (``input.kind = "image"``) on the 2D images of a series.

Each image is scored on its own (``preprocess.image_input``, one batch through the runtime);
the outputs are read per the task kind (softmax over classes, independent sigmoids per
finding, or schema 1's binary probability), and the series gets a summary: the worst grade for
an ordinal model, the most probable positive class for a nominal one, and per finding the
highest probability (present when any image has it) for multilabel and binary models.

Only the key image (the one the summary came from) gets an occlusion heat map, and only when
the summary is positive: the SC shows that image, and a negative result has nothing to point
at.  The heat is the drop of the headline score (P(grade >= the predicted grade) for an ordinal
model, P(predicted class) for a nominal one, P(finding) of the most probable present finding)
when a region is hidden; it is mapped back onto the image's own pixel grid.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from medclf_node.domain import ClassScore, FindingScore, Image2D, ImageModelResult, ImageOutcome
from medclf_node.inference.manifest import Manifest, OutputSpec
from medclf_node.inference.predict import _Geometry, _occlusion, _to_source_grid, output_to_probability
from medclf_node.inference.registry import LoadedModel
from medclf_node.preprocess import image_geometry, image_input

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
IMAGE_CHUNK = 16  # images preprocessed and run per runtime call


def class_probabilities(raw: F32, out: OutputSpec) -> F32:
    """(N, K) outputs -> (N, K) class probabilities (softmax of logits; probabilities renormalised)."""
    x = np.asarray(raw, np.float64).reshape(raw.shape[0], -1)
    if out.kind == "logit":
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    x = np.clip(x, 0.0, None)  # int8 outputs can land a hair below 0 or sum a little off 1
    total = x.sum(axis=1, keepdims=True)
    total[total <= 0] = 1.0
    return (x / total).astype(np.float32)


def finding_probabilities(raw: F32, out: OutputSpec) -> F32:
    """(N, K) outputs -> (N, K) independent probabilities (sigmoid of logits)."""
    x = np.asarray(raw, np.float64).reshape(raw.shape[0], -1)
    if out.kind == "logit":
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def decode_class(p: npt.NDArray[np.floating], man: Manifest) -> int:
    """The predicted class: argmax, or for ``decoding = "expected"`` the rounded mean grade."""
    if man.decoding == "expected":
        grade = float(np.dot(np.arange(p.size), p) / max(float(p.sum()), 1e-12))
        return int(np.clip(np.floor(grade + 0.5), 0, p.size - 1))
    return int(np.argmax(p))


def outcomes(raw: F32, man: Manifest, images: Sequence[Image2D]) -> list[ImageOutcome]:
    """Per-image outcomes from the raw (N, units) outputs."""
    kind = man.kind
    res: list[ImageOutcome] = []
    if kind == "multiclass":
        probs = class_probabilities(raw, man.output)
        positive = set(man.positive_class_indices())
        for img, p in zip(images, probs, strict=True):
            k = decode_class(p, man)
            classes = tuple(ClassScore(c.code.to_code(), float(v)) for c, v in zip(man.classes, p, strict=True))
            res.append(ImageOutcome(img.ref, kind, classes=classes, predicted=k, positive=k in positive))
        return res
    if kind == "multilabel":
        probs = finding_probabilities(raw, man.output)
        specs = [(f.code.to_code(), f.threshold) for f in man.findings]
    else:
        probs = output_to_probability(raw, man.output)[:, None]
        specs = [(man.finding, man.threshold)]
    for img, p in zip(images, probs, strict=True):
        found = tuple(FindingScore(code, float(v), thr) for (code, thr), v in zip(specs, p, strict=True))
        res.append(ImageOutcome(img.ref, kind, findings=found, positive=any(f.present for f in found)))
    return res


def summarise(items: Sequence[ImageOutcome], man: Manifest) -> tuple[ImageOutcome, int]:
    """The series summary and the index of its key image (see the module docstring)."""
    if not items:
        raise ValueError("no images to summarise")
    if man.kind == "multiclass":
        if man.ordinal:  # worst grade; among equals the most confident
            key = max(range(len(items)), key=lambda i: (items[i].predicted or 0, items[i].score))
        else:  # a positive class first, then the most probable
            key = max(range(len(items)), key=lambda i: (items[i].positive, items[i].score))
        k = items[key]
        return ImageOutcome(None, k.kind, classes=k.classes, predicted=k.predicted, positive=k.positive), key
    n = len(items[0].findings)
    findings = []
    for j in range(n):
        best = max(items, key=lambda o: o.findings[j].probability).findings[j]
        findings.append(best)
    key = max(range(len(items)), key=lambda i: (items[i].positive, items[i].score))
    return ImageOutcome(None, items[0].kind, findings=tuple(findings), positive=any(f.present for f in findings)), key


def heat_score(man: Manifest, outcome: ImageOutcome) -> Callable[[F32], F32]:
    """Raw outputs -> the score whose drop under occlusion is the heat for ``outcome``."""
    if man.kind == "multiclass":
        k = outcome.predicted or 0
        if man.ordinal:
            return lambda raw: class_probabilities(raw, man.output)[:, k:].sum(axis=1).astype(np.float32)
        return lambda raw: class_probabilities(raw, man.output)[:, k]
    if man.kind == "multilabel":
        present = [j for j, f in enumerate(outcome.findings) if f.present] or list(range(len(outcome.findings)))
        j = max(present, key=lambda i: outcome.findings[i].probability)
        return lambda raw: finding_probabilities(raw, man.output)[:, j]
    return lambda raw: output_to_probability(raw, man.output)


def _heatmap(model: LoadedModel, x: F32, img: Image2D, outcome: ImageOutcome, max_passes: int) -> F32:
    man = model.manifest
    (sr, sc), (orr, occ) = image_geometry(img.shape, man.preprocessing)
    # preprocess: model = (source + 0.5) * scale - 0.5 - offset; _to_source_grid: source * scale - offset
    geom = _Geometry((sr, sc), (orr + 0.5 - 0.5 * sr, occ + 0.5 - 0.5 * sc))
    occ_map = _occlusion(model.runtime, x, man.output, max_passes, score=heat_score(man, outcome))
    return _to_source_grid(occ_map, geom, *img.shape)


def predict_images(
    model: LoadedModel, images: Sequence[Image2D], *, heatmap: bool = True, max_occlusion_passes: int = 160
) -> ImageModelResult:
    """Score every image with ``model`` and summarise; see the module docstring."""
    man = model.manifest
    if man.input.kind != "image":
        raise ValueError(f"model {man.name} takes {man.input.kind} input, not 2D images")
    if not images:
        raise ValueError("no images to score")
    t0 = time.perf_counter()
    raws: list[F32] = []
    for start in range(0, len(images), IMAGE_CHUNK):
        chunk = images[start : start + IMAGE_CHUNK]
        x = np.stack([image_input(img.pixels, man.preprocessing) for img in chunk])
        raws.append(model.runtime.predict(x))
    items = outcomes(np.concatenate(raws), man, images)
    summary, key = summarise(items, man)
    if heatmap and summary.positive:
        x_key = image_input(images[key].pixels, man.preprocessing)
        heat = _heatmap(model, x_key, images[key], items[key], max_occlusion_passes)
        items[key] = ImageOutcome(items[key].ref, items[key].kind, items[key].classes, items[key].predicted,
                                  items[key].findings, items[key].positive, heat)
    secs = time.perf_counter() - t0
    log.info("%s %s on %d image(s): summary %s score %.3f, key image %d (%.2f s)", man.name, man.version,
             len(images), "positive" if summary.positive else "negative", summary.score, key, secs)
    return ImageModelResult(
        model_name=man.name, model_version=man.version, kind=man.kind, concept=man.finding, ordinal=man.ordinal,
        images=tuple(items), summary=summary, key_image=key, inference_seconds=secs,
    )


__all__ = ["class_probabilities", "decode_class", "finding_probabilities", "outcomes", "predict_images", "summarise"]
