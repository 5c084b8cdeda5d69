"""The SR in a real viewer: OHIF Viewer 3 over Orthanc DICOMweb, in headless Chromium.

The study (a phantom CT series, the node's SR and SC for it, built by the real chain in
:mod:`viewer.study`) is stored in Orthanc; OHIF opens it with the SR display set in the
viewport, and the test checks what a radiologist sees: the key slice of the CT (not a black
viewport), the SR's annotation on it with the probability, and no console complaint that the
SR's measurement has no image region.  A screenshot is kept (tmp dir, and copied to
``var/test-artifacts/ohif-sr.png`` or ``$MEDCLF_ARTIFACTS_DIR``; the path is given as a
warning so it shows in pytest's summary).

Skipped when OHIF, Chromium, the DICOMweb plugin or Playwright are missing, or outside a
loopback-only network namespace; ``MEDCLF_REQUIRE_VIEWER=1`` (``make test``) turns the skip
into a failure.  Installs: ``make system-deps`` (outside the namespace).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from viewer.ohif import chromium_path, require_viewer, running_orthanc_dicomweb, serving_ohif
from viewer.study import Study, make_study

from medclf_node.reporting.sr import format_probability

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
# what OHIF logs when a measurement has no image region it can draw
BAD_CONSOLE = ("not currently supported, skipping annotation", "contains no SCOORD")
LOAD_TIMEOUT_MS = 30_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ViewerRun:
    """What the browser showed: viewport text, console lines, screenshot path."""

    viewport_text: str
    console: list[str] = field(default_factory=list)
    screenshot: Path | None = None
    error: str | None = None


def open_sr_in_ohif(study: Study, workdir: Path) -> ViewerRun:
    """Store ``study`` in Orthanc, open it in OHIF, load the SR display set; what was shown."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    console: list[str] = []
    shot = workdir / "ohif-sr.png"
    with running_orthanc_dicomweb(workdir / "orthanc", dicom_port=_free_port(), http_port=_free_port()) as orthanc:
        orthanc.upload(study.files)
        with serving_ohif(orthanc.url) as viewer, sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=chromium_path(), headless=True,
                # root in a container: no sandbox; no GPU: SwiftShader WebGL for cornerstone
                args=["--no-sandbox", "--use-gl=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"],
            )
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                sr_series = str(pydicom.dcmread(study.sr_file, stop_before_pixels=True).SeriesInstanceUID)
                # the SR as the study's first display set (double-clicking its thumbnail after the CT
                # loaded left the annotation undrawn in about half the runs: a race inside OHIF 3.13)
                page.goto(viewer.study_url(study.study_uid, sr_series))
                sr_thumb = page.locator('[data-cy="study-browser-thumbnail-no-image"]')
                sr_thumb.first.wait_for(timeout=LOAD_TIMEOUT_MS)
                page.locator('[data-cy="viewport-pane"]').first.wait_for(timeout=LOAD_TIMEOUT_MS)
                tour = page.get_by_text("Skip all")  # OHIF's first-visit tour covers the viewport
                try:
                    tour.click(timeout=3_000)
                except PlaywrightError:
                    log.info("no OHIF tour to dismiss")
                error = None
                try:
                    page.locator('[data-cy="viewport-pane"] svg text', has_text="Probability").first.wait_for(
                        timeout=LOAD_TIMEOUT_MS)
                except PlaywrightError as exc:
                    error = f"no SR annotation appeared: {exc.message.splitlines()[0]}"
                time.sleep(1.0)  # let the last frame render before the screenshot
                page.screenshot(path=str(shot))
                text = page.locator('[data-cy="viewport-grid"]').first.inner_text()
            finally:
                browser.close()
    (workdir / "console.txt").write_text("\n".join(console), encoding="utf-8")
    return ViewerRun(text, console, shot, error)


def keep_artifact(path: Path) -> Path:
    """Copy the screenshot where CI keeps artifacts and say where."""
    dest_dir = Path(os.environ.get("MEDCLF_ARTIFACTS_DIR", ROOT / "var" / "test-artifacts"))
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / path.name
    shutil.copyfile(path, dest)
    warnings.warn(f"OHIF screenshot: {dest}", stacklevel=2)
    return dest


def check_sr_displayed(study: Study, run: ViewerRun) -> None:
    """The assertions of the viewer test, reusable on an SR built another way."""
    bad = [line for line in run.console if any(b in line for b in BAD_CONSOLE)]
    assert run.error is None, f"{run.error}; console: {bad or run.console[-15:]}"
    r = study.result
    for expected in (f"Probability: {r.probability:.2f}",
                     f"{r.finding.meaning}: {'present' if r.probability >= r.threshold else 'absent'}",
                     f"p = {format_probability(r.probability)}"):  # the precision OHIF's 2 decimals lose
        assert expected in run.viewport_text, f"{expected!r} not in viewport text {run.viewport_text!r}"
    # the key slice of the CT is displayed (OHIF counts instances 1-based in the series' order)
    k = study.result.key_slice_index
    assert re.search(rf"\bI:\s*{k + 1}\s*\(\s*{k + 1}/{len(study.ct_files)}\)", run.viewport_text), run.viewport_text
    assert not bad, bad


def test_ohif_shows_the_sr_finding_on_the_key_slice(tmp_path: Path) -> None:
    require_viewer()
    study = make_study(tmp_path / "study")
    t0 = time.monotonic()
    run = open_sr_in_ohif(study, tmp_path)
    log.info("viewer round trip %.1f s", time.monotonic() - t0)
    assert run.screenshot is not None and run.screenshot.is_file()
    keep_artifact(run.screenshot)
    check_sr_displayed(study, run)


def test_viewer_prerequisites_are_named_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the tools the test says what to install, and MEDCLF_REQUIRE_VIEWER=1 fails it."""
    import viewer.ohif as ohif

    monkeypatch.setattr(ohif, "OHIF_DIST", tmp := Path("/nonexistent/ohif/dist"))
    reason = ohif.viewer_unavailable_reason()
    assert reason is not None and str(tmp) in reason and "make system-deps" in reason
    monkeypatch.setenv(ohif.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="MEDCLF_REQUIRE_VIEWER=1"):
        ohif.require_viewer()
    monkeypatch.setenv(ohif.REQUIRE_ENV, "0")
    with pytest.raises(pytest.skip.Exception):
        ohif.require_viewer()
