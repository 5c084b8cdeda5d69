"""`medclf-node demo`: the whole loop on loopback in one command, with no data of your own.

It starts a node with a temporary data directory, makes two synthetic chest CT studies (one
with a pulmonary nodule, one without), pushes them to the node with C-STORE, receives the SR
and Secondary Capture results on a local stand-in PACS, and returns each finding with its
probability and the SC written as PNG.

The phantoms come from the synthetic CT generator (numpy only); nothing here needs TensorFlow.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from medclf_node.config import DEFAULT_MODELS_DIR, Config, parse_config
from medclf_node.net.receiver import StoringReceiver
from medclf_node.net.scu import Peer, send_files
from medclf_node.node import build_node
from medclf_node.reporting import sc_to_png
from medclf_node.store import Store
from medclf_node.synthetic.dicom_writer import write_ct_series
from medclf_node.synthetic.phantoms import make_phantom

log = logging.getLogger(__name__)

NODE_AE, SENDER_AE, PACS_AE = "MEDCLF", "DEMOSCU", "DEMOPACS"
DEMO_SHAPE = (96, 512, 512)  # slices, rows, columns: a real CT matrix, a short chest range
DEMO_SPACING = (2.5, 0.7, 0.7)


class DemoError(RuntimeError):
    """The demo could not complete; the message says which step."""


@dataclass(frozen=True)
class DemoFinding:
    """One demo study and what the node concluded about it."""

    patient_id: str
    truth_nodules: int
    series_uid: str
    state: str
    model: str | None
    finding: str | None
    probability: float | None
    positive: bool | None
    sr_uid: str | None
    sc_png: Path | None
    seconds: float

    @property
    def agrees_with_truth(self) -> bool:
        return self.positive is not None and self.positive == (self.truth_nodules > 0)


def demo_config(work: Path, models_dir: Path, pacs_port: int) -> Config:
    return parse_config(
        {
            "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": 0, "data_dir": str(work / "node")},
            "peers": [
                {"name": "scanner", "ae_title": SENDER_AE, "host": "127.0.0.1", "port": 1},
                {"name": "pacs", "ae_title": PACS_AE, "host": "127.0.0.1", "port": pacs_port},
            ],
            "accept": {"calling_ae_titles": [SENDER_AE]},
            "completion": {"on_release": True},
            "results": {"destinations": ["pacs"]},
            "models": {"directory": str(models_dir)},
            "dispatch": {"initial_backoff_seconds": 0.5},
            "metrics": {"enabled": False},
            "retention": {"min_free_disk_mb": 0},  # a throw-away node with a few MB of data
        }
    )


def _studies(work: Path, seeds: tuple[int, int]) -> list[tuple[str, int, list[Path]]]:
    out = []
    for seed, nodules in zip(seeds, (1, 0), strict=True):
        ph = make_phantom(seed, shape=DEMO_SHAPE, spacing=DEMO_SPACING, nodules=nodules,
                          radius_range_mm=(8.0, 12.0), patient_id=f"DEMO-{seed}")
        paths = write_ct_series(ph.hu, ph.spacing, work / "studies" / ph.patient_id, patient_id=ph.patient_id,
                                uid_seed=f"demo-{seed}", series_description="Demo chest CT (synthetic)")
        out.append((ph.patient_id, len(ph.nodules), paths))
    return out


def run_demo(
    out_dir: Path,
    *,
    models_dir: Path = DEFAULT_MODELS_DIR,
    seeds: tuple[int, int] = (1, 2),
    timeout: float = 90.0,
    say: Callable[[str], None] = lambda _m: None,
) -> list[DemoFinding]:
    """Run the demo; PNGs and received objects go to ``out_dir``.  ``say`` reports progress."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medclf-demo-") as tmp:
        work = Path(tmp)
        receiver = StoringReceiver(PACS_AE, 0, out_dir / "received")
        node = None
        try:
            cfg = demo_config(work, models_dir, receiver.port)
            say(f"loading models from {models_dir} ...")
            node = build_node(cfg)
            port = node.start()
            say(f"node {NODE_AE} listening on 127.0.0.1:{port}; stand-in PACS {PACS_AE} on :{receiver.port}")
            say("generating two synthetic chest CT studies (one with a nodule, one without) ...")
            studies = _studies(work, seeds)
            t0 = time.monotonic()
            for patient_id, _, paths in studies:
                results = send_files(Peer(NODE_AE, "127.0.0.1", port), paths, local_ae=SENDER_AE)
                bad = [r for r in results if not r.ok]
                if bad:
                    raise DemoError(f"C-STORE of {patient_id} failed: {bad[0].error or hex(bad[0].status or 0)}")
                say(f"sent {len(paths)} images of {patient_id}")
            expected = 2 * len(studies) if cfg.results.send_sr and cfg.results.send_sc else len(studies)
            if not receiver.wait_for(lambda r: len(r.counts) >= expected, timeout):
                states = {s.series_uid: (s.state, s.reason_code) for s in node.store.list_series()}
                raise DemoError(f"results did not arrive within {timeout:.0f} s (series: {states})")
            elapsed = time.monotonic() - t0
            return [_finding(node.store, receiver, out_dir, pid, truth, paths, elapsed)
                    for pid, truth, paths in studies]
        finally:
            if node is not None:
                node.stop()
            receiver.stop()


def _finding(store: Store, receiver: StoringReceiver, out_dir: Path, patient_id: str, truth: int,
             paths: list[Path], elapsed: float) -> DemoFinding:
    series_uid = str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    row = store.get_series(series_uid)
    state = row.state if row is not None else "unknown"
    results = store.results(series_uid)
    sr_uid = sc_png = None
    for ds in receiver.datasets.values():
        if ds.get("PatientID") != patient_id:
            continue
        if ds.Modality == "SR":
            sr_uid = str(ds.SOPInstanceUID)
        else:
            sc_png = sc_to_png(ds, out_dir / f"{patient_id}_key_image.png")
    if not results:
        return DemoFinding(patient_id, truth, series_uid, state, None, None, None, None, sr_uid, sc_png, elapsed)
    r = results[0]
    finding = str(r.details.get("finding", "finding"))
    return DemoFinding(patient_id, truth, series_uid, state, r.model_name, finding, r.probability, r.positive,
                       sr_uid, sc_png, elapsed)


__all__ = ["DemoError", "DemoFinding", "run_demo"]
