"""Study assembly (node.study.assembly) and phase classification (node.study.phases)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.errors import StudyError
from node.study.assembly import load_study, load_study_dir
from node.study.model import Phase
from node.study.phases import classify_phase, contrast_delay_s, keyword_phase, parse_tm

STUDY = generate_uid(entropy_srcs=["test-study", "study"])
FOR = generate_uid(entropy_srcs=["test-study", "for"])


def _slice(series: str, z: float, value: int, *, acq: int = 1, description: str = "",
           agent: str = "Iohexol", times: tuple[str, str] | None = None,
           sop_class: str = CTImageStorage, image_type: str = "AXIAL",
           slope: float = 1.0, intercept: float = -1024.0, instance: int = 1) -> Dataset:
    """One 8x6 CT slice whose stored values are ``value`` (HU = value * slope + intercept)."""
    uid = generate_uid(entropy_srcs=["test-study", series, str(acq), str(z)])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = STUDY, series, FOR
    ds.PatientID, ds.PatientName, ds.StudyDate = "P1", "Test^Patient", "20240301"
    ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", image_type]
    ds.SeriesDescription, ds.AcquisitionNumber, ds.InstanceNumber = description, acq, instance
    if agent:
        ds.ContrastBolusAgent = agent
    if times:
        ds.ContrastBolusStartTime, ds.AcquisitionTime = times
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-10.0, -20.0, z]
    ds.PixelSpacing = [0.8, 0.7]
    ds.Rows, ds.Columns = 6, 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.full((6, 8), value, dtype=np.uint16).tobytes()
    return ds


def _write(tmp: Path, datasets: list[Dataset]) -> list[Path]:
    paths = []
    for n, ds in enumerate(datasets):
        p = tmp / f"f{n:03d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def test_slices_sorted_by_position_not_instance_number(tmp_path: Path) -> None:
    zs = [100.0, 95.0, 90.0, 85.0, 80.0]
    # Instance numbers deliberately run against the positions, files shuffled.
    sl = [_slice("1.2.9.1", z, 1024 + int(z), description="PV", instance=n)
          for n, z in enumerate(reversed(zs))]
    random.Random(3).shuffle(sl)
    study = load_study(_write(tmp_path, sl))
    vol = study.volumes[Phase.PORTAL_VENOUS]
    assert [float(ds.ImagePositionPatient[2]) for ds in vol.datasets] == sorted(zs)
    assert vol.array[:, 0, 0].tolist() == sorted(zs)  # HU = stored - 1024 = z
    g = vol.geometry
    assert g.origin == (-10.0, -20.0, 80.0)
    assert g.spacing == pytest.approx((5.0, 0.8, 0.7))
    assert g.shape == (5, 6, 8)
    assert g.slice_normal == pytest.approx((0.0, 0.0, 1.0))
    assert study.study_instance_uid == STUDY and study.patient_id == "P1"
    assert study.frame_of_reference_uid == FOR and study.study_date == "20240301"


def test_hu_rescale(tmp_path: Path) -> None:
    sl = [_slice("1.2.9.2", z, 600, slope=0.5, intercept=-200.0, description="PV")
          for z in (0.0, 5.0)]
    vol = load_study(_write(tmp_path, sl)).reference
    assert vol.array.dtype == np.float32
    assert np.all(vol.array == 100.0)


def test_two_acquisitions_in_one_series_are_two_phases(tmp_path: Path) -> None:
    art = [_slice("1.2.9.3", z, 1300, acq=1, times=("100000", "100022")) for z in (0, 5, 10)]
    pv = [_slice("1.2.9.3", z, 1150, acq=2, times=("100000", "100050")) for z in (0, 5, 10)]
    study = load_study(_write(tmp_path, art + pv))
    assert set(study.volumes) == {Phase.ARTERIAL, Phase.PORTAL_VENOUS}
    assert study.volumes[Phase.ARTERIAL].array.shape == (3, 6, 8)
    assert float(study.volumes[Phase.ARTERIAL].array[0, 0, 0]) == 276.0
    assert "delay 50 s" in study.volumes[Phase.PORTAL_VENOUS].phase_evidence


def test_other_objects_and_localizers_are_skipped(tmp_path: Path) -> None:
    good = [_slice("1.2.9.4", z, 1100, description="portal venous") for z in (0, 5, 10)]
    scout = _slice("1.2.9.5", 0.0, 1100, image_type="LOCALIZER")
    seg = _slice("1.2.9.6", 0.0, 1100, sop_class="1.2.840.10008.5.1.4.1.1.66.4")
    paths = _write(tmp_path, [*good, scout, seg])
    (tmp_path / "notes.txt").write_text("not dicom")
    study = load_study_dir(tmp_path)
    assert list(study.volumes) == [Phase.PORTAL_VENOUS]
    reasons = " | ".join(study.skipped)
    assert "localizer" in reasons and "not CT Image Storage" in reasons
    assert "not readable as DICOM" in reasons
    assert len(paths) == 5


def test_duplicate_phase_keeps_the_better_volume(tmp_path: Path) -> None:
    a = [_slice("1.2.9.7", z, 1100, description="PV") for z in (0, 5, 10)]
    b = [_slice("1.2.9.8", z, 1100, description="PV") for z in (0, 5, 10, 15)]
    study = load_study(_write(tmp_path, a + b))
    assert study.reference.series_instance_uid == "1.2.9.8"
    assert any(s.startswith("1.2.9.7") for s in study.skipped)


def test_no_ct_raises(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("nothing")
    with pytest.raises(StudyError):
        load_study_dir(tmp_path)


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("Abdomen arterial 5mm", Phase.ARTERIAL),
        ("ABD_ART_5.0", Phase.ARTERIAL),
        ("Leber arteriell", Phase.ARTERIAL),
        ("动脉期", Phase.ARTERIAL),
        ("Portal venous phase", Phase.PORTAL_VENOUS),
        ("ABD PV 5mm", Phase.PORTAL_VENOUS),
        ("portalvenös", Phase.PORTAL_VENOUS),
        ("门静脉期", Phase.PORTAL_VENOUS),
        ("Delayed 3 min", Phase.DELAYED),
        ("Spätphase", Phase.DELAYED),
        ("延迟期", Phase.DELAYED),
        ("Native", Phase.NATIVE),
        ("Nativ 5mm", Phase.NATIVE),
        ("non-contrast", Phase.NATIVE),
        ("平扫", Phase.NATIVE),
        ("Body 5.0 B30f", None),
        ("partial", None),  # "art" only as a word
    ],
)
def test_keyword_table(description: str, expected: Phase | None) -> None:
    assert keyword_phase(description) is expected


@pytest.mark.parametrize(("acq_time", "expected"),
                         [("100020", Phase.ARTERIAL), ("100034.9", Phase.ARTERIAL),
                          ("100035", Phase.PORTAL_VENOUS), ("100130", Phase.PORTAL_VENOUS),
                          ("100131", Phase.DELAYED), ("100300", Phase.DELAYED)])
def test_timing_rule(acq_time: str, expected: Phase) -> None:
    ds = _slice("1.2.9.9", 0.0, 0, times=("100000", acq_time), description="Body")
    assert classify_phase([ds])[0] is expected


def test_timing_beats_keyword_and_agent_alone_means_native() -> None:
    ds = _slice("1.2.9.10", 0.0, 0, times=("100000", "100025"), description="portal venous")
    assert classify_phase([ds])[0] is Phase.ARTERIAL
    plain = _slice("1.2.9.11", 0.0, 0, agent="", description="Body 5mm")
    phase, evidence = classify_phase([plain])
    assert phase is Phase.NATIVE and "no contrast agent" in evidence


def test_tm_parsing() -> None:
    assert parse_tm("101500.5") == 36900.5
    assert parse_tm("10:15:00") == 36900.0
    assert parse_tm("") is None
    ds = Dataset()
    ds.ContrastBolusStartTime, ds.AcquisitionTime = "235950", "000040"
    assert contrast_delay_s(ds) == 50.0


def test_image_evidence_when_headers_are_silent() -> None:
    from node.study.model import Geometry

    # A body with a bright round aorta: the image says arterial.
    shape = (10, 128, 128)
    yy, xx = np.mgrid[:128, :128]
    img = np.where(((yy - 64) / 50.0) ** 2 + ((xx - 64) / 60.0) ** 2 <= 1, 60.0, -1000.0)
    img[((yy - 70) ** 2 + (xx - 66) ** 2) <= 8 ** 2] = 320.0
    arr = np.repeat(img[None].astype(np.float32), shape[0], axis=0)
    geom = Geometry((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (5.0, 1.5, 1.5), shape)
    ds = _slice("1.2.9.12", 0.0, 0, description="Body")
    phase, evidence = classify_phase([ds], arr, geom)
    assert phase is Phase.ARTERIAL, evidence
    assert "aorta 320 HU" in evidence
