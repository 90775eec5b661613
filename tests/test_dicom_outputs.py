"""SEG + TID 1500 SR writers and the prior reader, checked by independent readers.

dciodvfy (dicom3tools) and dcmqi are the second opinions; highdicom reads every file back.
In CI (CI=true) a missing external tool is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import config as pydicom_config

from node.analysis.results import AnalysisResult
from node.dicom import codes
from node.dicom.seg import build_seg
from node.dicom.sr import build_sr
from node.dicom.sr_reader import read_prior
from node.study.model import Study
from tests.dicom_fixtures import SPACING, make_case

INPUT_KEY = "0123456789abcdef0123456789abcdef"
VENV_BIN = Path(sys.executable).parent


def _tool(name: str, *candidates: Path) -> str:
    """Path of an external tool; skip locally, FAIL in CI when it is missing."""
    for c in candidates:
        if c.exists():
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{name} is required in CI but not installed")
    pytest.skip(f"{name} not installed")


@pytest.fixture(scope="module", autouse=True)
def strict_pydicom() -> Iterator[None]:
    """Strict pydicom validation for reading and writing in this module."""
    settings = pydicom_config.settings
    old = (settings.reading_validation_mode, settings.writing_validation_mode)
    settings.reading_validation_mode = pydicom_config.RAISE
    settings.writing_validation_mode = pydicom_config.RAISE
    yield
    settings.reading_validation_mode, settings.writing_validation_mode = old


class Case:
    """One built case: inputs, objects, and their files."""

    def __init__(self, n_lesions: int, with_response: bool, folder: Path) -> None:
        self.study, self.result = make_case(n_lesions, with_response)
        self.n = n_lesions
        self.seg = build_seg(self.study, self.result, input_key=INPUT_KEY)
        self.sr = build_sr(self.study, self.result, self.seg, input_key=INPUT_KEY,
                           time_point="follow-up 1" if with_response else "baseline")
        folder.mkdir(parents=True, exist_ok=True)
        self.seg_path, self.sr_path = folder / "seg.dcm", folder / "sr.dcm"
        self.seg.save_as(self.seg_path, enforce_file_format=True)
        self.sr.save_as(self.sr_path, enforce_file_format=True)


@pytest.fixture(scope="module", params=[2, 0], ids=["2-lesions", "0-lesions"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         strict_pydicom: None) -> Case:
    n = int(request.param)
    return Case(n, with_response=True, folder=tmp_path_factory.mktemp(f"case{n}"))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, strict_pydicom: None) -> Case:
    return Case(2, with_response=False, folder=tmp_path_factory.mktemp("baseline"))


# --- independent validators ---------------------------------------------------------------------


@pytest.mark.parametrize("which", ["seg", "sr"])
def test_dciodvfy_reports_no_errors(case: Case, which: str) -> None:
    dciodvfy = _tool("dciodvfy", Path("/usr/bin/dciodvfy"))
    path = case.seg_path if which == "seg" else case.sr_path
    out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
    assert errors == []
    # The only tolerated warning: dciodvfy does not know the private coding scheme.
    warnings = [ln for ln in (out.stdout + out.stderr).splitlines()
                if ln.startswith("Warning") and codes.PRIVATE_SCHEME not in ln]
    assert warnings == []


def test_dsrdump_reads_sr(case: Case) -> None:
    dsrdump = _tool("dsrdump", Path("/usr/bin/dsrdump"))
    out = subprocess.run([dsrdump, str(case.sr_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Imaging Measurement Report" in out.stdout
    assert "RESEARCH USE ONLY" in out.stdout


def test_dcmqi_segimage2itkimage_reads_seg(case: Case, tmp_path: Path) -> None:
    exe = _tool("segimage2itkimage", VENV_BIN / "segimage2itkimage")
    out = subprocess.run([exe, "--inputDICOM", str(case.seg_path), "--outputDirectory",
                          str(tmp_path), "--outputType", "nrrd"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    labels = [s["SegmentLabel"] for group in meta["segmentAttributes"] for s in group]
    assert labels == [f"Lesion {k}" for k in range(1, case.n + 1)] + ["Liver"]
    assert "warn" not in out.stdout.lower() + out.stderr.lower()


def test_dcmqi_tid1500reader_reads_sr(case: Case, tmp_path: Path) -> None:
    exe = _tool("tid1500reader", VENV_BIN / "tid1500reader")
    target = tmp_path / "sr.json"
    out = subprocess.run([exe, "--inputDICOM", str(case.sr_path), "--outputMetadata", str(target)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    groups = json.loads(target.read_text())["Measurements"]
    assert len(groups) == 2 * (case.n + 1)  # volumetric + planar per lesion and for the liver
    volumetric = [g for g in groups if "ReferencedSegment" in g]
    assert sorted(g["ReferencedSegment"] for g in volumetric) == list(range(1, case.n + 2))
    assert all(g["segmentationSOPInstanceUID"] == case.seg.SOPInstanceUID for g in volumetric)


# --- highdicom read-back -------------------------------------------------------------------------


def test_seg_reads_back(case: Case) -> None:
    seg = hd.seg.segread(case.seg_path)
    assert seg.number_of_segments == case.n + 1
    uids = {int(s.SegmentNumber): str(s.TrackingUID) for s in seg.SegmentSequence}
    for lesion in case.result.lesions:
        assert uids[lesion.label] == lesion.tracking_uid
    assert seg.SeriesDescription.startswith("liver-node") and len(seg.SeriesDescription) <= 64
    assert seg.ContentCreatorName and seg.Manufacturer
    assert "ReferencedSeriesSequence" in seg
    assert all("RecommendedDisplayCIELabValue" in s for s in seg.SegmentSequence)
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName and algo.AlgorithmVersion


def test_seg_frames_match_masks_and_sources(case: Case) -> None:
    """Every frame references the source slice it was cut from and equals its mask."""
    ds = pydicom.dcmread(case.seg_path)
    by_uid = {d.SOPInstanceUID: k for k, d in enumerate(case.study.reference.datasets)}
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    shared = ds.SharedFunctionalGroupsSequence[0]
    for n, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        src = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = by_uid[src]
        ident = frame.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        number = int(ident[0].ReferencedSegmentNumber)
        expected = (case.result.liver_mask[k] if number == case.n + 1
                    else case.result.lesion_labels[k] == number)
        assert np.array_equal(frames[n].astype(bool), expected)
        assert frames[n].any(), "empty frames must be omitted"
        ipp = frame.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose(ipp, case.study.reference.datasets[k].ImagePositionPatient)


def _report(path: Path) -> hd.sr.MeasurementReport:
    sr = hd.sr.srread(path)
    return hd.sr.MeasurementReport.from_sequence(sr.ContentSequence and [sr], is_root=True)


def test_sr_reads_back(case: Case) -> None:
    report = _report(case.sr_path)
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert len(volumetric) == case.n + 1  # the lesions and the liver
    got = {}
    for group in volumetric:
        (volume,) = [m for m in group.get_measurements() if m.name == codes.VOLUME]
        assert volume.unit == codes.UNIT_ML
        got[str(group.tracking_uid)] = volume.value
        segment = group.referenced_segment
        assert segment is not None
        assert segment.referenced_sop_instance_uid == case.seg.SOPInstanceUID
    expected = {les.tracking_uid: les.volume_ml for les in case.result.lesions}
    liver_uid = str(case.seg.SegmentSequence[case.n].TrackingUID)
    assert got.pop(liver_uid) == pytest.approx(case.result.liver_volume_ml, rel=1e-4)
    assert got.keys() == expected.keys()
    for uid, v in expected.items():
        assert got[uid] == pytest.approx(v, rel=1e-4)


def test_every_volumetric_group_has_a_planar_partner(case: Case) -> None:
    report = _report(case.sr_path)
    planar = report.get_planar_roi_measurement_groups()
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert {str(g.tracking_uid) for g in volumetric} == {str(g.tracking_uid) for g in planar}
    for group in planar:
        roi = group.roi
        assert isinstance(roi, hd.sr.ImageRegion)
        assert roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        data = roi.value
        assert np.allclose(data[0], data[-1]), "closed outline"
    values: dict[str, int] = {}
    groups: list = [*planar, *volumetric]
    for group in groups:
        uid = str(group.tracking_uid)
        values[uid] = values.get(uid, 0) + len(group.get_measurements())
    assert all(v <= 5 for v in values.values()), values


def test_response_and_disclaimer_in_sr(case: Case) -> None:
    ds = pydicom.dcmread(case.sr_path)
    declared = {i.CodingSchemeDesignator for i in ds.CodingSchemeIdentificationSequence}
    assert codes.PRIVATE_SCHEME in declared
    root = ds.ContentSequence
    (container,) = [i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in container.ContentSequence}
    assert all(i.ValueType in ("CODE", "TEXT") for i in container.ContentSequence)
    resp = case.result.response
    assert resp is not None
    code = items["Current Response"].ConceptCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == (
        codes.RESPONSE_CODES[resp.category].value, codes.PRIVATE_SCHEME)
    assert items["Prior study instance UID"].TextValue == resp.prior_study_instance_uid
    assert "RESEARCH USE ONLY" in items["Comment"].TextValue
    assert ds.SeriesDescription.startswith("liver-node") and len(ds.SeriesDescription) <= 64


def test_baseline_sr_has_no_response(baseline: Case) -> None:
    ds = pydicom.dcmread(baseline.sr_path)
    text = str(ds)
    assert "Current Response" not in text and "Subject Time Point Identifier" in text
    assert "baseline" in text


# --- prior reader ---------------------------------------------------------------------------------


def test_read_prior_round_trip(case: Case) -> None:
    prior = read_prior(pydicom.dcmread(case.sr_path), pydicom.dcmread(case.seg_path))
    assert prior.study_instance_uid == case.study.study_instance_uid
    assert prior.study_date == case.study.study_date
    assert prior.sr_sop_instance_uid == case.sr.SOPInstanceUID
    voxel = max(SPACING)
    by_uid = {les.tracking_uid: les for les in prior.lesions}
    assert by_uid.keys() == {les.tracking_uid for les in case.result.lesions}
    for lesion in case.result.lesions:
        got = by_uid[lesion.tracking_uid]
        assert got.tracking_id == lesion.tracking_id
        assert got.volume_ml == pytest.approx(lesion.volume_ml, rel=1e-4)
        assert got.longest_diameter_mm == pytest.approx(lesion.longest_diameter_mm, rel=1e-4)
        assert got.centroid_xyz is not None
        assert np.linalg.norm(np.subtract(got.centroid_xyz, lesion.centroid_xyz)) <= voxel
    assert prior.liver_centroid_xyz is not None
    assert np.linalg.norm(np.subtract(prior.liver_centroid_xyz,
                                      case.result.liver_centroid_xyz)) <= voxel


def test_read_prior_converts_mm3_and_works_without_seg(baseline: Case) -> None:
    ds = pydicom.dcmread(baseline.sr_path)
    for item in ds.ContentSequence:
        for group in item.get("ContentSequence", []):
            for num in group.get("ContentSequence", []):
                name = num.ConceptNameCodeSequence[0].CodeValue
                if num.ValueType == "NUM" and name == codes.VOLUME.value:
                    mv = num.MeasuredValueSequence[0]
                    mv.NumericValue = f"{float(mv.NumericValue) * 1000.0:.4f}"
                    unit = mv.MeasurementUnitsCodeSequence[0]
                    unit.CodeValue, unit.CodeMeaning = "mm3", "cubic millimeter"
    prior = read_prior(ds, None)
    expected = {les.tracking_uid: les.volume_ml for les in baseline.result.lesions}
    assert {les.tracking_uid: les.volume_ml for les in prior.lesions} == pytest.approx(expected)
    assert all(les.centroid_xyz is None for les in prior.lesions)
    assert prior.liver_centroid_xyz is None


def test_read_prior_rejects_other_documents(case: Case) -> None:
    with pytest.raises(ValueError, match="TID 1500"):
        read_prior(pydicom.dcmread(case.seg_path), None)


# --- determinism and input validation ------------------------------------------------------------


def _build(study: Study, result: AnalysisResult, key: str) -> tuple[str, ...]:
    seg = build_seg(study, result, input_key=key)
    sr = build_sr(study, result, seg, input_key=key, time_point="baseline")
    return (seg.SeriesInstanceUID, seg.SOPInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID,
            *(str(s.TrackingUID) for s in seg.SegmentSequence))


def test_uids_are_deterministic(case: Case) -> None:
    first = _build(case.study, case.result, INPUT_KEY)
    assert first == _build(case.study, case.result, INPUT_KEY)
    assert first[:2] == (case.seg.SeriesInstanceUID, case.seg.SOPInstanceUID)
    assert len(set(first[:4])) == 4
    other = _build(case.study, case.result, "another-key")
    assert set(first[:4]).isdisjoint(other[:4])


def test_build_seg_rejects_mismatched_labels() -> None:
    study, result = make_case(2)
    result.lesion_labels[result.lesion_labels == 2] = 0
    with pytest.raises(ValueError, match="lesion_labels"):
        build_seg(study, result, input_key=INPUT_KEY)


def test_build_sr_rejects_open_outline() -> None:
    study, result = make_case(1, with_response=False)
    result.lesions[0].outline_ij = result.lesions[0].outline_ij[:-1]
    seg = build_seg(study, result, input_key=INPUT_KEY)
    with pytest.raises(ValueError, match="closed"):
        build_sr(study, result, seg, input_key=INPUT_KEY, time_point="baseline")


def test_private_codes_are_documented() -> None:
    readme = (Path(__file__).parents[1] / "sr_templates" / "README.md").read_text()
    for code in codes.PRIVATE_CODES:
        assert code.scheme_designator == codes.PRIVATE_SCHEME
        assert f"| {code.value} | {code.meaning} |" in readme, code.value


def test_sr_names_the_sr_it_supersedes(baseline: Case, tmp_path: Path) -> None:
    """A re-analysis after a late series lists the earlier SR as its predecessor."""
    later = build_sr(baseline.study, baseline.result, baseline.seg, input_key="with-late-series",
                     time_point="baseline", previous_versions=[baseline.sr])
    assert later.SOPInstanceUID != baseline.sr.SOPInstanceUID
    (ref,) = later.PredecessorDocumentsSequence
    assert ref.StudyInstanceUID == baseline.sr.StudyInstanceUID
    (series,) = ref.ReferencedSeriesSequence
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == baseline.sr.SOPInstanceUID
    path = tmp_path / "later-sr.dcm"
    later.save_as(path, enforce_file_format=True)
    dciodvfy = _tool("dciodvfy", Path("/usr/bin/dciodvfy"))
    out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    assert [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")] == []
