"""Write a synthetic fundus photograph as an Ophthalmic Photography 8 Bit Image (OP) instance.

Why: the node's 2D image path must be tested on what fundus cameras send: OP 8 Bit Image Storage
(SOP class 1.2.840.10008.5.1.4.1.1.77.1.5.1), colour, usually lossy JPEG baseline with
PhotometricInterpretation ``YBR_FULL_422`` (transfer syntax 1.2.840.10008.1.2.4.50), sometimes
uncompressed ``RGB``; with ImageLaterality R/L and the eye as anatomic region.  The JPEG is encoded
by Pillow with 4:2:2 chroma subsampling (the YCbCr data a YBR_FULL_422 JPEG holds) and
encapsulated as one fragment.  Values are synthetic (no patient data).
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from medclf_node.synthetic.dicom_writer import derived_uid

log = logging.getLogger(__name__)

OP_8BIT_STORAGE = UID("1.2.840.10008.5.1.4.1.1.77.1.5.1")
Encoding = Literal["jpeg", "rgb"]
#: Anatomic Region Sequence of the Ocular Region Imaged module (CID 4209); the side is ImageLaterality.
EYE = ("81745001", "SCT", "Eye")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def jpeg_ybr422(rgb: npt.NDArray[np.uint8], quality: int = 92) -> bytes:
    """Baseline JPEG of ``rgb`` with 4:2:2 chroma subsampling (Pillow's ``subsampling=1``), no JFIF thumbnail."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(buf, format="JPEG", quality=quality, subsampling=1,
                                                          optimize=False, progressive=False)
    return buf.getvalue()


def fundus_dataset(
    rgb: npt.NDArray[np.uint8],
    *,
    laterality: Literal["R", "L"],
    patient_id: str,
    encoding: Encoding = "jpeg",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    uid_seed: str | None = None,
    instance_number: int = 1,
    series_number: int = 1,
    study_date: str | None = None,
    field_of_view_deg: float = 45.0,
) -> Dataset:
    """An OP 8 Bit Image dataset (with file meta) holding ``rgb`` (rows, cols, 3) uint8."""
    img = np.asarray(rgb)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"rgb must be (rows, cols, 3) uint8, got {img.shape} {img.dtype}")
    if laterality not in ("R", "L"):
        raise ValueError(f"laterality {laterality!r}: R or L")
    if encoding not in ("jpeg", "rgb"):
        raise ValueError(f"encoding {encoding!r}: jpeg or rgb")

    def uid(given: str | None, role: str) -> str:
        if given:
            return given
        return derived_uid(uid_seed, role) if uid_seed is not None else generate_uid()

    date = study_date or _dt.date(2026, 1, 1).strftime("%Y%m%d")
    ts = JPEGBaseline8Bit if encoding == "jpeg" else ExplicitVRLittleEndian
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = OP_8BIT_STORAGE
    ds.SOPInstanceUID = uid(sop_uid, f"sop-{series_number}-{instance_number}")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.AcquisitionDateTime = f"{date}090000"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
    ds.AccessionNumber = ""
    ds.Modality = "OP"
    ds.Manufacturer = "medclf synthetic fundus"
    ds.ManufacturerModelName = "medclf_node.synthetic.fundus"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic fundus photography"
    ds.SeriesDescription = f"Synthetic colour fundus {laterality}"
    ds.PatientName = patient_id.replace("-", "^", 1)
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "EYE"
    ds.StudyInstanceUID = uid(study_uid, "study")
    ds.SeriesInstanceUID = uid(series_uid, f"series-{series_number}")
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.ImageLaterality = laterality
    ds.PatientOrientation = ""
    ds.SynchronizationFrameOfReferenceUID = uid(None, "sync")
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "N"
    ds.AnatomicRegionSequence = DicomSequence([_code(*EYE)])
    ds.PatientEyeMovementCommanded = "NO"
    ds.HorizontalFieldOfView = float(field_of_view_deg)
    ds.AcquisitionDeviceTypeCodeSequence = DicomSequence([_code("409899009", "SCT", "Fundus camera")])
    ds.IlluminationTypeCodeSequence = DicomSequence()
    ds.LightPathFilterTypeStackCodeSequence = DicomSequence()
    ds.ImagePathFilterTypeStackCodeSequence = DicomSequence()
    ds.LensesCodeSequence = DicomSequence()
    ds.DetectorType = "CCD"
    ds.PupilDilated = "NO"
    ds.RefractiveStateSequence = DicomSequence()
    ds.EmmetropicMagnification = 1.0
    ds.IntraOcularPressure = None
    ds.BurnedInAnnotation = "NO"
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00181063  # FrameTime (one frame: required by Multi-frame, value unused)
    ds.FrameTime = "0"
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(img.shape[0]), int(img.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if encoding == "jpeg":
        frame = jpeg_ybr422(img)
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = f"{img.nbytes / len(frame):.2f}"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
    else:
        ds.PhotometricInterpretation = "RGB"
        ds.LossyImageCompression = "00"
        ds.PixelData = np.ascontiguousarray(img).tobytes()
        ds["PixelData"].VR = "OB"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def write_fundus(rgb: npt.NDArray[np.uint8], path: Path | str, **kwargs: object) -> Path:
    """Write :func:`fundus_dataset` (same keyword arguments) as a DICOM file at ``path``."""
    ds = fundus_dataset(rgb, **kwargs)  # type: ignore[arg-type]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


__all__ = ["OP_8BIT_STORAGE", "fundus_dataset", "jpeg_ybr422", "write_fundus"]
