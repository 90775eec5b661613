"""Write one rendered phase as a CT Image Storage series, as a scanner would have sent it.

Modules written (PS3.3 A.3 CT Image IOD): Patient, General Study, Patient Study, General
Series, Frame of Reference, General Equipment, General Acquisition, General Image, Image Plane,
Image Pixel, Contrast/Bolus (contrast phases only), CT Image, VOI LUT, SOP Common. Transfer
syntax Explicit VR Little Endian (PS3.5 A.2), Part 10 files with File Meta Information.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from node.phantom.render import RESCALE_INTERCEPT, Grid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SOFTWARE_VERSION = "liver-node phantom 1"

#: Per phase: series number, description, seconds after the bolus start (None = plain scan).
PHASE_SERIES: dict[str, tuple[int, str, float | None]] = {
    "native": (2, "ABD 5mm NATIVE", None),
    "arterial": (3, "ABD 5mm ARTERIAL", 22.0),
    "portal_venous": (4, "ABD 5mm PORTAL VENOUS", 50.0),
    "delayed": (5, "ABD 5mm DELAYED", 150.0),
}
#: The plain scan is acquired this long before the bolus starts.
NATIVE_LEAD_S = 120.0


@dataclass(frozen=True)
class StudyInfo:
    """Identification shared by every series of one study."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    study_instance_uid: str
    study_date: str
    study_time: str  # HHMMSS of the study start; the bolus starts 4 min later
    accession_number: str
    study_id: str
    frame_of_reference_uid: str
    uid_seed: str  # entropy for the per-instance UIDs


_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:liver-node:phantom")


def uid(*parts: object) -> str:
    """A deterministic UUID-derived 2.25 UID from ``parts`` (PS3.5 B.2, name-based UUID v5).

    Not ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)``: with ``prefix=None``
    pydicom 3.0 ignores ``entropy_srcs`` and returns a random UUID4 UID.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(map(str, parts))).int}"


def _clock(study: StudyInfo, seconds_after_start: float) -> tuple[str, str]:
    """(DA, TM) ``seconds_after_start`` after the study start."""
    t0 = datetime.strptime(study.study_date + study.study_time, "%Y%m%d%H%M%S")
    t = t0 + timedelta(seconds=seconds_after_start)
    return t.strftime("%Y%m%d"), t.strftime("%H%M%S.%f")[:13]


def _age(birth: str, on: str) -> str:
    b, d = datetime.strptime(birth, "%Y%m%d"), datetime.strptime(on, "%Y%m%d")
    years = d.year - b.year - ((d.month, d.day) < (b.month, b.day))
    return f"{years:03d}Y"


def _common(study: StudyInfo, phase: str, series_uid: str) -> Dataset:
    """Attributes shared by every image of the series."""
    number, description, _ = PHASE_SERIES[phase]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.PatientAge = _age(study.birth_date, study.study_date)
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate, ds.StudyTime = study.study_date, study.study_time
    ds.AccessionNumber = study.accession_number
    ds.ReferringPhysicianName = "REFERRING^PHYSICIAN"
    ds.StudyID = study.study_id
    ds.StudyDescription = "CT ABDOMEN LIVER MULTIPHASE"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.ProtocolName = "LIVER 4-PHASE"
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "liver-node phantom"
    ds.InstitutionName = "liver-node synthetic data"
    ds.StationName = "PHANTOM01"
    ds.ManufacturerModelName = "Synthetic 64-slice CT"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    _ct_module(ds)
    return ds


def _ct_module(ds: Dataset) -> None:
    """CT Image module (PS3.3 C.8.2.1) and Image Pixel description, 12 bits stored."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.KVP = 80
    ds.XRayTubeCurrent = 200
    ds.ExposureTime = 500
    ds.Exposure = 100
    ds.ScanOptions = "HELICAL MODE"
    ds.DataCollectionDiameter = 500
    ds.DistanceSourceToDetector = 1040
    ds.DistanceSourceToPatient = 570
    ds.GantryDetectorTilt = 0
    ds.TableHeight = 160
    ds.RotationDirection = "CW"
    ds.FilterType = "BODY"
    ds.ConvolutionKernel = "B30f"
    ds.RevolutionTime = 0.5
    ds.SingleCollimationWidth = 0.625
    ds.TotalCollimationWidth = 40
    ds.SpiralPitchFactor = 0.984
    ds.WindowCenter = 50
    ds.WindowWidth = 350
    ds.WindowCenterWidthExplanation = "ABDOMEN"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"


def _contrast(ds: Dataset, study: StudyInfo) -> None:
    """Contrast/Bolus module (PS3.3 C.7.6.4): iohexol 300 mgI/ml, 50 ml at 4.5 ml/s."""
    bolus_start = NATIVE_LEAD_S + 120.0  # seconds after the study start
    ds.ContrastBolusAgent = "Iohexol 300 mgI/ml"
    ds.ContrastBolusRoute = "IV"
    ds.ContrastBolusVolume = 50
    ds.ContrastBolusTotalDose = 15
    ds.ContrastBolusIngredient = "IODINE"
    ds.ContrastBolusIngredientConcentration = 300
    ds.ContrastFlowRate = 4.5
    ds.ContrastFlowDuration = round(50 / 4.5, 2)
    ds.ContrastBolusStartTime = _clock(study, bolus_start)[1]
    ds.ContrastBolusStopTime = _clock(study, bolus_start + 50 / 4.5)[1]


def acquisition_offset_s(phase: str) -> float:
    """Seconds from the study start to the acquisition of ``phase``'s first image."""
    after = PHASE_SERIES[phase][2]
    if after is None:
        return NATIVE_LEAD_S
    return NATIVE_LEAD_S + 120.0 + after


def write_series(
    out_dir: Path, study: StudyInfo, phase: str, series_uid: str, grid: Grid, stored: np.ndarray
) -> list[Path]:
    """Write ``stored`` (uint16, (slices, rows, cols), slice 0 most inferior) as a series.

    Files are named by InstanceNumber; as on a scanner, the series is acquired head to feet, so
    instance 1 is the most superior slice.
    """
    if stored.dtype != np.uint16 or stored.shape != grid.shape:
        raise ValueError(f"stored must be uint16 {grid.shape}, got {stored.dtype} {stored.shape}")
    out_dir.mkdir(parents=True, exist_ok=True)
    base = _common(study, phase, series_uid)
    t_acq = acquisition_offset_s(phase)
    nz, ny, nx = grid.shape
    base.Rows, base.Columns = ny, nx
    if PHASE_SERIES[phase][2] is not None:
        _contrast(base, study)
    base.SeriesDate, base.SeriesTime = _clock(study, t_acq)
    base.InstanceCreationDate, base.InstanceCreationTime = _clock(study, t_acq + 30.0)
    base.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    base.PixelSpacing = [round(grid.pixel_mm, 6), round(grid.pixel_mm, 6)]
    base.SliceThickness = grid.slice_mm
    base.ReconstructionDiameter = round(grid.pixel_mm * nx, 3)
    base.CTDIvol = 8.5
    phantom_type = Dataset()  # CID 4052: the dosimetry phantom CTDIvol refers to
    phantom_type.CodeValue, phantom_type.CodingSchemeDesignator = "113691", "DCM"
    phantom_type.CodeMeaning = "IEC Body Dosimetry Phantom"
    base.CTDIPhantomTypeCodeSequence = [phantom_type]
    common = _encode(base)
    paths = []
    for n in range(nz):
        k = nz - 1 - n  # instance 1 = most superior slice (acquired head to feet)
        ds = Dataset()
        ds.SOPInstanceUID = uid(study.uid_seed, series_uid, "image", k)
        ds.AcquisitionDate, ds.AcquisitionTime = _clock(study, t_acq + 0.1 * n)
        ds.ContentDate, ds.ContentTime = ds.AcquisitionDate, ds.AcquisitionTime
        ds.InstanceNumber = n + 1
        z = round(grid.origin[2] + k * grid.slice_mm, 4)
        ds.ImagePositionPatient = [round(grid.origin[0], 4), round(grid.origin[1], 4), z]
        ds.SliceLocation = z
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<u2").tobytes()
        ds["PixelData"].VR = "OW"
        path = out_dir / f"{n + 1:04d}.dcm"
        _save(common | _encode(ds), ds.SOPInstanceUID, path)
        paths.append(path)
    return paths


def _encode(ds: Dataset) -> dict[int, bytes]:
    """Each element of ``ds`` encoded on its own (Explicit VR Little Endian), by tag.

    The elements shared by a series are encoded once and merged with the per-image ones, which
    is several times faster than encoding every complete dataset.
    """
    out = {}
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem, encodings=["latin_1"])
        out[int(elem.tag)] = fp.getvalue()
    return out


def _save(elements: dict[int, bytes], sop_instance_uid: str, path: Path) -> None:
    """Write a Part 10 file: preamble, File Meta Information, then the sorted data set."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "LIVERNODE_PH1"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    body = b"".join(elements[tag] for tag in sorted(elements))
    path.write_bytes(b"\0" * 128 + b"DICM" + fp.getvalue() + body)
