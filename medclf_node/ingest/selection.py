"""Which model(s) run on a completed series: selection rules as data (``[[rules]]`` in the config).

Semantics (also in the README's configuration reference):

* Rules are tried **in the order written; the first rule that matches wins** and names the
  models to run.  A series no rule matches is skipped, and :class:`Skipped` says, rule by
  rule, why each one did not match.
* Per rule, instances are first *filtered*: instances whose ImageType contains any of
  ``image_type_excludes`` (e.g. LOCALIZER scouts mixed into the series) are dropped, and so
  are non-image objects (SR, presentation states...) unless ``sop_class_uids`` names their
  class.  The rule's criteria are then checked on **every kept instance**: modality, SOP
  class, ``image_type_includes``, slice thickness range, body part, series description
  regex, laterality (ImageLaterality, else Laterality: 2D studies such as fundus photographs),
  and ``min_slices`` on the number of kept slices (frames of multi-frame objects count).
* Text comparisons are case-insensitive; omitted criteria match anything.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from medclf_node.config import RuleSection
from medclf_node.dicom_uid import is_valid_uid
from medclf_node.ingest.dicom_scan import ScanResult, scan_header
from medclf_node.redact import describe

log = logging.getLogger(__name__)

_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ImageType",
    "SliceThickness",
    "BodyPartExamined",
    "SeriesDescription",
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",  # enhanced objects keep SliceThickness in Pixel Measures
    "ImageLaterality",
    "Laterality",
]




class HeaderError(ValueError):
    """A spooled file whose header cannot be read; names the file."""


@dataclass(frozen=True)
class Header:
    """The attributes selection rules look at, for one instance."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    image_type: tuple[str, ...]
    slice_thickness: float | None
    body_part_examined: str
    series_description: str
    number_of_frames: int
    laterality: str = ""  # ImageLaterality, else Laterality (upper case; "" when neither is set)

    @property
    def is_image(self) -> bool:
        """True for image storage SOP classes (by pydicom's UID registry)."""
        return "Image Storage" in UID(self.sop_class_uid).name


@dataclass(frozen=True)
class Selection:
    """A series selected by ``rule``: run ``models`` on the instances in ``paths``."""

    rule: str
    models: tuple[str, ...]
    paths: tuple[Path, ...]
    dropped: tuple[Path, ...]  # instances the rule's filters removed (localizers, non-images)


@dataclass(frozen=True)
class Skipped:
    """No rule selected the series; ``reason`` says why for each rule."""

    reason: str


def _thickness(ds: Dataset) -> float | None:
    value = ds.get("SliceThickness")
    if value is None:
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            measures = shared[0].get("PixelMeasuresSequence")
            if measures:
                value = measures[0].get("SliceThickness")
    try:
        return float(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def header_from_dataset(path: Path, ds: Dataset) -> Header:
    """Build a :class:`Header` from a (header-only) dataset."""
    image_type = ds.get("ImageType")
    if image_type is None:
        types: tuple[str, ...] = ()
    elif isinstance(image_type, str):
        types = tuple(v for v in image_type.split("\\") if v)
    else:
        types = tuple(str(v) for v in image_type)
    frames = ds.get("NumberOfFrames")
    try:
        n_frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        n_frames = 1
    return Header(
        path=path,
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        modality=str(ds.get("Modality", "")).strip(),
        image_type=tuple(t.strip().upper() for t in types if t.strip()),
        slice_thickness=_thickness(ds),
        body_part_examined=str(ds.get("BodyPartExamined", "") or "").strip(),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        number_of_frames=max(1, n_frames),
        laterality=str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "").strip().upper(),
    )


_SCAN_TAGS = frozenset(
    {
        0x00080016,  # SOP Class UID
        0x00080018,  # SOP Instance UID
        0x0020000D,  # Study Instance UID
        0x0020000E,  # Series Instance UID
        0x00080060,  # Modality
        0x00080008,  # Image Type
        0x00180050,  # Slice Thickness
        0x00180015,  # Body Part Examined
        0x0008103E,  # Series Description
        0x00280008,  # Number of Frames
        0x00200062,  # Image Laterality
        0x00200060,  # Laterality
    }
)


def _header_from_scan(path: Path, scan: ScanResult) -> Header | None:
    """A :class:`Header` from the fast scan, or None when pydicom should look (see below)."""
    v = scan.values
    if 0x52009229 in scan.present or 0x00080018 not in v:
        return None  # enhanced objects keep SliceThickness in functional groups; odd files
    if any(b >= 0x80 for b in v.get(0x0008103E, b"") + v.get(0x00180015, b"")):
        return None  # non-ASCII text: let pydicom apply the Specific Character Set

    def text(tag: int) -> str:
        return v.get(tag, b"").decode("ascii", "replace").strip(" \x00")

    try:
        thickness: float | None = float(text(0x00180050)) if text(0x00180050) else None
        n_frames = int(text(0x00280008)) if text(0x00280008) else 1
    except ValueError:
        return None
    return Header(
        path=path,
        sop_class_uid=text(0x00080016),
        sop_instance_uid=text(0x00080018),
        study_instance_uid=text(0x0020000D),
        series_instance_uid=text(0x0020000E),
        modality=text(0x00080060),
        image_type=tuple(t.strip().upper() for t in text(0x00080008).split("\\") if t.strip()),
        slice_thickness=thickness,
        body_part_examined=text(0x00180015),
        series_description=v.get(0x0008103E, b"").decode("ascii").strip(" \x00"),
        number_of_frames=max(1, n_frames),
        laterality=(text(0x00200062) or text(0x00200060)).upper(),
    )


def read_headers(paths: Iterable[Path]) -> list[Header]:
    """Read the selection attributes of each file (only those tags, never the pixels)."""
    out = []
    for p in paths:
        path = Path(p)
        try:
            scan = scan_header(path, _SCAN_TAGS)
            fast = _header_from_scan(path, scan) if scan is not None else None
            if fast is not None:
                out.append(fast)
                continue
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS, force=True)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise HeaderError(f"cannot read the DICOM header of {path}: {exc}") from exc
        if "SOPInstanceUID" not in ds:
            raise HeaderError(f"{path} is not a DICOM instance (no SOP Instance UID)")
        out.append(header_from_dataset(path, ds))
    return out


def _upper(values: Iterable[str]) -> set[str]:
    return {v.strip().upper() for v in values}


def _kept(headers: Sequence[Header], rule: RuleSection) -> tuple[list[Header], list[Header]]:
    excludes = _upper(rule.image_type_excludes)
    keep, drop = [], []
    for h in headers:
        is_wanted_class = h.sop_class_uid in rule.sop_class_uids if rule.sop_class_uids else h.is_image
        if excludes.intersection(h.image_type) or not is_wanted_class:
            drop.append(h)
        else:
            keep.append(h)
    return keep, drop


def _mismatch(kept: Sequence[Header], rule: RuleSection) -> str | None:
    """Why ``rule`` does not match the kept instances, or None when it matches."""
    if not kept:
        return "no instance left after dropping ImageType " + "/".join(rule.image_type_excludes) + " and non-images"
    modalities = _upper(rule.modality)
    includes = _upper(rule.image_type_includes)
    parts = _upper(rule.body_part_examined)
    regex = re.compile(rule.series_description_regex, re.IGNORECASE) if rule.series_description_regex else None
    sides = set(rule.laterality)
    for h in kept:
        if h.modality.upper() not in modalities:
            return f"modality {h.modality or '(none)'} not in {sorted(modalities)}"
        if includes and not includes.issubset(h.image_type):
            return f"ImageType {'/'.join(h.image_type) or '(none)'} lacks {'/'.join(sorted(includes))}"
        if rule.slice_thickness_mm is not None:
            lo, hi = rule.slice_thickness_mm
            if h.slice_thickness is None:
                return "SliceThickness absent but a range is required"
            if not lo <= h.slice_thickness <= hi:
                return f"SliceThickness {h.slice_thickness:g} mm outside [{lo:g}, {hi:g}]"
        if parts and h.body_part_examined.upper() not in parts:
            return f"BodyPartExamined {h.body_part_examined or '(none)'} not in {sorted(parts)}"
        if regex is not None and not regex.search(h.series_description):
            return f"SeriesDescription {describe(h.series_description)} does not match /{regex.pattern}/"
        if sides and h.laterality not in sides:
            return f"laterality {h.laterality or '(none)'} not in {sorted(sides)}"
    n_slices = sum(h.number_of_frames for h in kept)
    if n_slices < rule.min_slices:
        return f"{n_slices} slice(s) < min_slices {rule.min_slices}"
    return None


def select(headers: Sequence[Header], rules: Sequence[RuleSection]) -> Selection | Skipped:
    """Apply ``rules`` in order to one series' headers; the first match wins."""
    if not headers:
        return Skipped("the series has no instances")
    if not rules:
        return Skipped("no selection rules are configured")
    reasons = []
    for rule in rules:
        kept, dropped = _kept(headers, rule)
        why = _mismatch(kept, rule)
        if why is None:
            kept_sorted = sorted(kept, key=lambda h: (h.sop_instance_uid, str(h.path)))
            log.debug(
                "series %s: rule %r selects %d instance(s)", headers[0].series_instance_uid, rule.name, len(kept)
            )
            return Selection(
                rule=rule.name,
                models=tuple(rule.models),
                paths=tuple(h.path for h in kept_sorted),
                dropped=tuple(sorted(h.path for h in dropped)),
            )
        reasons.append(f"rule {rule.name!r}: {why}")
    return Skipped("no selection rule matched: " + "; ".join(reasons))


def _covers(a: RuleSection, b: RuleSection) -> bool:
    """True when every series ``b`` matches is also matched by ``a`` (sufficient, not necessary)."""
    if _upper(a.image_type_excludes) != _upper(b.image_type_excludes):
        return False
    if a.sop_class_uids:
        if not b.sop_class_uids or not set(b.sop_class_uids) <= set(a.sop_class_uids):
            return False
    elif any("Image Storage" not in UID(u).name for u in b.sop_class_uids):
        return False  # b admits a non-image class that a would drop
    if not _upper(b.modality) <= _upper(a.modality):
        return False
    if not _upper(a.image_type_includes) <= _upper(b.image_type_includes):
        return False
    if a.slice_thickness_mm is not None:
        if b.slice_thickness_mm is None:
            return False
        (a_lo, a_hi), (b_lo, b_hi) = a.slice_thickness_mm, b.slice_thickness_mm
        if not (a_lo <= b_lo and b_hi <= a_hi):
            return False
    if a.body_part_examined and not (
        b.body_part_examined and _upper(b.body_part_examined) <= _upper(a.body_part_examined)
    ):
        return False
    if a.series_description_regex is not None and a.series_description_regex != b.series_description_regex:
        return False
    if a.laterality and not (b.laterality and set(b.laterality) <= set(a.laterality)):
        return False
    return a.min_slices <= b.min_slices


def check_rules(rules: Sequence[RuleSection], known_models: Iterable[str] | None) -> list[str]:
    """Problems with the rules for ``config-check``: unknown models, dead rules, bad values.

    ``known_models`` None (no model directory to look in) skips the model-name check only.
    """
    known = set(known_models) if known_models is not None else None
    problems: list[str] = []
    for i, rule in enumerate(rules):
        where = f"rules[{i}] ({rule.name!r})"
        if not rule.models:
            problems.append(f"{where}: names no models; add at least one model name")
        for model in rule.models:
            if known is not None and model not in known:
                problems.append(
                    f"{where}: model {model!r} is not loaded; known models: {sorted(known) or 'none'}"
                )
        if not rule.modality:
            problems.append(f"{where}: modality is empty, so the rule can never match")
        for uid in rule.sop_class_uids:
            if not is_valid_uid(uid):
                problems.append(f"{where}: sop_class_uids entry {uid!r} is not a valid UID")
        clash = _upper(rule.image_type_includes) & _upper(rule.image_type_excludes)
        if clash:
            problems.append(
                f"{where}: {sorted(clash)} is both required and excluded in ImageType, so the rule can never match"
            )
        if not rule.modality or clash:
            continue  # already reported as unmatchable
        for j in range(i):
            if _covers(rules[j], rule):
                problems.append(
                    f"{where}: can never match, because rules[{j}] ({rules[j].name!r}) comes first "
                    "and matches every series it would (first match wins)"
                )
                break
    return problems


__all__ = [
    "Header",
    "HeaderError",
    "Selection",
    "Skipped",
    "check_rules",
    "header_from_dataset",
    "read_headers",
    "select",
]
