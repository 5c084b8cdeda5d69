"""Decoding is bounded: a compressed frame whose own header disagrees with the DICOM header is refused
before any decoder allocates (issue 15: a 20000 x 20000 JPEG header inside a 512 x 512 DICOM made
pylibjpeg allocate ~2 GB).

Crafted JPEG baseline, JPEG-LS and JPEG 2000 frames: unit checks of the header parsers, the
volume stage (the decoder is never called), and the whole node (storescu -> pipeline: series
``failed`` with reason ``codec_mismatch``, node memory bounded).
"""

from __future__ import annotations

import io
import sqlite3
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import needs_dcmtk, storescu
from ctseries import hu_phantom, make_series, write_series
from fixtures_models import tiny_models_dir  # noqa: F401  (fixture)
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless

from medclf_node.config import VolumeSection
from medclf_node.ingest import codec_headers, volume
from medclf_node.ingest.codec_headers import CodecHeaderError, FrameGeometry, disagreement, frame_geometry
from medclf_node.ingest.volume import VolumeError, assemble_volume

BOMB = 20000
POLICY = VolumeSection()


# --- crafting ------------------------------------------------------------------------------------
def _jpeg_series(n: int, rows: int, cols: int) -> list[Dataset]:
    """8-bit MONOCHROME2 slices encoded as JPEG baseline with Pillow."""
    series = make_series(hu_phantom(n, rows=rows, cols=cols), slope=1.0, intercept=-1024.0)
    rng = np.random.default_rng(3)
    for ds in series:
        img = rng.integers(0, 255, size=(rows, cols), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="JPEG", quality=90)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation = "MONOCHROME2"
    return series


def _series(syntax: str, n: int = 3, rows: int = 64, cols: int = 64) -> list[Dataset]:
    if syntax == JPEGBaseline8Bit:
        return _jpeg_series(n, rows, cols)
    series = make_series(hu_phantom(n, rows=rows, cols=cols))
    for ds in series:
        ds.compress(syntax)
    return series


def _frame(ds: Dataset) -> bytes:
    return next(iter(generate_frames(ds.PixelData, number_of_frames=1)))


def _claim(frame: bytes, syntax: str, rows: int, cols: int) -> bytes:
    """``frame`` with its codec header claiming ``rows`` x ``cols`` (the data after it unchanged)."""
    out = bytearray(frame)
    if syntax == JPEG2000Lossless:
        struct.pack_into(">LL", out, 8, cols, rows)  # Xsiz, Ysiz (XOsiz = YOsiz = 0)
        struct.pack_into(">LL", out, 24, cols, rows)  # one tile covering it all
        return bytes(out)
    pos = 2
    while out[pos + 1] not in (0xC0, 0xC1, 0xC3, 0xF7):
        pos += 2 + struct.unpack_from(">H", out, pos + 2)[0]
    struct.pack_into(">HH", out, pos + 5, rows, cols)
    return bytes(out)


def _bomb(series: list[Dataset], syntax: str, k: int = 1) -> list[Dataset]:
    series[k].PixelData = encapsulate([_claim(_frame(series[k]), syntax, BOMB, BOMB)])
    return series


SYNTAXES = [JPEGBaseline8Bit, JPEGLSLossless, JPEG2000Lossless]
STORESCU_PROPOSE = {JPEGBaseline8Bit: "-xy", JPEGLSLossless: "-xt", JPEG2000Lossless: "-xv"}


# --- the parsers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("syntax", SYNTAXES)
def test_real_frames_declare_their_dicom_geometry(syntax: str) -> None:
    ds = _series(syntax, n=1, rows=48, cols=80)[0]
    geometry = frame_geometry(_frame(ds), syntax)
    assert (geometry.rows, geometry.columns, geometry.components) == (48, 80, 1)
    assert geometry.precision <= ds.BitsAllocated
    assert disagreement(geometry, 48, 80, 1, ds.BitsAllocated) is None


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_crafted_header_is_seen(syntax: str) -> None:
    ds = _series(syntax, n=1)[0]
    geometry = frame_geometry(_claim(_frame(ds), syntax, BOMB, BOMB), syntax)
    assert (geometry.rows, geometry.columns) == (BOMB, BOMB)
    why = disagreement(geometry, 64, 64, 1, ds.BitsAllocated)
    assert why is not None and f"{BOMB} x {BOMB} pixels, DICOM says 64 x 64" in why


def test_disagreement_names_components_and_precision() -> None:
    why = disagreement(FrameGeometry(64, 64, 3, 16), 64, 64, 1, 8)
    assert why == "3 component(s), DICOM says 1 sample(s) per pixel; 16-bit samples, DICOM allocates 8 bits"


@pytest.mark.parametrize("frame,syntax", [
    (b"", JPEGBaseline8Bit),
    (b"\xff\xd8", JPEGBaseline8Bit),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", JPEGBaseline8Bit),  # APP0 running past the end
    (b"\xff\xd8\xff\xc0\x00\x11\x08", JPEGLSLossless),  # SOF cut short
    (b"\xff\xd8\xff\xda\x00\x08", JPEGBaseline8Bit),  # scan before any frame header
    (b"\xff\xd8\x13\x13\x13\x13", JPEGBaseline8Bit),
    (b"\xff\x4f\xff\x51\x00\x29", JPEG2000Lossless),  # SIZ cut short
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 20, JPEG2000Lossless),  # JP2 without a codestream
    (b"\xff\x4f\xff\x90", JPEG2000Lossless),
    (b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x40\x00\x40\x01", "1.2.840.10008.1.2.5"),  # not a checked syntax
])
def test_unreadable_headers_raise_codec_header_error(frame: bytes, syntax: str) -> None:
    with pytest.raises(CodecHeaderError):
        frame_geometry(frame, syntax)


# --- the volume stage ----------------------------------------------------------------------------
@pytest.mark.parametrize("syntax", SYNTAXES)
def test_volume_stage_refuses_before_decoding(syntax: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_series(_bomb(_series(syntax), syntax), tmp_path / "s")
    decoded: list[Any] = []
    real = volume.iter_pixels

    def watching(path: Any, *args: Any, **kwargs: Any) -> Any:
        decoded.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(volume, "iter_pixels", watching)
    with pytest.raises(VolumeError) as info:
        assemble_volume(paths, POLICY)
    assert info.value.code == "codec_mismatch"
    assert f"{BOMB} x {BOMB} pixels, DICOM says 64 x 64" in info.value.message
    assert paths[1].name not in decoded, "the crafted frame never reached a decoder"


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_untouched_compressed_series_still_assemble(syntax: str, tmp_path: Path) -> None:
    vol = assemble_volume(write_series(_series(syntax), tmp_path / "s"), POLICY)
    assert vol.array.shape[1:] == (64, 64)


def test_frames_that_cannot_be_split_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_series(_series(JPEGLSLossless), tmp_path / "s")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("no frames here")

    monkeypatch.setattr(codec_headers, "generate_fragmented_frames", broken)
    with pytest.raises(VolumeError) as info:
        assemble_volume(paths, POLICY)
    assert info.value.code == "decode_failed" and "cannot split the frames" in info.value.message


# --- through the node ----------------------------------------------------------------------------
def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@needs_dcmtk
def test_node_refuses_decompression_bombs_with_a_recorded_reason(
    node_factory: Any, tiny_models_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    node = node_factory(
        models={"directory": str(tiny_models_dir)},
        rules=[{"name": "ct", "models": ["test-2p5d-int8"], "min_slices": 3}],
        pipeline={"enabled": True},
        completion={"on_release": True},
        folders=[{"name": "out", "path": str(tmp_path / "out")}],
        results={"destinations": ["out"]},
    )
    series_uids = {}
    for syntax in SYNTAXES:
        series = _bomb(_series(syntax, rows=512, cols=512), syntax)
        series_uids[str(series[0].SeriesInstanceUID)] = syntax
        sent = storescu(node.port, write_series(series, tmp_path / syntax), extra=[STORESCU_PROPOSE[syntax]])
        assert sent.returncode == 0, sent.stdout + sent.stderr
    deadline = time.monotonic() + 90
    rows: dict[str, tuple[str, str, str]] = {}
    while time.monotonic() < deadline:
        con = sqlite3.connect(node.data_dir / "index.sqlite", timeout=30)
        try:
            rows = {r[0]: r[1:] for r in con.execute("SELECT series_uid, state, reason_code, reason_text FROM series")}
        finally:
            con.close()
        if len(rows) == 3 and all(state in ("failed", "reported", "skipped") for state, _, _ in rows.values()):
            break
        time.sleep(0.3)
    assert set(rows) == set(series_uids), node.log()[-2000:]
    for uid, (state, code, text) in rows.items():
        assert (state, code) == ("failed", "codec_mismatch"), (series_uids[uid], state, code, text)
        assert f"{BOMB} x {BOMB} pixels, DICOM says 512 x 512" in text
    assert node.proc.poll() is None
    # a decoded 20000 x 20000 frame alone is 400 MB (8 bit) to 1.6 GB (J2K's int32 buffers)
    assert _peak_rss_mb(node.proc.pid) < 400, _peak_rss_mb(node.proc.pid)
    assert "refused before decoding" in node.log()


def test_checked_syntaxes_cover_the_node_s_compressed_offer() -> None:
    from medclf_node.net.scp import TRANSFER_SYNTAXES

    wavelet_and_dct = {str(ts) for ts in TRANSFER_SYNTAXES if "1.2.840.10008.1.2.4." in str(ts)}
    assert wavelet_and_dct <= codec_headers.CHECKED
    assert pydicom.uid.RLELossless not in codec_headers.CHECKED  # RLE output size comes from Rows/Columns
