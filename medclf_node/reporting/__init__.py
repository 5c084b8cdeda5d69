"""reporting layer of medclf-node: result objects (TID 1500 SR, Secondary Capture) with deterministic UIDs.

The only place in the node that imports highdicom.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from medclf_node.domain import Code, ModelResult, NodeIdentity
from medclf_node.reporting.sc import build_sc, sc_to_png, slice_info_from_volume, slice_orientation
from medclf_node.reporting.sr import DISCLAIMER, build_sr
from medclf_node.reporting.uids import derive_uid, result_uids

log = logging.getLogger(__name__)

__all__ = [
    "DISCLAIMER", "build_sc", "build_sr", "derive_uid", "result_uids", "sc_to_png", "slice_info_from_volume",
    "slice_orientation", "warm_up",
]


def warm_up() -> float:
    """Build and discard one SR and one SC so the first real series does not pay highdicom's
    one-off loading of its DICOM standard tables (about 1-2 s); returns the seconds spent.
    """
    start = time.perf_counter()
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = derive_uid("warm-up", "instance")
    ds.StudyInstanceUID = derive_uid("warm-up", "study")
    ds.SeriesInstanceUID = derive_uid("warm-up", "series")
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    result = ModelResult(
        model_name="warm-up", model_version="0", finding=Code("0", "99MEDCLF", "warm-up"),
        probability=0.0, threshold=0.5, positive=False, key_slice_index=0,
    )
    identity = NodeIdentity(ae_title="WARMUP", device_name="warm-up")
    build_sr([ds], result, identity)
    build_sc(ds, np.zeros((8, 8), np.float32), result, identity)
    elapsed = time.perf_counter() - start
    log.debug("reporting warm-up took %.2f s", elapsed)
    return elapsed
