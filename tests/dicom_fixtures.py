"""A tiny synthetic CT study with a filled AnalysisResult, for the SEG/SR tests.

Independent of ``node.phantom`` and ``node.analysis``: the masks and measurements are made
here directly, so the DICOM writers are tested against known values.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.analysis.results import (
    AnalysisResult,
    LesionMeasurement,
    ResponseAssessment,
    VolumetricResponse,
)
from node.study.model import Geometry, Phase, Study, Volume

SHAPE = (8, 64, 64)
SPACING = (5.0, 0.8, 0.7)  # (dz, dy, dx): deliberately anisotropic to catch axis mix-ups
ORIGIN = (-22.0, -30.0, 100.0)
STUDY_UID = generate_uid(entropy_srcs=["liver-node-test", "study"])
PRIOR_STUDY_UID = generate_uid(entropy_srcs=["liver-node-test", "prior-study"])
LESION_CENTRES = ((3.0, 25.0, 24.0), (5.0, 40.0, 38.0))  # (k, i, j)
LESION_RADII = (6.0, 4.0)  # in-plane radius in pixels, 1 slice above/below


def _ct_dataset(k: int, pixels: np.ndarray, series_uid: str, geometry: Geometry) -> Dataset:
    """A CT Image Storage dataset with the modules dciodvfy expects (PS3.3 A.3)."""
    ds = Dataset()
    sop_uid = generate_uid(entropy_srcs=["liver-node-test", "ct", str(k)])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName, ds.PatientID = "Test^Liver", "LN-TEST-1"
    ds.PatientBirthDate, ds.PatientSex = "19600101", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, series_uid
    ds.StudyDate, ds.StudyTime = "20240301", "101500"
    ds.SeriesDate, ds.SeriesTime = "20240301", "102000"
    ds.ContentDate, ds.ContentTime = "20240301", "102000"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "ACC1", "1", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, k + 1
    ds.SeriesDescription = "Abdomen PV 5mm"
    ds.Manufacturer, ds.ManufacturerModelName = "TestVendor", "TestCT"
    ds.DeviceSerialNumber, ds.SoftwareVersions = "123", "1.0"
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["liver-node-test", "for"])
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition, ds.BodyPartExamined = "FFS", "ABDOMEN"
    ds.ContrastBolusAgent = "Iohexol"
    ds.ImageOrientationPatient = [*geometry.row_cosine, *geometry.column_cosine]
    pos = geometry.index_to_patient(np.array([[k, 0, 0]]))[0]
    ds.ImagePositionPatient = [round(float(v), 4) for v in pos]
    ds.SliceLocation = round(float(pos[2]), 4)
    ds.PixelSpacing = [geometry.spacing[1], geometry.spacing[2]]
    ds.SliceThickness = geometry.spacing[0]
    ds.KVP, ds.XRayTubeCurrent, ds.AcquisitionNumber = 80, 200, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 60, 400
    ds.PixelData = (pixels + 1024).astype(np.int16).tobytes()
    return ds


def _blob(shape: tuple[int, int, int], centre: tuple[float, float, float], r: float,
          rz: float) -> np.ndarray:
    k, i, j = np.indices(shape)
    ck, ci, cj = centre
    return ((k - ck) / rz) ** 2 + ((i - ci) / r) ** 2 + ((j - cj) / r) ** 2 <= 1.0


def _xyz(geometry: Geometry, kij: tuple[float, ...]) -> tuple[float, float, float]:
    x, y, z = geometry.index_to_patient(np.array([kij], dtype=float))[0]
    return float(x), float(y), float(z)


def _lesion(label: int, labels: np.ndarray, geometry: Geometry) -> LesionMeasurement:
    return _measured(labels == label, label, geometry)


def _measured(mask: np.ndarray, label: int, geometry: Geometry) -> LesionMeasurement:
    areas = mask.sum(axis=(1, 2))
    key = int(np.argmax(areas))
    ck, ci, cj = np.argwhere(mask).mean(axis=0)
    rows, cols = np.nonzero(mask[key])
    r = (cols.max() - cols.min() + 1) / 2.0
    angles = np.linspace(0.0, 2 * np.pi, 17)
    outline = [(float(cj + 0.5 + r * np.cos(a)), float(ci + 0.5 + r * np.sin(a))) for a in angles]
    outline[-1] = outline[0]
    dx = geometry.spacing[2]
    return LesionMeasurement(
        label=label,
        tracking_id=f"Lesion {label}",
        tracking_uid=generate_uid(entropy_srcs=["liver-node-test", "lesion", str(label)]),
        volume_ml=float(mask.sum() * geometry.voxel_volume_ml),
        longest_diameter_mm=float(2 * r * dx),
        short_axis_mm=float(2 * r * dx * 0.9),
        key_slice=key,
        long_axis_ij=((float(cj - r), float(ci)), (float(cj + r), float(ci))),
        short_axis_ij=((float(cj), float(ci - r)), (float(cj), float(ci + r))),
        outline_ij=outline,
        area_mm2=float(areas[key] * geometry.spacing[1] * dx),
        centroid_xyz=_xyz(geometry, (ck, ci, cj)),
        mean_hu={"portal_venous": 110.0, "arterial": 150.0},
        prior_volume_ml=1.0 if label == 1 else None,
        is_new=label != 1,
    )


#: Liver parenchyma median HU per phase (all four phases, although the study holds only PV).
LIVER_MEDIAN_HU = {"native": 55.0, "arterial": 80.0, "portal_venous": 105.0, "delayed": 90.0}


def characterise(lesion: LesionMeasurement) -> None:
    """Fill the characterisation fields with known values.

    Lesion 1 was seen in all four phases (plain scan included) and holds lipiodol; lesion 2
    has no plain phase (no enhancement over it, no lipiodol measurement) and a behaviour in
    the arterial phase only: the SR must omit what is missing.
    """
    vol = lesion.volume_ml
    if lesion.label == 1:
        lesion.mean_hu = {"native": 40.0, "arterial": 150.0, "portal_venous": 110.0,
                          "delayed": 70.25}
        lesion.sd_hu = {"native": 8.5, "arterial": 21.75, "portal_venous": 15.0, "delayed": 9.0}
        lesion.enhancement_vs_native_hu = {"arterial": 110.0, "portal_venous": 70.0,
                                           "delayed": 30.25}
        lesion.lipiodol_volume_ml = 0.1 * vol
        lesion.enhancing_volume_ml, lesion.necrotic_volume_ml = 0.7 * vol, 0.2 * vol
        lesion.necrotic_fraction = 0.2
        lesion.size_pattern = "homogeneous"
        lesion.phase_behaviour = {"arterial": "hyper", "portal_venous": "iso", "delayed": "hypo"}
    else:
        lesion.mean_hu = {"arterial": 140.0, "portal_venous": 110.0}
        lesion.sd_hu = {"arterial": 30.0, "portal_venous": 12.5}
        lesion.enhancing_volume_ml, lesion.necrotic_volume_ml = 0.875 * vol, 0.125 * vol
        lesion.necrotic_fraction = 0.125
        lesion.size_pattern = "heterogeneous"
        lesion.phase_behaviour = {"arterial": "hyper"}
    lesion.enhancement_vs_liver_hu = {k: v - LIVER_MEDIAN_HU[k] for k, v in lesion.mean_hu.items()}
    lesion.largest_diameter_3d_mm = 1.25 * lesion.longest_diameter_mm


def make_case(n_lesions: int = 2, with_response: bool = True) -> tuple[Study, AnalysisResult]:
    """A synthetic portal-venous study and its analysis result with ``n_lesions`` lesions."""
    geometry = Geometry(ORIGIN, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), SPACING, SHAPE)
    liver = _blob(SHAPE, (3.5, 32.0, 32.0), 26.0, 4.0)
    labels = np.zeros(SHAPE, dtype=np.int32)
    for n in range(n_lesions):
        labels[_blob(SHAPE, LESION_CENTRES[n], LESION_RADII[n], 1.5) & liver] = n + 1
    hu = np.where(liver, 60.0, -100.0).astype(np.float32)
    hu[labels > 0] = 110.0
    series_uid = generate_uid(entropy_srcs=["liver-node-test", "series"])
    datasets = [
        _ct_dataset(k, hu[k].astype(np.int16), series_uid, geometry) for k in range(SHAPE[0])
    ]
    volume = Volume(hu, geometry, Phase.PORTAL_VENOUS, series_uid, datasets, "Abdomen PV 5mm")
    study = Study(STUDY_UID, "LN-TEST-1", "Test^Liver", "20240301",
                  datasets[0].FrameOfReferenceUID, {Phase.PORTAL_VENOUS: volume})
    lesions = [_lesion(n + 1, labels, geometry) for n in range(n_lesions)]
    for lesion in lesions:
        characterise(lesion)
    kij = np.argwhere(liver).mean(axis=0)
    total = float(sum(les.volume_ml for les in lesions))
    response = None
    if with_response:
        response = ResponseAssessment(
            prior_study_instance_uid=PRIOR_STUDY_UID,
            prior_total_volume_ml=10.0,
            current_total_volume_ml=total,
            change_fraction=(total - 10.0) / 10.0,
            category=VolumetricResponse.PR if n_lesions else VolumetricResponse.CR,
            new_lesions=max(n_lesions - 1, 0),
            vanished_lesions=["Lesion 7"],
        )
    result = AnalysisResult(
        study_instance_uid=STUDY_UID,
        liver_mask=liver,
        lesion_labels=labels,
        lesions=lesions,
        liver_volume_ml=float(liver.sum() * geometry.voxel_volume_ml),
        liver_centroid_xyz=_xyz(geometry, tuple(kij)),
        response=response,
        liver=_measured(liver, n_lesions + 1, geometry),
        liver_median_hu=dict(LIVER_MEDIAN_HU),
    )
    return study, result
