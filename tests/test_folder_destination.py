"""Results sent to a folder: the default `make run` delivers somewhere a newcomer can open.

A ``[[folders]]`` destination is written durably as <study>/<series>/<sop>.dcm (+ the key image as
PNG); it goes through the same outbox as a peer (sent / retried / dead-lettered).  The shipped
default config, run with the shipped model, leaves SR + SC + PNG in var/results and marks the
series sent (the old default "sender" dead-lettered every result of a first push).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import ROOT, needs_dcmtk, start_node, storescu
from fixtures_models import phantom_volume
from intake_series import write_ct_series as write_small_series
from PIL import Image
from stores import open_test_store
from test_outbox import seed_series, wait_for

from medclf_node.config import ConfigError, parse_config
from medclf_node.folder_destination import deliver, folder_target
from medclf_node.outbox import Dispatcher
from medclf_node.synthetic.dicom_writer import write_ct_series

PEER = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}


def test_folder_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg = parse_config({"folders": [{"name": "local", "path": "out"}], "results": {"destinations": ["local"]}},
                       base_dir=tmp_path)
    folder = cfg.folder("local")
    assert folder is not None and folder.path == (tmp_path / "out").resolve() and folder.png
    assert cfg.folder("pacs") is None


@pytest.mark.parametrize(("sections", "message"), [
    ({"results": {"destinations": ["nowhere"]}}, "'nowhere' is neither a peer nor a folder"),
    ({"peers": [PEER], "folders": [{"name": "pacs", "path": "x"}]}, "differ from every peer name"),
    ({"folders": [{"name": "sender", "path": "x"}]}, 'may not be "sender"'),
    ({"folders": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "repeated: ['a']"),
])
def test_bad_folder_config_names_the_key(sections: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(sections)
    assert message in str(err.value)


def test_deliver_writes_durably_under_study_and_series(tmp_path: Path) -> None:
    files = write_small_series(tmp_path / "src", 2, 16, 16, seed=3)
    cfg = parse_config({"folders": [{"name": "local", "path": str(tmp_path / "out")}],
                        "results": {"destinations": ["local"]}})
    folder = cfg.folder("local")
    assert folder is not None
    assert deliver(folder, files) == [None, None]
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        target = folder_target(folder.path, ds)
        assert target == tmp_path / "out" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert target.read_bytes() == f.read_bytes()
        assert not target.with_suffix(".png").exists()  # CT images are not key images
    assert not list((tmp_path / "out").rglob("*.tmp*"))


def test_a_uid_that_is_not_a_safe_file_name_is_an_error_not_a_path(tmp_path: Path) -> None:
    (src,) = write_small_series(tmp_path / "src", 1, 8, 8, seed=4)
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = "../../etc/passwd"
    ds.save_as(src)
    folder = parse_config({"folders": [{"name": "f", "path": str(tmp_path / "out")}]}).folder("f")
    assert folder is not None
    (err,) = deliver(folder, [src])
    assert err is not None and "SOPInstanceUID" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*"))


def test_dispatcher_sends_to_a_folder_and_retries_when_it_cannot_write(tmp_path: Path) -> None:
    data = tmp_path / "data"
    files = write_small_series(data / "outbox", 2, 16, 16, seed=21)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    blocker = tmp_path / "out"
    blocker.write_text("a file where the folder should be")  # cannot mkdir under it: a failed attempt
    cfg = parse_config({
        "node": {"data_dir": str(data), "port": 0},
        "folders": [{"name": "local", "path": str(blocker)}],
        "results": {"destinations": ["local"]},
        "dispatch": {"initial_backoff_seconds": 0.1, "max_backoff_seconds": 0.2, "max_attempts": 50},
    })
    index = open_test_store(data)
    seed_series(index, uids, "local")
    disp = Dispatcher(cfg, index, poll_seconds=0.05)
    disp.start()
    try:
        assert wait_for(lambda: all(i.attempts >= 1 for i in index.outbox_items()), 10)
        assert {i.state for i in index.outbox_items()} == {"queued"}
        assert "Error" in (index.outbox_items()[0].last_error or "")
        blocker.unlink()
        assert wait_for(lambda: {i.state for i in index.outbox_items()} == {"sent"}, 10)
        assert index.get_series("7.7").state == "sent"  # type: ignore[union-attr]
        assert len(list(blocker.rglob("*.dcm"))) == 2
    finally:
        disp.stop()
        index.close()


@needs_dcmtk
def test_default_config_with_the_shipped_model_leaves_results_a_newcomer_can_open(tmp_path: Path) -> None:
    """deploy/medclf-node.toml as `make run` uses it: only the ports and the models path are adapted."""
    text = (ROOT / "deploy" / "medclf-node.toml").read_text()
    assert tomllib.loads(text)["results"]["destinations"] == ["local"]
    text = text.replace("port = 11112", "port = 0").replace('directory = "../models"',
                                                             f'directory = "{ROOT / "models"}"')
    text += "\n[metrics]\nport = 0\n\n[retention]\nmin_free_disk_mb = 0\n"
    (tmp_path / "deploy").mkdir()
    config = tmp_path / "deploy" / "medclf-node.toml"
    config.write_text(text)
    data_dir = tmp_path / "var"  # data_dir = "../var" relative to the config, as in the repository
    node = start_node(config, data_dir, tmp_path / "node.log", timeout=60)
    try:
        hu = phantom_volume((24, 96, 96), (2.5, 3.5, 3.5), (30.0, 168.0, 100.0, 12.0), seed=5)
        paths = write_ct_series(hu, (2.5, 3.5, 3.5), tmp_path / "study", patient_id="P-1", uid_seed="newcomer")
        proc = storescu(node.port, tmp_path / "study")
        assert proc.returncode == 0, proc.stderr
        results = data_dir / "results"
        assert wait_for(lambda: len(list(results.rglob("*.png"))) == 1 and len(list(results.rglob("*.dcm"))) == 2,
                        120), node.log()
        src = pydicom.dcmread(paths[0], stop_before_pixels=True)
        written = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(results.rglob("*.dcm"))]
        assert sorted(ds.Modality == "SR" for ds in written) == [False, True]  # one SR, one key image
        assert all(ds.StudyInstanceUID == src.StudyInstanceUID for ds in written)
        (png,) = results.rglob("*.png")
        assert np.asarray(Image.open(png)).ndim == 3
        assert f"results to folder {results}" in node.log()
        assert wait_for(lambda: "sent" in _jobs(config), 30)
        listing = _jobs(config)
        assert "failed" not in listing and "dead" not in listing, listing
    finally:
        node.stop()


def _jobs(config: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "medclf_node.cli", "jobs", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout
