"""Assembly defects on phantom files: each test damages a copy of a phantom study the way
real archives do and checks that the defect is detected, repaired or refused, and reported.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.analysis.register import align_to_reference
from node.errors import StudyError
from node.phantom import generate_baseline, load_truth
from node.study.assembly import load_study, load_study_dir
from node.study.model import Phase, Study

PV = "portal_venous"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small four-phase phantom study (128 x 128, 5 mm)."""
    return generate_baseline(tmp_path_factory.mktemp("defects") / "study", 5, size=128,
                             n_lesions=1)


@pytest.fixture(scope="module")
def clean(phantom: Path) -> Study:
    return load_study_dir(phantom / "dicom")


def _files(phantom: Path, phase: str) -> list[Path]:
    return sorted((phantom / "dicom" / phase).glob("*.dcm"))


def _copy(phantom: Path, dst: Path, phases: tuple[str, ...] = (PV,)) -> Path:
    for phase in phases:
        shutil.copytree(phantom / "dicom" / phase, dst / phase)
    return dst


def _rewrite(paths: list[Path], edit: object) -> None:
    for n, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        edit(n, ds)  # type: ignore[operator]
        ds.save_as(path, enforce_file_format=True)


def test_shuffled_files_give_the_same_volume(phantom: Path, clean: Study,
                                             tmp_path: Path) -> None:
    files = _files(phantom, PV)
    names = [f"x{n:04d}.dcm" for n in range(len(files))]
    random.Random(1).shuffle(names)
    for src, name in zip(files, names, strict=True):
        shutil.copy(src, tmp_path / name)
    vol = load_study_dir(tmp_path).volumes[Phase.PORTAL_VENOUS]
    assert np.array_equal(vol.array, clean.volumes[Phase.PORTAL_VENOUS].array)


def test_missing_slice_is_interpolated_and_reported(phantom: Path, clean: Study,
                                                    tmp_path: Path) -> None:
    d = _copy(phantom, tmp_path / "s")
    files = sorted((d / PV).glob("*.dcm"))
    files[len(files) // 2].unlink()
    study = load_study_dir(d)
    vol, ref = study.volumes[Phase.PORTAL_VENOUS], clean.volumes[Phase.PORTAL_VENOUS]
    assert vol.array.shape == ref.array.shape
    assert any("1 missing slice" in d for d in study.defects), study.defects
    k = len(files) - 1 - len(files) // 2  # files run superior -> inferior
    expected = (ref.array[k - 1] + ref.array[k + 1]) / 2
    assert np.allclose(vol.array[k], expected, atol=1e-3)


def test_uneven_spacing_is_resampled(phantom: Path, tmp_path: Path) -> None:
    d = _copy(phantom, tmp_path / "s")

    def edit(n: int, ds: Dataset) -> None:
        if n % 3 == 1:
            ds.ImagePositionPatient[2] = round(float(ds.ImagePositionPatient[2]) + 1.5, 4)

    _rewrite(sorted((d / PV).glob("*.dcm")), edit)
    study = load_study_dir(d)
    assert any("uneven slice spacing" in x for x in study.defects), study.defects
    assert study.reference.geometry.spacing[0] == pytest.approx(5.0, abs=0.6)


def test_large_gap_is_refused_with_reason(phantom: Path, tmp_path: Path) -> None:
    d = _copy(phantom, tmp_path / "s")
    files = sorted((d / PV).glob("*.dcm"))
    for f in files[10:16]:
        f.unlink()
    with pytest.raises(StudyError, match="too many slices missing"):
        load_study_dir(d)


def test_gantry_tilt_is_corrected(phantom: Path, clean: Study, tmp_path: Path) -> None:
    d = _copy(phantom, tmp_path / "s")
    tilt = math.tan(math.radians(15.0))
    z0 = float(pydicom.dcmread(_files(phantom, PV)[-1]).ImagePositionPatient[2])

    def edit(n: int, ds: Dataset) -> None:
        pos = [float(v) for v in ds.ImagePositionPatient]
        shift = (pos[2] - z0) * tilt
        pos[1] += shift  # slices drift in y: the scanner's tilted stack, labelled truly
        ds.ImagePositionPatient = [round(v, 4) for v in pos]
        ds.GantryDetectorTilt = 15.0
        # the pixels of a tilted scan show the anatomy shifted by the same amount
        arr = ds.pixel_array
        shifted = np.roll(arr, -int(round(shift / float(ds.PixelSpacing[0]))), axis=0)
        ds.PixelData = shifted.astype(arr.dtype).tobytes()

    _rewrite(sorted((d / PV).glob("*.dcm")), edit)
    study = load_study_dir(d)
    assert any("gantry tilt 15.0 deg" in x for x in study.defects), study.defects
    vol, ref = study.volumes[Phase.PORTAL_VENOUS], clean.volumes[Phase.PORTAL_VENOUS]
    assert vol.geometry.slice_normal == pytest.approx((0.0, 0.0, 1.0))
    inner = (slice(None), slice(40, 90), slice(20, 108))  # away from rolled-over rows
    assert np.median(np.abs(vol.array[inner] - ref.array[inner])) < 5.0


@pytest.mark.parametrize(("numbers", "keep_times"), [((2, 3), False), ((1, 1), True)])
def test_two_acquisitions_in_one_series(phantom: Path, tmp_path: Path,
                                        numbers: tuple[int, int], keep_times: bool) -> None:
    """Told apart by Acquisition Number, or (same number) by acquisition time."""
    d = _copy(phantom, tmp_path / "s", ("arterial", PV))
    series = str(pydicom.dcmread(_files(phantom, PV)[0]).SeriesInstanceUID)

    def edit(acq: int) -> object:
        def inner(n: int, ds: Dataset) -> None:
            ds.SeriesInstanceUID, ds.AcquisitionNumber, ds.SeriesDescription = series, acq, ""
            for kw in ("AcquisitionTime", "ContrastBolusStartTime", "ContentTime"):
                if kw in ds and not (keep_times and kw == "AcquisitionTime"):
                    delattr(ds, kw)
        return inner

    _rewrite(sorted((d / "arterial").glob("*.dcm")), edit(numbers[0]))
    _rewrite(sorted((d / PV).glob("*.dcm")), edit(numbers[1]))
    study = load_study_dir(d)
    assert set(study.volumes) == {Phase.ARTERIAL, Phase.PORTAL_VENOUS}, study.skipped
    assert study.volumes[Phase.ARTERIAL].series_instance_uid == series


def _clone(src: Path, dst: Path, **changes: object) -> Path:
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(dst)])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(dst), "sop"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_scout_mpr_mip_dose_and_secondary_capture_are_skipped(
        phantom: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = _copy(phantom, tmp_path / "s")
    src = _files(phantom, PV)[0]
    _clone(src, d / "scout.dcm", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    _clone(src, d / "mpr.dcm", ImageType=["DERIVED", "SECONDARY", "MPR"])
    _clone(src, d / "mip.dcm", ImageType=["DERIVED", "PRIMARY", "MIP"])
    _clone(src, d / "dose.dcm", ImageType=["DERIVED", "SECONDARY", "OTHER"],
           SeriesDescription="Dose Report")
    sc = _clone(src, d / "sc.dcm")
    ds = pydicom.dcmread(sc)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.save_as(sc, enforce_file_format=True)
    with caplog.at_level(logging.INFO, logger="node.study.assembly"):
        study = load_study_dir(d)
    assert list(study.volumes) == [Phase.PORTAL_VENOUS]
    reasons = " | ".join(study.skipped)
    for word in ("localizer", "derived reformat (MPR)", "projection (MIP)",
                 "derived secondary image", "Secondary Capture Image Storage"):
        assert word in reasons, reasons
        assert word in caplog.text


def test_mixed_matrix_size_is_reported(phantom: Path, tmp_path: Path) -> None:
    d = _copy(phantom, tmp_path / "s")
    files = sorted((d / PV).glob("*.dcm"))

    def edit(n: int, ds: Dataset) -> None:
        if n == 5:
            arr = ds.pixel_array[::2, ::2]
            ds.Rows, ds.Columns = arr.shape
            ds.PixelSpacing = [round(2 * float(v), 6) for v in ds.PixelSpacing]
            ds.PixelData = np.ascontiguousarray(arr).tobytes()

    _rewrite(files, edit)
    study = load_study_dir(d)
    assert any("mixed orientation / matrix sizes" in x for x in study.defects)
    assert any("1 missing slice" in x for x in study.defects)
    assert study.reference.array.shape[1:] == (128, 128)


def test_non_axial_orientation_is_reported(tmp_path: Path) -> None:
    from tests.test_study import _slice, _write

    sl = []
    for n in range(5):
        ds = _slice("1.2.9.50", 0.0, 1100, description="PV coronal")
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [-10.0, -30.0 + 4.0 * n, 50.0]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.9.50.{n + 1}"
        sl.append(ds)
    study = load_study(_write(tmp_path, sl))
    assert any("non-axial orientation (coronal" in x for x in study.defects), study.defects
    assert study.reference.geometry.spacing[0] == pytest.approx(4.0)


def test_mixed_thickness_phases_share_the_reference_grid(phantom: Path, clean: Study,
                                                         tmp_path: Path) -> None:
    d = _copy(phantom, tmp_path / "s", ("native", PV))
    for n, f in enumerate(sorted((d / "native").glob("*.dcm"))):
        if n % 2:
            f.unlink()
    _rewrite(sorted((d / "native").glob("*.dcm")),
             lambda n, ds: setattr(ds, "SliceThickness", 10.0))
    study = load_study_dir(d)
    native, ref = study.volumes[Phase.NATIVE], study.volumes[Phase.PORTAL_VENOUS]
    assert native.geometry.spacing[0] == pytest.approx(10.0)
    al = align_to_reference(native.array, native.geometry, ref.array, ref.geometry,
                            estimate_shift=False)
    assert al.array.shape == ref.array.shape
    truth = clean.volumes[Phase.NATIVE].array
    k = ref.array.shape[0] // 2  # an interpolated 5 mm slice lies between its neighbours
    lo = np.minimum(truth[k - 1], truth[k + 1]) - 1
    hi = np.maximum(truth[k - 1], truth[k + 1]) + 1
    assert np.mean((al.array[k] >= lo) & (al.array[k] <= hi)) > 0.9


def _enhanced(files: list[Path]) -> Dataset:
    """An Enhanced CT image (PS3.3 A.38) holding the given classic slices as frames."""
    slices = [pydicom.dcmread(f) for f in files]
    first = slices[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID",
               "PatientName", "StudyDate", "Modality", "SeriesDescription",
               "ContrastBolusAgent", "Rows", "Columns", "SamplesPerPixel",
               "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
               "PixelRepresentation"):
        setattr(ds, kw, first[kw].value)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(slices)
    shared = Dataset()
    measures, orientation, rescale = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = first.PixelSpacing, first.SliceThickness
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    rescale.RescaleSlope, rescale.RescaleIntercept = first.RescaleSlope, first.RescaleIntercept
    rescale.RescaleType = "HU"
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelValueTransformationSequence = DicomSequence([rescale])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for n, s in enumerate(reversed(slices)):  # frames in another order than the files
        item, pos, content = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = s.ImagePositionPatient
        content.FrameAcquisitionNumber = 1
        content.InStackPositionNumber = n + 1
        item.PlanePositionSequence = DicomSequence([pos])
        item.FrameContentSequence = DicomSequence([content])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = b"".join(s.pixel_array.tobytes() for s in reversed(slices))
    return ds


def test_enhanced_ct_multiframe(phantom: Path, clean: Study, tmp_path: Path) -> None:
    path = tmp_path / "enhanced.dcm"
    _enhanced(_files(phantom, PV)).save_as(path, enforce_file_format=True)
    study = load_study([path])
    vol = study.volumes[Phase.PORTAL_VENOUS]
    assert np.array_equal(vol.array, clean.volumes[Phase.PORTAL_VENOUS].array)
    assert vol.geometry == clean.volumes[Phase.PORTAL_VENOUS].geometry
    numbers = [getattr(ds, "source_frame_number", 0) for ds in vol.datasets]
    assert numbers == list(range(1, len(numbers) + 1))  # frame 1 is the most inferior


def test_only_portal_venous_assembles(phantom: Path, tmp_path: Path) -> None:
    study = load_study_dir(_copy(phantom, tmp_path / "s"))
    assert list(study.volumes) == [Phase.PORTAL_VENOUS]
    assert study.reference.series_instance_uid == load_truth(phantom)["series"][PV]


def test_no_usable_series_names_why(phantom: Path, tmp_path: Path) -> None:
    src = _files(phantom, PV)[0]
    _clone(src, tmp_path / "scout.dcm", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    _clone(src, tmp_path / "single.dcm")
    with pytest.raises(StudyError) as info:
        load_study_dir(tmp_path)
    assert "localizer" in str(info.value) and "single slice" in str(info.value)
