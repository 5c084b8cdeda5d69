"""One 2D image instance (DX, CR, MG, OP/XC photograph) -> display values in [0, 1].

Why a module of its own: a volume is HU on a patient grid, a 2D image is what a viewer would
show.  Image models are trained on display values, so each photometric interpretation is
brought to one form here, and ``preprocess.image_input`` does the rest (resize, channels,
normalisation), the same way for the node and for training:

* ``RGB`` (planar configuration 0 or 1), ``YBR_FULL`` / ``YBR_FULL_422`` (JPEG baseline, or native),
  ``YBR_ICT`` / ``YBR_RCT`` (JPEG 2000) -> (rows, cols, 3) RGB;
* ``MONOCHROME2`` -> (rows, cols, 1): Modality LUT, then the VOI window of the header (first one)
  or, without one, the image's own min..max;
* ``MONOCHROME1`` -> the same, inverted, so that bright always means dense / high signal;
* ``PALETTE COLOR`` and anything else: refused with ``unsupported_photometric``.

Untrusted input is checked before any decoder runs: one frame only, the frame size against
``limits.max_frame_pixels``, and (JPEG family / JPEG-LS / JPEG 2000) the codestream's own header
against Rows/Columns/Samples per Pixel (``codec_headers``), so a lying codestream cannot make a
decoder allocate gigabytes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from medclf_node.config import LimitsSection
from medclf_node.domain import Image2D, SliceRef
from medclf_node.ingest import codec_headers
from medclf_node.redact import scrub

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]

COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})


class ImageError(ValueError):
    """An instance that cannot be used as a 2D image; ``code`` goes into the index."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _check_header(ds: Dataset, name: str, limits: LimitsSection) -> str:
    """The photometric interpretation, after every check that needs no decoding."""
    if "PixelData" not in ds:
        raise ImageError("not_an_image", f"{name} has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR":
        raise ImageError("unsupported_photometric", f"{name}: PALETTE COLOR images are not supported "
                         "(send them as RGB)")
    if photometric not in COLOUR | GREY:
        raise ImageError("unsupported_photometric", f"{name}: photometric interpretation "
                         f"{scrub(photometric) or '(none)'} is not supported")
    samples = _int(ds, "SamplesPerPixel", 1)
    if samples != (3 if photometric in COLOUR else 1):
        raise ImageError("decode_failed", f"{name}: {samples} samples per pixel for {photometric}")
    if _int(ds, "NumberOfFrames", 1) != 1:
        raise ImageError("multi_frame", f"{name}: a 2D image model takes single-frame instances")
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if rows < 1 or cols < 1:
        raise ImageError("decode_failed", f"{name}: Rows/Columns missing or zero")
    if rows * cols > limits.max_frame_pixels:
        raise ImageError("too_large", f"{name}: {rows} x {cols} pixels exceed limits.max_frame_pixels "
                         f"{limits.max_frame_pixels}")
    return photometric


def _check_codestream(ds: Dataset, path: Path) -> None:
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if ts not in codec_headers.CHECKED:
        return
    try:
        frames = list(codec_headers.encapsulated_frames(path, [0], 1))
        (_, frame), = frames
        geometry = codec_headers.frame_geometry(frame, ts)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: a decoder would get no further
        raise ImageError("decode_failed", f"{path.name}: no readable codec header ({scrub(str(exc))})") from exc
    why = codec_headers.disagreement(geometry, _int(ds, "Rows", 0), _int(ds, "Columns", 0),
                                     _int(ds, "SamplesPerPixel", 1), _int(ds, "BitsAllocated", 8))
    if why is not None:
        log.warning("image: %s refused before decoding: codec header says %s", path.name, why)
        raise ImageError("codec_mismatch", f"{path.name}: codec header says {why}; not decoded")


def _first(value: object) -> float:
    """The first value of a possibly multi-valued DS (WindowCenter may list several windows)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


def _grey_display(raw: npt.NDArray[Any], ds: Dataset, photometric: str) -> F32:
    """Modality LUT, VOI (the header's first linear window, or its VOI LUT, or min..max), to [0, 1];
    MONOCHROME1 inverted so that bright means dense."""
    values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    window: tuple[float, float] | None = None
    try:
        if ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
            window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
    except (TypeError, ValueError, IndexError):
        window = None
    if window is not None and window[1] >= 1:
        c, w = window  # PS3.3 C.11.2.1.2.1, linear
        out = (values - (c - 0.5)) / max(w - 1.0, 1e-6) + 0.5
    else:
        if "VOILUTSequence" in ds:
            values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        out = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    out = np.clip(out, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)[..., None]


def image_from_dataset(ds: Dataset, path: Path, limits: LimitsSection) -> Image2D:
    """Decode ``ds`` (read from ``path`` with its pixel data) into an :class:`Image2D`."""
    photometric = _check_header(ds, path.name, limits)
    _check_codestream(ds, path)
    try:
        raw = ds.pixel_array  # pydicom converts YBR_* to RGB and planar configuration 1 to (rows, cols, 3)
    except Exception as exc:  # any decoder failure: refuse the image, never crash the worker
        raise ImageError("decode_failed", f"cannot decode the pixels of {path.name}: "
                         f"{type(exc).__name__}: {scrub(str(exc))}") from exc
    if photometric in COLOUR:
        if raw.ndim != 3 or raw.shape[2] != 3:
            raise ImageError("decode_failed", f"{path.name}: decoded colour image has shape {raw.shape}")
        bits = _int(ds, "BitsStored", 8)
        pixels = (np.asarray(raw, np.float32) / np.float32(2 ** bits - 1)).clip(0.0, 1.0)
    else:
        if raw.ndim != 2:
            raise ImageError("decode_failed", f"{path.name}: decoded grey image has shape {raw.shape}")
        pixels = _grey_display(raw, ds, photometric)
    spacing = None
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            if value is not None and len(value) == 2 and min(float(v) for v in value) > 0:
                spacing = (float(value[0]), float(value[1]))
                break
        except (TypeError, ValueError):
            continue
    ref = SliceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    return Image2D(np.ascontiguousarray(pixels, dtype=np.float32), ref, photometric, spacing)


def read_image_and_header(path: Path, limits: LimitsSection) -> tuple[Image2D, Dataset]:
    """Read one spooled instance once: the decoded image, and its header (pixel data dropped) for
    the SR's evidence and the SC's patient/study attributes."""
    try:
        ds = pydicom.dcmread(path, force=True)
        for _elem in ds.iterall():  # convert every element now (pydicom is lazy; found by fuzzing)
            pass
    except Exception as exc:  # noqa: BLE001 - untrusted bytes
        raise ImageError("unreadable", f"cannot read {path.name}: {type(exc).__name__}") from exc
    if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
        raise ImageError("unreadable", f"{path.name} has no SOP Class/Instance UID")
    image = image_from_dataset(ds, path, limits)
    del ds.PixelData
    return image, ds


def read_image(path: Path, limits: LimitsSection) -> Image2D:
    """Read and decode one spooled instance as a 2D image (see the module docstring)."""
    return read_image_and_header(path, limits)[0]


__all__ = ["Image2D", "ImageError", "image_from_dataset", "read_image", "read_image_and_header"]
