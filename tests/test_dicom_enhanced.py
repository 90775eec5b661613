"""SEG and SR of an Enhanced CT Image reference (multi-frame, PS3.3 A.38).

Assembly splits the multi-frame image into per-frame slices that share its SOP Instance UID.
A source image is then (SOP Instance UID, frame number): the SEG derives from the single
multi-frame image and each of its frames references its source frame by Referenced Frame
Number (PS3.3 C.7.6.16.2.6); the SR's Referenced Segment source images and the planar
groups' SCOORD images carry frame numbers too. The frames are stored in reverse order to the
grid, so frame order and slice order differ. dciodvfy and dcmqi are the second opinions.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.dicom import codes
from node.dicom.seg import build_seg, source_slices
from node.dicom.sr import build_sr
from node.study.assembly import load_study
from node.study.enhanced import split_frames
from node.study.model import Study
from tests.conftest import require_tool
from tests.dicom_fixtures import make_case

INPUT_KEY = "enhanced-ct"


def _item(**attributes: object) -> DicomSequence:
    """A one-item sequence (a functional group macro)."""
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return DicomSequence([item])


def _shared_groups(first: Dataset) -> Dataset:
    """Shared Functional Groups of an original spiral CT (PS3.3 A.38.1.4, C.8.15.3)."""
    liver = Dataset()
    liver.CodeValue, liver.CodingSchemeDesignator, liver.CodeMeaning = ("10200004", "SCT",
                                                                        "Liver")
    fov = [round(float(first.Rows) * float(first.PixelSpacing[0]), 4),
           round(float(first.Columns) * float(first.PixelSpacing[1]), 4)]
    shared = Dataset()
    shared.PixelMeasuresSequence = _item(PixelSpacing=first.PixelSpacing,
                                         SliceThickness=first.SliceThickness)
    shared.PlaneOrientationSequence = _item(ImageOrientationPatient=first.ImageOrientationPatient)
    shared.PixelValueTransformationSequence = _item(
        RescaleSlope=first.RescaleSlope, RescaleIntercept=first.RescaleIntercept, RescaleType="HU")
    shared.FrameVOILUTSequence = _item(WindowCenter=first.WindowCenter,
                                       WindowWidth=first.WindowWidth)
    shared.FrameAnatomySequence = _item(AnatomicRegionSequence=DicomSequence([liver]),
                                        FrameLaterality="U")
    shared.IrradiationEventIdentificationSequence = _item(
        IrradiationEventUID=generate_uid(entropy_srcs=["liver-node-test", "irradiation"]))
    shared.CTImageFrameTypeSequence = _item(
        FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"], PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE")
    shared.CTAcquisitionTypeSequence = _item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO",
                                             FluoroscopyFlag="NO")
    shared.CTAcquisitionDetailsSequence = _item(
        DataCollectionDiameter=500.0, RevolutionTime=0.5, SingleCollimationWidth=0.625,
        TotalCollimationWidth=40.0, TableHeight=150.0, GantryDetectorTilt=0.0,
        RotationDirection="CW")
    shared.CTTableDynamicsSequence = _item(TableSpeed=80.0, TableFeedPerRotation=40.0,
                                           SpiralPitchFactor=1.0)
    shared.CTGeometrySequence = _item(DistanceSourceToDetector=1000.0,
                                      DistanceSourceToDataCollectionCenter=550.0)
    shared.CTReconstructionSequence = _item(
        ReconstructionAlgorithm="FILTER_BACK_PROJ", ConvolutionKernel="STANDARD",
        ConvolutionKernelGroup="SOFT_TISSUE", ReconstructionFieldOfView=fov,
        ReconstructionPixelSpacing=first.PixelSpacing, ReconstructionAngle=360.0,
        ImageFilter="NONE")
    shared.CTExposureSequence = _item(ExposureTimeInms=500.0, XRayTubeCurrentInmA=200.0,
                                      ExposureInmAs=100.0, ExposureModulationType="NONE")
    shared.CTXRayDetailsSequence = _item(KVP=80.0, FocalSpots=[1.0], FilterType="FLAT",
                                         FilterMaterial=["ALUMINUM"])
    return shared


def _per_frame_group(s: Dataset, in_stack: int, when: str) -> Dataset:
    """Per-frame groups of one slice: position, frame content, CT position."""
    position = [float(v) for v in s.ImagePositionPatient]
    centre = [round(position[0] + float(s.Columns) * float(s.PixelSpacing[1]) / 2, 4),
              round(position[1] + float(s.Rows) * float(s.PixelSpacing[0]) / 2, 4),
              position[2]]
    item = Dataset()
    item.PlanePositionSequence = _item(ImagePositionPatient=s.ImagePositionPatient)
    item.FrameContentSequence = _item(
        FrameAcquisitionNumber=1, FrameReferenceDateTime=when, FrameAcquisitionDateTime=when,
        FrameAcquisitionDuration=500.0, StackID="1", InStackPositionNumber=in_stack,
        DimensionIndexValues=[in_stack])
    item.CTPositionSequence = _item(TablePosition=-position[2],
                                    ReconstructionTargetCenterPatient=centre,
                                    DataCollectionCenterPatient=centre)
    return item


def enhanced_ct(slices: list[Dataset]) -> Dataset:
    """An Enhanced CT image (PS3.3 A.38) holding classic slices as frames, in reverse order.

    Frame 1 is the last slice: frame order is the opposite of the slices' (grid) order.
    """
    first = slices[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=["liver-node-test", "enhanced-ct", str(len(slices))])
    for kw in ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate",
               "PatientSex", "StudyInstanceUID", "SeriesInstanceUID", "StudyDate", "StudyTime",
               "SeriesDate", "SeriesTime", "ContentDate", "ContentTime", "AccessionNumber",
               "StudyID", "ReferringPhysicianName", "Modality", "SeriesNumber",
               "SeriesDescription", "Manufacturer", "ManufacturerModelName",
               "DeviceSerialNumber", "SoftwareVersions", "FrameOfReferenceUID",
               "PositionReferenceIndicator", "PatientPosition", "BodyPartExamined", "Rows",
               "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
               "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(ds, kw, first[kw].value)
    when = f"{first.ContentDate}{first.ContentTime}"
    ds.InstanceNumber, ds.AcquisitionNumber = 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.AcquisitionDateTime, ds.AcquisitionDuration = when, 5.0
    ds.ContentQualification, ds.PixelPresentation = "RESEARCH", "MONOCHROME"
    ds.VolumetricProperties, ds.VolumeBasedCalculationTechnique = "VOLUME", "NONE"
    ds.BurnedInAnnotation, ds.RecognizableVisualFeatures = "NO", "NO"
    ds.LossyImageCompression, ds.PresentationLUTShape = "00", "IDENTITY"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.InstanceCreationDate, ds.InstanceCreationTime = first.ContentDate, first.ContentTime
    dimensions = generate_uid(entropy_srcs=["liver-node-test", "enhanced-ct", "dimensions"])
    ds.DimensionOrganizationSequence = _item(DimensionOrganizationUID=dimensions)
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = _item(
        DimensionOrganizationUID=dimensions,
        DimensionIndexPointer=0x00209057,  # In-Stack Position Number
        FunctionalGroupPointer=0x00209111)  # Frame Content Sequence
    ds.SharedFunctionalGroupsSequence = DicomSequence([_shared_groups(first)])
    frames = list(reversed(slices))
    ds.NumberOfFrames = len(frames)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(
        [_per_frame_group(s, len(frames) - n, when) for n, s in enumerate(frames)])
    ds.PixelData = b"".join(s.pixel_array.tobytes() for s in frames)
    return ds


class Case:
    """The synthetic case on an Enhanced CT reference, its SEG and SR, and their files."""

    def __init__(self, folder: Path, missing: int | None = None) -> None:
        self.study, self.result = make_case(n_lesions=2, with_response=True)
        ref = self.study.reference
        kept = [ds for k, ds in enumerate(ref.datasets) if k != missing]
        self.enhanced = enhanced_ct(kept)
        folder.mkdir(parents=True, exist_ok=True)
        self.enhanced_path = folder / "enhanced.dcm"
        self.enhanced.save_as(self.enhanced_path, enforce_file_format=True)
        self.loaded = load_study([self.enhanced_path])
        ref.datasets[:] = self.loaded.reference.datasets  # the frames, in grid order
        self.seg = build_seg(self.study, self.result, input_key=INPUT_KEY)
        self.sr = build_sr(self.study, self.result, self.seg, input_key=INPUT_KEY,
                           time_point="follow-up 1")
        self.seg_path, self.sr_path = folder / "seg.dcm", folder / "sr.dcm"
        self.seg.save_as(self.seg_path, enforce_file_format=True)
        self.sr.save_as(self.sr_path, enforce_file_format=True)

    def frame_position(self, frame_number: int) -> list[float]:
        """Image Position (Patient) of a frame of the Enhanced CT image."""
        item = self.enhanced.PerFrameFunctionalGroupsSequence[frame_number - 1]
        return [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return Case(tmp_path_factory.mktemp("enhanced"))


@pytest.fixture(scope="module")
def gap(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """Slice 3 missing from the Enhanced CT: assembly interpolates it from its neighbours."""
    return Case(tmp_path_factory.mktemp("enhanced-gap"), missing=3)


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings other than the private coding scheme's) of dciodvfy on a file."""
    out = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True,
                         timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    return ([ln for ln in lines if ln.startswith("Error")],
            [ln for ln in lines if ln.startswith("Warning") and codes.PRIVATE_SCHEME not in ln])


def _grid_slice(study: Study, position: list[float]) -> int:
    """Index of the reference grid slice at a patient position (exactly on the grid)."""
    k = float(study.reference.geometry.patient_to_index(np.asarray(position))[0, 0])
    assert abs(k - round(k)) < 1e-6
    return int(round(k))


# --- the input --------------------------------------------------------------------------------


def test_enhanced_ct_is_valid_input(case: Case) -> None:
    assert _dciodvfy(case.enhanced_path) == ([], [])
    vol = case.loaded.reference
    assert vol.geometry == case.study.reference.geometry
    assert np.array_equal(vol.array, case.study.reference.array)
    n = len(vol.datasets)
    # the grid runs inferior -> superior, the frames superior -> inferior
    assert [getattr(ds, "source_frame_number", None) for ds in vol.datasets] == list(
        range(n, 0, -1))
    assert {str(ds.SOPInstanceUID) for ds in vol.datasets} == {case.enhanced.SOPInstanceUID}


def test_split_frames_keep_the_header_without_pixels(case: Case) -> None:
    frames = split_frames(case.enhanced)
    header = frames[0].source_dataset
    assert all(f.source_dataset is header for f in frames)
    assert "PixelData" not in header and "PixelData" in case.enhanced
    assert header.SOPInstanceUID == case.enhanced.SOPInstanceUID
    assert int(header.NumberOfFrames) == len(frames)


def test_source_slices_keep_every_frame(case: Case) -> None:
    assert source_slices(case.study) == list(range(len(case.study.reference.datasets)))


# --- SEG --------------------------------------------------------------------------------------


def _check_seg_frames(case: Case) -> list[int]:
    """Every SEG frame references its Enhanced CT frame on the same plane, with its mask.

    Returns the referenced frame numbers.
    """
    seg = pydicom.dcmread(case.seg_path)
    series = seg.ReferencedSeriesSequence
    assert len(series) == 1 and len(series[0].ReferencedInstanceSequence) == 1
    assert series[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        case.enhanced.SOPInstanceUID)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    stack = {n + 1: case.result.lesion_labels == n + 1 for n in range(len(case.result.lesions))}
    stack[len(case.result.lesions) + 1] = case.result.liver_mask.astype(bool)
    referenced = []
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        (derivation,) = frame.DerivationImageSequence
        (source,) = derivation.SourceImageSequence
        assert source.ReferencedSOPClassUID == EnhancedCTImageStorage
        assert source.ReferencedSOPInstanceUID == case.enhanced.SOPInstanceUID
        number = int(source.ReferencedFrameNumber)
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, case.frame_position(number))
        segment = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = _grid_slice(case.study, position)
        assert np.array_equal(pixels[index].astype(bool), stack[segment][k])
        referenced.append(number)
    return referenced


def test_seg_frames_reference_their_enhanced_ct_frame(case: Case) -> None:
    referenced = _check_seg_frames(case)
    assert set(referenced) == set(range(1, int(case.enhanced.NumberOfFrames) + 1))


def test_seg_of_an_interpolated_enhanced_ct(gap: Case) -> None:
    """The filled slice is not written; the others reference their own frames."""
    datasets = gap.study.reference.datasets
    assert len(datasets) == 8 and int(gap.enhanced.NumberOfFrames) == 7
    slices = source_slices(gap.study)
    assert 3 not in slices and len(slices) == 7
    _check_seg_frames(gap)
    assert _dciodvfy(gap.seg_path) == ([], [])


def test_seg_of_mixed_sources_is_refused(case: Case) -> None:
    study, result = make_case(n_lesions=2, with_response=False)
    study.reference.datasets[0] = case.study.reference.datasets[0]
    with pytest.raises(ValueError, match="one multi-frame image"):
        build_seg(study, result, input_key=INPUT_KEY)


# --- SR ---------------------------------------------------------------------------------------


def test_sr_references_carry_frame_numbers(case: Case) -> None:
    sr = hd.sr.srread(case.sr_path)
    uid = case.enhanced.SOPInstanceUID
    n = int(case.enhanced.NumberOfFrames)
    labels = {les.tracking_uid: les.label for les in case.result.lesions}
    stack = {label: case.result.lesion_labels == label for label in labels.values()}
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    assert len(volumetric) == len(labels) + 1
    for group in volumetric:
        segment = group.referenced_segment
        assert segment is not None
        (number,) = segment.referenced_segment_numbers or []
        mask = stack.get(int(number), case.result.liver_mask.astype(bool))
        (image,) = segment.source_images_for_segmentation
        assert image.referenced_sop_instance_uid == uid
        # grid slice k is frame n - k (frames in reverse order)
        assert image.referenced_frame_numbers == sorted(
            n - k for k in np.nonzero(mask.any(axis=(1, 2)))[0])
    key_slices = {les.tracking_uid: les.key_slice for les in case.result.lesions}
    assert case.result.liver is not None
    planar = sr.content.get_planar_roi_measurement_groups()
    assert len(planar) == len(labels) + 1
    for group in planar:
        roi = group.roi
        assert isinstance(roi, hd.sr.ImageRegion)
        (selected_from,) = roi.ContentSequence
        reference = selected_from.ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == uid
        key = key_slices.get(str(group.tracking_uid), case.result.liver.key_slice)
        assert int(reference.ReferencedFrameNumber) == n - key
    evidence = [item.ReferencedSOPInstanceUID
                for series in sr.CurrentRequestedProcedureEvidenceSequence
                for s in series.ReferencedSeriesSequence
                for item in s.ReferencedSOPSequence]
    assert sorted(evidence) == sorted([uid, case.seg.SOPInstanceUID])


# --- independent readers ----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["seg", "sr"])
def test_dciodvfy_reports_no_errors(case: Case, which: str) -> None:
    assert _dciodvfy(case.seg_path if which == "seg" else case.sr_path) == ([], [])


def test_dcmqi_reads_seg(case: Case, tmp_path: Path) -> None:
    exe = require_tool("segimage2itkimage")
    out = subprocess.run([str(exe), "--inputDICOM", str(case.seg_path), "--outputDirectory",
                          str(tmp_path), "--outputType", "nrrd"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    labels = [s["SegmentLabel"] for group in meta["segmentAttributes"] for s in group]
    assert labels == ["Lesion 1", "Lesion 2", "Liver"]
    assert "warn" not in out.stdout.lower() + out.stderr.lower()


def test_dcmqi_reads_sr(case: Case, tmp_path: Path) -> None:
    exe = require_tool("tid1500reader")
    target = tmp_path / "sr.json"
    out = subprocess.run([str(exe), "--inputDICOM", str(case.sr_path), "--outputMetadata",
                          str(target)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(target.read_text())
    assert report["imageLibrary"] == [case.enhanced.SOPInstanceUID]
    groups = report["Measurements"]
    assert len(groups) == 2 * (len(case.result.lesions) + 1)
    assert sorted(g["ReferencedSegment"] for g in groups if "ReferencedSegment" in g) == [1, 2, 3]

