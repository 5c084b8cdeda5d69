"""A synthetic CT study and the node's own result objects for it, as the viewer test stores them.

The real chain, minus the network: phantom -> DICOM files -> ``assemble_volume`` -> the shipped
LiteRT model (``models/nodule-2p5d-int8``) -> ``build_sr`` / ``build_sc``.  A small phantom keeps
inference and the browser's image loading to seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from medclf_node.config import VolumeSection
from medclf_node.domain import ModelResult, NodeIdentity, Volume
from medclf_node.inference.predict import predict_series
from medclf_node.inference.registry import load_model
from medclf_node.ingest.volume import assemble_volume
from medclf_node.reporting import build_sc, build_sr, slice_orientation
from medclf_node.synthetic.dicom_writer import write_ct_series
from medclf_node.synthetic.phantoms import make_phantom

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "nodule-2p5d-int8"
IDENTITY = NodeIdentity(ae_title="MEDCLF", device_name="medclf-node-viewer-test")
SHAPE = (40, 192, 192)  # slices, rows, columns: small enough for a quick load in the browser
SPACING = (3.0, 1.8, 1.8)

BuildSR = Callable[..., Dataset]


@dataclass(frozen=True)
class Study:
    """Files of one study (CT series, SR, SC) and what the model said."""

    study_uid: str
    ct_files: list[Path]
    sr_file: Path
    sc_file: Path
    result: ModelResult
    volume: Volume

    @property
    def files(self) -> list[Path]:
        return [*self.ct_files, self.sr_file, self.sc_file]


def make_study(out: Path, *, seed: int = 2, build: BuildSR = build_sr) -> Study:
    """Write a positive phantom study and the node's SR and SC for it under ``out``.

    ``build`` replaces :func:`build_sr` (the failure check builds the SR the old way).
    """
    phantom = make_phantom(seed, shape=SHAPE, spacing=SPACING, nodules=1, radius_range_mm=(8.0, 10.0))
    ct_dir = out / "ct"
    ct_files = write_ct_series(phantom.hu, phantom.spacing, ct_dir, patient_id=phantom.patient_id,
                               patient_name="Phantom^Viewer", uid_seed=f"viewer-{seed}",
                               accession_number="VIEW1")
    volume = assemble_volume(ct_files, VolumeSection())
    model = load_model(MODEL_DIR, threads=1)
    result = predict_series(model, volume)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct_files]
    key_ref = volume.slice_refs[result.key_slice_index]
    sr = build(sources, result, IDENTITY, key_ref=key_ref, volume=volume) if build is build_sr \
        else build(sources, result, IDENTITY, key_ref=key_ref)
    by_uid = {str(ds.SOPInstanceUID): i for i, ds in enumerate(sources)}
    key_full = pydicom.dcmread(ct_files[by_uid[key_ref.sop_instance_uid]])
    sc = build_sc(key_full, volume.array[result.key_slice_index], result, IDENTITY,
                  key_frame_number=key_ref.frame_number, orientation=slice_orientation(volume.affine))
    sr_file, sc_file = out / "sr.dcm", out / "sc.dcm"
    sr.save_as(sr_file, enforce_file_format=True)
    sc.save_as(sc_file, enforce_file_format=True)
    log.info("viewer study %s: p=%.3f key slice %d", sources[0].StudyInstanceUID, result.probability,
             result.key_slice_index)
    return Study(str(sources[0].StudyInstanceUID), ct_files, sr_file, sc_file, result, volume)
