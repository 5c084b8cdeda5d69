"""`medclf-node demo` with the shipped default model: the newcomer's first command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
from PIL import Image

from medclf_node.demo import run_demo


def test_demo_command_reports_findings_that_match_ground_truth(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "medclf_node.cli", "demo", "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2/2 findings agree with the phantoms' ground truth" in proc.stdout
    assert "PRESENT" in proc.stdout and "absent" in proc.stdout
    pngs = sorted(out.glob("*_key_image.png"))
    assert len(pngs) == 2
    for png in pngs:
        with Image.open(png) as im:
            assert im.mode == "RGB" and min(im.size) >= 512
    received = [pydicom.dcmread(p) for p in (out / "received").glob("*.dcm")]
    assert sorted(ds.Modality for ds in received).count("SR") == 2
    assert len(received) == 4


def test_demo_findings_follow_the_phantoms(tmp_path: Path) -> None:
    findings = run_demo(tmp_path / "demo", seeds=(5, 6))
    by_truth = {f.truth_nodules > 0: f for f in findings}
    assert set(by_truth) == {True, False}
    for f in findings:
        assert f.state == "sent" and f.sr_uid is not None and f.sc_png is not None
        assert f.probability is not None and 0.0 <= f.probability <= 1.0
    assert by_truth[True].probability is not None and by_truth[False].probability is not None
    assert by_truth[True].probability > by_truth[False].probability
