"""Values that pass from a source image into our result objects, made valid on the way.

Names, IDs, dates, accession and study numbers, the referring physician and free text are
copied from the source into the SR and the Secondary Capture. Real systems send values that
break the standard: a multi-valued PatientName (``Doe\\Jane^Q``), an LO longer than 64
characters, a DA like ``2020-01-01``, a sex of ``male``, Latin-1 bytes under no (or the wrong)
Specific Character Set. highdicom refuses some of them (``check_person_name`` raises on a
multi-valued name, after inference: no result at all) and dciodvfy flags the rest. A result
must never be lost to the demographics, so :func:`carried` returns a copy of the header in
which every text value is decoded with the charset that actually fits its bytes and then
carried unchanged when valid, or repaired the least possible when not: the first of several
values where one is allowed, cut to the VR's length (at a word boundary for free text), dates
and times re-spelled or emptied (all such attributes are Type 2 or 3 in our objects). Every
repair is logged with the attribute's keyword, never its value (patient data).
"""

from __future__ import annotations

import codecs
import datetime as dt
import logging
import re
from collections.abc import Callable, Sequence

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName, format_number_as_ds

log = logging.getLogger(__name__)

# Maximum value lengths of the text VRs, counted in UTF-8 bytes (our objects are ISO_IR 192,
# and validators count bytes).  PN: per component group.
MAX_BYTES = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64, "LT": 10240,
             "PN": 64, "SH": 16, "ST": 1024, "TM": 14}
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                      "UR", "UT"})
SINGLE_VALUE_VRS = frozenset({"LT", "ST", "UT", "UR"})  # backslash is text here, not a delimiter
FREE_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UC", "UT"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_KEEP_LINES = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")  # LT/ST/UT may hold TAB, LF, FF, CR
SEX = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"}


def shorten(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` UTF-8 bytes, cut at a word boundary when there is one.

    The cut goes back to the last space (or ``-``/``,``/``;`` break) in the second half of the
    allowance; only a single over-long word is cut inside.
    """
    if len(text.encode("utf-8")) <= limit:
        return text
    cut = text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
    if cut and text[len(cut):len(cut) + 1] in (" ", ""):
        return cut.rstrip()
    space = max(cut.rfind(" "), cut.rfind(","), cut.rfind(";"))
    if space >= limit // 2:
        return cut[:space].rstrip(" ,;")
    return cut.rstrip()


def _single_byte(encoding: str) -> bool:
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        return False
    return name.startswith(("ascii", "iso8859", "latin", "cp125", "tis", "koi8"))


def _decode(raw: bytes, encodings: list[str], vr: str) -> str:
    """Text of raw element bytes in the charset they fit: declared, UTF-8, Windows-1252, Latin-1.

    A source that declares nothing (ASCII) or a single-byte set like ISO_IR 100 but holds UTF-8,
    or declares UTF-8 and holds Latin-1, is common; pydicom would decode such bytes with
    replacement characters or as mojibake ("MÃ¼ller").  Non-ASCII bytes that form valid UTF-8
    are taken as UTF-8 under a single-byte declaration (they almost never are intended Latin-1).
    """
    if b"\x1b" in raw and len(encodings) > 1:  # ISO 2022 code extensions: pydicom knows the escapes
        delimiters = {0x5C, 0x5E, 0x3D} if vr == "PN" else {0x5C, 0x09, 0x0A, 0x0C, 0x0D}
        return decode_bytes(raw, encodings, delimiters)
    if raw.isascii():
        return raw.decode("ascii")
    declared = encodings[0]
    order = ["utf-8", declared] if _single_byte(declared) else [declared, "utf-8"]
    for encoding in [*order, "cp1252", "latin-1"]:
        try:
            text = raw.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            continue
        if encoding != declared:
            log.info("a text value is not in the declared character set (%s); read as %s", declared, encoding)
        return text
    return raw.decode("latin-1")  # pragma: no cover - latin-1 decodes every byte string


def _clean_da(value: str) -> str:
    """A DA (YYYYMMDD) from common spellings (2020-01-01, 2020.01.01, 2020/1/1); else empty."""
    v = value.strip()
    m = re.fullmatch(r"(\d{4})[-./]?(\d{1,2})[-./]?(\d{1,2})(?:[T ].*)?", v)
    if m is None:
        return ""
    try:
        return dt.date(int(m[1]), int(m[2]), int(m[3])).strftime("%Y%m%d")
    except ValueError:
        return ""


def _clean_tm(value: str) -> str:
    """A TM (HHMMSS.FFFFFF) from HHMMSS, HH:MM:SS(.f) or HH:MM; else empty."""
    v = value.strip()
    m = re.fullmatch(r"(\d{2}):?(?:(\d{2}):?(?:(\d{2})(?:\.(\d{1,6}))?)?)?", v)
    if m is None:
        return ""
    hh, mm, ss, frac = m[1], m[2], m[3], m[4]
    if int(hh) > 23 or (mm is not None and int(mm) > 59) or (ss is not None and int(ss) > 60):
        return ""
    return hh + (mm or "") + (ss or "") + (f".{frac}" if frac else "")


def _clean_dt(value: str) -> str:
    """A DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX, leading parts only); separators dropped; else empty."""
    v = value.strip()
    m = re.fullmatch(r"(\d{4})[-./]?(\d{2})?[-./]?(\d{2})?[T ]?(\d{2})?:?(\d{2})?:?(\d{2}(?:\.\d{1,6})?)?"
                     r"([+-]\d{4})?", v)
    if m is None or not m[1]:
        return ""
    parts = [p for p in m.groups()[:6] if p]
    out = "".join(parts) + (m[7] or "")
    return out if len(out) <= MAX_BYTES["DT"] else ""


def _clean_as(value: str) -> str:
    m = re.fullmatch(r"0*(\d{1,3})\s*([DWMY])", value.strip().upper())
    return f"{int(m[1]):03d}{m[2]}" if m else ""


def _clean_cs(value: str) -> str:
    v = re.sub(r"[^A-Z0-9 _]", "_", value.strip().upper())
    return v[: MAX_BYTES["CS"]].rstrip()


def _clean_is(value: str) -> str:
    try:
        f = float(value.strip())
    except ValueError:
        return ""
    return str(int(f)) if f.is_integer() and abs(f) < 2**31 else ""


def _clean_ds(value: str) -> str:
    try:
        f = float(value.strip())
    except ValueError:
        return ""
    if f != f or f in (float("inf"), float("-inf")):
        return ""
    return format_number_as_ds(f) if len(value.strip()) > MAX_BYTES["DS"] else value.strip()


def clean_person_name(value: str) -> str:
    """A PN of at most 3 component groups of at most 5 components and 64 bytes each.

    A name with a single component gets a trailing caret ("Doe" -> "Doe^", the same name in
    DICOM): highdicom takes a caret-less name for a mistake and, in the SC, refuses it.
    """
    v = _CONTROL.sub("", value).strip()
    if not v.strip("^="):
        return ""
    groups = v.split("=")[:3]
    fixed = []
    for g in groups:
        comps = g.split("^")
        if len(comps) > 5:
            comps = [*comps[:4], " ".join(c for c in comps[4:] if c)]
        while len("^".join(comps).encode("utf-8")) > MAX_BYTES["PN"] and any(comps):
            longest = max(range(len(comps)), key=lambda i: len(comps[i].encode("utf-8")))
            over = len("^".join(comps).encode("utf-8")) - MAX_BYTES["PN"]
            comps[longest] = shorten(comps[longest], max(0, len(comps[longest].encode("utf-8")) - over))
        fixed.append("^".join(comps).rstrip("^"))
    while len(fixed) > 1 and not fixed[-1]:
        fixed.pop()
    if "^" not in fixed[0] and fixed[0]:
        fixed[0] += "^"
    return "=".join(fixed)


_CLEANERS: dict[str, Callable[[str], str]] = {
    "DA": _clean_da, "TM": _clean_tm, "DT": _clean_dt, "AS": _clean_as, "CS": _clean_cs, "IS": _clean_is,
    "DS": _clean_ds, "PN": clean_person_name,
}


def clean_value(value: str, vr: str, keyword: str = "") -> str:
    """One text value made valid for ``vr`` (see the module docstring)."""
    if vr in ("LT", "ST", "UT"):
        v = _CONTROL_KEEP_LINES.sub("", value).rstrip()
    elif vr == "PN":
        v = value
    else:
        v = _CONTROL.sub(" ", value).strip()
        if vr not in SINGLE_VALUE_VRS:
            v = v.replace("\\", "/")
    if vr in _CLEANERS:
        v = _CLEANERS[vr](v)
    if keyword == "PatientSex":
        v = SEX.get(v.upper(), "")
    limit = MAX_BYTES.get(vr)
    if limit is not None and vr != "PN" and len(v.encode("utf-8")) > limit:
        v = shorten(v, limit) if vr in FREE_TEXT_VRS else v.encode("utf-8")[:limit].decode("utf-8", "ignore")
    return v


def _values(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(v) if v is not None else "" for v in value]
    if isinstance(value, PersonName):
        return [str(value)]
    if isinstance(value, bytes):
        return [value.decode("latin-1")]
    return [str(value)]


def _vm_is_one(tag: BaseTag) -> bool:
    try:
        return dictionary_VM(tag) == "1"
    except KeyError:
        return False


def _text_values(elem: DataElement | RawDataElement, vr: str, encodings: list[str]) -> list[str]:
    if isinstance(elem, RawDataElement):
        raw = elem.value or b""
        text = _decode(raw, encodings, vr).rstrip("\x00 ")
        if vr in SINGLE_VALUE_VRS:
            return [text] if text else []
        return text.split("\\") if text else []
    return _values(elem.value)


def _clean_element(elem: DataElement | RawDataElement, vr: str, encodings: list[str]) -> DataElement:
    tag = BaseTag(elem.tag)
    keyword = keyword_for_tag(tag)
    values = _text_values(elem, vr, encodings)
    if vr not in SINGLE_VALUE_VRS and len(values) > 1 and _vm_is_one(tag):
        log.warning("%s has %d values where one is allowed; the first is carried", keyword or tag, len(values))
        values = values[:1]
    cleaned = [clean_value(v, vr, keyword) for v in values]
    if cleaned != values:
        log.warning("%s is not valid %s; carried repaired", keyword or tag, vr)
    if vr in ("DS", "IS"):
        cleaned = [v for v in cleaned if v]
    value: object
    if not cleaned:
        value = None
    elif len(cleaned) == 1:
        value = cleaned[0]
    else:
        value = MultiValue(str, cleaned)
    return DataElement(tag, vr, value)


def _vr_of(elem: DataElement | RawDataElement) -> str | None:
    vr = elem.VR
    if vr is None or vr in ("UN", "OB or OW", "US or SS"):
        try:
            vr = dictionary_VR(elem.tag)
        except KeyError:
            return None
    return str(vr)


def _encodings(ds: Dataset, inherited: list[str]) -> list[str]:
    raw = ds.get_item(0x00080005)
    if raw is None:
        return inherited
    value = raw.value
    if isinstance(value, bytes):
        terms: Sequence[str] = [t.strip() for t in value.decode("ascii", "replace").split("\\")]
    elif isinstance(value, str):
        terms = [value]
    else:
        terms = [str(v) for v in value] if value else []
    terms = [t for t in terms if t] or [""]
    if terms == [""]:
        return ["ascii"]  # the default repertoire
    try:
        return list(convert_encodings(terms))
    except LookupError:
        return inherited


def carried(source: Dataset, _encodings_in: list[str] | None = None) -> Dataset:
    """A copy of ``source`` with every text value decoded and valid; ``source`` is untouched.

    Binary and UID elements are shared as they are; sequence items are carried recursively
    (they inherit the character set). The copy declares ISO_IR 192: its values are str.
    """
    encodings = _encodings(source, _encodings_in or ["ascii"])
    out = Dataset()
    for tag in list(source.keys()):
        elem = source.get_item(tag)
        if elem is None or tag == 0x00080005:
            continue
        vr = _vr_of(elem)
        if vr == "SQ":
            items = source[tag].value
            out.add(DataElement(tag, "SQ", DicomSequence([carried(i, encodings) for i in items])))
        elif vr in TEXT_VRS and not BaseTag(tag).is_private:
            out.add(_clean_element(elem, vr, encodings))
        else:
            out[tag] = source[tag]
    out.SpecificCharacterSet = "ISO_IR 192"
    if hasattr(source, "file_meta"):
        out.file_meta = source.file_meta
    return out
