"""Compressed and unusual transfer syntaxes are accepted and stored exactly as received.

Real-world encodings from pydicom's test files go out through the node's own C-STORE SCU
(which proposes exactly each file's transfer syntax) into the node's SCP; the `jobs`
command then lists the series.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NODE_AE, SENDER_AE, RunningNode
from pydicom import dcmread
from pydicom.data import get_testdata_file
from test_intake_net import dataset_bytes

from medclf_node.net.scu import Peer, send_files

ENCODED = [
    "JPEG2000.dcm",  # JPEG 2000
    "emri_small_jpeg_2k_lossless.dcm",  # JPEG 2000 lossless
    "SC_rgb_rle.dcm",  # RLE lossless
    "JPEG-LL.dcm",  # JPEG lossless SV1
    "SC_jpeg_no_color_transform.dcm",  # JPEG baseline
    "JPEG-lossy.dcm",  # JPEG extended
    "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless; has no StudyInstanceUID -> refused 0xC210
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "image_dfl.dcm",  # deflated explicit VR little endian
    "CT_small.dcm",  # explicit VR little endian
]

NO_STUDY_UID = {"JPEGLSNearLossless_16.dcm"}  # a Type 1 UID is missing: cannot be filed


def _files() -> list[Path]:
    out = []
    for name in ENCODED:
        p = get_testdata_file(name, download=False)
        if p is None:
            pytest.skip(f"pydicom test file {name} not available")
        out.append(Path(str(p)))
    return out


def test_encodings_stored_as_received(node_factory) -> None:  # type: ignore[no-untyped-def]
    files = _files()
    node: RunningNode = node_factory()
    results = send_files(Peer(NODE_AE, "127.0.0.1", node.port), files, local_ae=SENDER_AE, timeout=30)
    expected = [(f.name, 0xC210 if f.name in NO_STUDY_UID else 0) for f in files]
    assert [(r.path.name, r.status) for r in results] == expected, results
    files = [f for f in files if f.name not in NO_STUDY_UID]
    with sqlite3.connect(node.data_dir / "index.sqlite") as c:
        rows = dict(c.execute("SELECT sop_instance_uid, path || '|' || transfer_syntax FROM instances").fetchall())
    assert len(rows) == len({str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files})
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        path, ts = rows[str(ds.SOPInstanceUID)].split("|")
        assert ts == ds.file_meta.TransferSyntaxUID, f.name
        assert dataset_bytes(node.data_dir / path) == dataset_bytes(f), f.name  # not transcoded

    jobs = subprocess.run([sys.executable, "-m", "medclf_node.cli", "jobs", "--config", str(node.config)],
                          capture_output=True, text=True, timeout=60)
    assert jobs.returncode == 0, jobs.stderr
    series = {str(dcmread(f, stop_before_pixels=True).SeriesInstanceUID)[:44] for f in files}
    listed = {line.split()[0] for line in jobs.stdout.splitlines()[1:]}
    assert series <= listed
    assert "complete" in jobs.stdout
