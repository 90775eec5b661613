"""SEG + TID 1500 SR writers and the prior reader, checked by independent readers.

dciodvfy (dicom3tools) and dcmqi are the second opinions; highdicom reads every file back.
In CI (CI=true) a missing external tool is a failure, not a skip.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import config as pydicom_config

from node.analysis.enhancement import SIZE_PATTERNS
from node.analysis.results import AnalysisResult, LesionMeasurement
from node.dicom import codes
from node.dicom.seg import build_seg
from node.dicom.sr import build_sr
from node.dicom.sr_reader import read_findings, read_prior
from node.study.model import Phase, Study
from tests.conftest import require_tool
from tests.dicom_fixtures import SPACING, make_case

INPUT_KEY = "0123456789abcdef0123456789abcdef"


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
    dciodvfy = str(require_tool("dciodvfy"))
    path = case.seg_path if which == "seg" else case.sr_path
    out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
    assert errors == []
    # The only tolerated warning: dciodvfy does not know the private coding scheme.
    warnings = [ln for ln in (out.stdout + out.stderr).splitlines()
                if ln.startswith("Warning") and codes.PRIVATE_SCHEME not in ln]
    assert warnings == []


def test_dsrdump_reads_sr(case: Case) -> None:
    dsrdump = str(require_tool("dsrdump"))
    out = subprocess.run([dsrdump, str(case.sr_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Imaging Measurement Report" in out.stdout
    assert "RESEARCH USE ONLY" in out.stdout


def test_dcmqi_segimage2itkimage_reads_seg(case: Case, tmp_path: Path) -> None:
    exe = str(require_tool("segimage2itkimage"))
    out = subprocess.run([exe, "--inputDICOM", str(case.seg_path), "--outputDirectory",
                          str(tmp_path), "--outputType", "nrrd"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    labels = [s["SegmentLabel"] for group in meta["segmentAttributes"] for s in group]
    assert labels == [f"Lesion {k}" for k in range(1, case.n + 1)] + ["Liver"]
    assert "warn" not in out.stdout.lower() + out.stderr.lower()


def test_dcmqi_tid1500reader_reads_sr(case: Case, tmp_path: Path) -> None:
    exe = str(require_tool("tid1500reader"))
    target = tmp_path / "sr.json"
    out = subprocess.run([exe, "--inputDICOM", str(case.sr_path), "--outputMetadata", str(target)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    groups = json.loads(target.read_text())["Measurements"]
    assert len(groups) == 2 * (case.n + 1)  # volumetric + planar per lesion and for the liver
    volumetric = [g for g in groups if "ReferencedSegment" in g]
    assert sorted(g["ReferencedSegment"] for g in volumetric) == list(range(1, case.n + 2))
    assert all(g["segmentationSOPInstanceUID"] == case.seg.SOPInstanceUID for g in volumetric)
    # dcmqi keeps every value with its unit, derivation and phase modifier.
    by_uid = {g["TrackingUniqueIdentifier"]: g for g in volumetric}
    for lesion in case.result.lesions:
        group = by_uid[lesion.tracking_uid]
        got = {}
        for m in group["measurementItems"]:
            mods = {x["modifier"]["CodeValue"]: x["modifierValue"]["CodeValue"]
                    for x in m.get("measurementModifiers", [])}
            key = (m["quantity"]["CodeValue"], m.get("derivationModifier", {}).get("CodeValue"),
                   mods.get(codes.CONTRAST_PHASE.value))
            got[key] = (float(m["value"]), m["units"]["CodeValue"])
        _assert_nums(got, _expected_nums(lesion))
        qualitative = {q["conceptCode"]["CodeValue"]: q["conceptValue"]["CodeValue"]
                       for q in group["qualitativeEvaluations"]
                       if isinstance(q["conceptValue"], dict)}  # TEXT values are strings
        assert qualitative[codes.SIZE_PATTERN.value] == (
            codes.SIZE_PATTERN_CODES[str(lesion.size_pattern)].value)
        for phase, behaviour in lesion.phase_behaviour.items():
            assert qualitative[codes.PHASE_BEHAVIOUR[phase].value] == (
                codes.BEHAVIOUR_CODES[behaviour].value)


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
    for group in planar:  # the planar group keeps what it held before the characterisation
        assert [m.name for m in group.get_measurements()] == [
            codes.AREA, codes.LONG_AXIS, codes.SHORT_AXIS]


def _ohif_labels(ds: pydicom.Dataset) -> dict[str, list[str]]:
    """The NUM names OHIF lists per lesion: groups merged by Tracking UID in document order,
    top-level NUMs only (OHIF 3.x cornerstone-dicom-sr getSopClassHandlerModule); its text
    box shows the first 5 (DICOMSRDisplayTool._getTextBoxLinesFromLabels)."""
    (container,) = [i for i in ds.ContentSequence
                    if i.ConceptNameCodeSequence[0].CodeValue == codes.IMAGING_MEASUREMENTS.value]
    merged: dict[str, list[str]] = {}
    for group in container.ContentSequence:
        items = list(group.ContentSequence)
        (uid,) = [i.UID for i in items if i.ValueType == "UIDREF"]
        merged.setdefault(str(uid), []).extend(
            i.ConceptNameCodeSequence[0].CodeMeaning for i in items if i.ValueType == "NUM")
    return merged


def test_ohif_text_box_keeps_area_axes_volume_and_mean_hu(case: Case) -> None:
    labels = _ohif_labels(pydicom.dcmread(case.sr_path))
    assert len(labels) == case.n + 1
    for names in labels.values():
        assert names[:5] == ["Area", "Long axis", "Short axis", "Volume",
                             "Attenuation Coefficient"]


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


# --- lesion characterisation and per-patient values ----------------------------------------------

_Key = tuple[str, "str | None", "str | None"]  # (concept, derivation, contrast phase) code values


def _expected_nums(lesion: LesionMeasurement) -> dict[_Key, tuple[float, str]]:
    """The NUM items a lesion's volumetric group must hold: exactly the known fields."""
    hu, mean, sd = "[hnsf'U]", codes.MEAN.value, codes.STANDARD_DEVIATION.value
    att = codes.ATTENUATION.value
    out: dict[_Key, tuple[float, str]] = {
        (codes.VOLUME.value, None, None): (lesion.volume_ml, "ml")}
    scalars = [(codes.MAXIMUM_3D_DIAMETER, lesion.largest_diameter_3d_mm, 1.0, "mm"),
               (codes.VIABLE_VOLUME, lesion.enhancing_volume_ml, 1.0, "ml"),
               (codes.NECROTIC_VOLUME, lesion.necrotic_volume_ml, 1.0, "ml"),
               (codes.NECROTIC_FRACTION, lesion.necrotic_fraction, 100.0, "%"),
               (codes.LIPIODOL_VOLUME, lesion.lipiodol_volume_ml, 1.0, "ml")]
    for concept, value, factor, unit in scalars:
        if value is not None:
            out[(concept.value, None, None)] = (value * factor, unit)
    per_phase = [(att, mean, lesion.mean_hu), (att, sd, lesion.sd_hu),
                 (codes.ENHANCEMENT_VS_NATIVE.value, None, lesion.enhancement_vs_native_hu),
                 (codes.ENHANCEMENT_VS_LIVER.value, None, lesion.enhancement_vs_liver_hu)]
    for name, derivation, values in per_phase:
        for phase, value in values.items():
            out[(name, derivation, codes.PHASE_CODES[phase].value)] = (value, hu)
    return out


def _assert_nums(got: dict[_Key, tuple[float, str]], want: dict[_Key, tuple[float, str]],
                 tol: float = 0.006) -> None:
    """Same keys and units; values equal to within the SR's rounding (HU: 0.01, else 1e-4)."""
    assert got.keys() == want.keys()
    assert {k: u for k, (_, u) in got.items()} == {k: u for k, (_, u) in want.items()}
    assert {k: v for k, (v, _) in got.items()} == pytest.approx(
        {k: v for k, (v, _) in want.items()}, abs=tol)


def _volumetric_items(ds: pydicom.Dataset) -> dict[str, list[pydicom.Dataset]]:
    """Top-level items of each volumetric group (the one with a Referenced Segment), by UID."""
    (container,) = [i for i in ds.ContentSequence
                    if i.ConceptNameCodeSequence[0].CodeValue == codes.IMAGING_MEASUREMENTS.value]
    out = {}
    for group in container.ContentSequence:
        items = list(group.ContentSequence)
        names = {i.ConceptNameCodeSequence[0].CodeValue for i in items}
        if codes.REFERENCED_SEGMENT.value in names:
            (uid,) = [i.UID for i in items if i.ValueType == "UIDREF"]
            out[str(uid)] = items
    return out


def _nums(items: list[pydicom.Dataset]) -> dict[_Key, tuple[float, str]]:
    """NUM items read with pydicom alone, keyed by (concept, derivation, contrast phase)."""
    out = {}
    for item in (i for i in items if i.ValueType == "NUM"):
        mods = {m.ConceptNameCodeSequence[0].CodeValue: m.ConceptCodeSequence[0].CodeValue
                for m in item.get("ContentSequence", []) if m.ValueType == "CODE"}
        key = (item.ConceptNameCodeSequence[0].CodeValue, mods.get(codes.DERIVATION.value),
               mods.get(codes.CONTRAST_PHASE.value))
        assert key not in out, f"duplicate {key}"
        mv = item.MeasuredValueSequence[0]
        out[key] = (float(mv.NumericValue), str(mv.MeasurementUnitsCodeSequence[0].CodeValue))
    return out


def test_sr_holds_lesion_characterisation(case: Case) -> None:
    """Every known value with its UCUM unit; lesion 2 (no plain phase) has no plain-scan item."""
    groups = _volumetric_items(pydicom.dcmread(case.sr_path))
    for lesion in case.result.lesions:
        items = groups[lesion.tracking_uid]
        _assert_nums(_nums(items), _expected_nums(lesion))
        coded = {i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0].CodeValue
                 for i in items if i.ValueType == "CODE"}
        assert coded[codes.SIZE_PATTERN.value] == (
            codes.SIZE_PATTERN_CODES[str(lesion.size_pattern)].value)
        behaviour = {phase: coded.get(c.value) for phase, c in codes.PHASE_BEHAVIOUR.items()}
        assert behaviour == {phase: codes.BEHAVIOUR_CODES[b].value if b else None for phase, b in
                             ((p, lesion.phase_behaviour.get(p)) for p in behaviour)}
    if case.n == 2:
        second = _nums(groups[case.result.lesions[1].tracking_uid])
        assert not [k for k in second if k[2] == codes.PHASE_CODES["native"].value]
        assert (codes.LIPIODOL_VOLUME.value, None, None) not in second


def test_sr_holds_per_patient_values(case: Case) -> None:
    liver_uid = str(case.seg.SegmentSequence[case.n].TrackingUID)
    nums = _nums(_volumetric_items(pydicom.dcmread(case.sr_path))[liver_uid])
    result = case.result
    want: dict[_Key, tuple[float, str]] = {
        (codes.TOTAL_TUMOUR_VOLUME.value, None, None): (result.total_volume_ml, "ml"),
        (codes.TUMOUR_BURDEN.value, None, None): (float(result.tumour_burden_percent or 0), "%"),
    }
    for phase, value in result.liver_median_hu.items():
        key = (codes.ATTENUATION.value, codes.MEDIAN.value, codes.PHASE_CODES[phase].value)
        want[key] = (value, "[hnsf'U]")
    _assert_nums({k: v for k, v in nums.items() if k in want}, want)


def test_highdicom_parses_characterisation(case: Case) -> None:
    units = {codes.UNIT_ML, codes.UNIT_MM, codes.UNIT_MM2, codes.UNIT_HU, codes.UNIT_PERCENT}
    report = _report(case.sr_path)
    by_uid = {str(g.tracking_uid): g for g in report.get_volumetric_roi_measurement_groups()}
    for lesion in case.result.lesions:
        group = by_uid[lesion.tracking_uid]
        measurements = group.get_measurements()
        assert len(measurements) == len(_expected_nums(lesion))
        assert all(m.unit in units for m in measurements)
        (diameter,) = group.get_measurements(name=codes.MAXIMUM_3D_DIAMETER)
        assert diameter.value == pytest.approx(lesion.largest_diameter_3d_mm, abs=1e-4)
        sds = [m for m in group.get_measurements(name=codes.ATTENUATION)
               if m.derivation == codes.STANDARD_DEVIATION]
        assert sorted(m.value for m in sds) == pytest.approx(sorted(lesion.sd_hu.values()))
        (pattern,) = group.get_qualitative_evaluations(name=codes.SIZE_PATTERN)
        assert pattern.value == codes.SIZE_PATTERN_CODES[str(lesion.size_pattern)]


def test_read_findings_round_trip(case: Case) -> None:
    found = read_findings(pydicom.dcmread(case.sr_path))
    fields = ("volume_ml", "largest_diameter_3d_mm", "enhancing_volume_ml",
              "necrotic_volume_ml", "necrotic_fraction", "lipiodol_volume_ml")
    dicts = ("mean_hu", "sd_hu", "enhancement_vs_native_hu", "enhancement_vs_liver_hu")
    for lesion in case.result.lesions:
        got = found[lesion.tracking_uid]
        assert (got.tracking_id, got.is_liver) == (lesion.tracking_id, False)
        for name in fields:
            want = getattr(lesion, name)
            assert getattr(got, name) == (None if want is None
                                          else pytest.approx(want, abs=1e-4)), name
        for name in dicts:
            assert getattr(got, name) == pytest.approx(getattr(lesion, name), abs=0.006), name
        assert (got.size_pattern, got.phase_behaviour) == (lesion.size_pattern,
                                                           lesion.phase_behaviour)
    (liver,) = [f for f in found.values() if f.is_liver]
    assert liver.volume_ml == pytest.approx(case.result.liver_volume_ml, abs=1e-4)
    assert liver.median_hu == pytest.approx(case.result.liver_median_hu, abs=0.006)
    assert liver.total_tumour_volume_ml == pytest.approx(case.result.total_volume_ml, abs=1e-4)
    assert liver.tumour_burden_percent == pytest.approx(case.result.tumour_burden_percent,
                                                        abs=1e-4)


def test_missing_values_are_omitted(tmp_path: Path) -> None:
    """An uncharacterised lesion, no liver medians: only Volume + reference mean HU remain."""
    study, result = make_case(1, with_response=False)
    lesion = result.lesions[0]
    fresh = LesionMeasurement(**{f: getattr(lesion, f) for f in (
        "label", "tracking_id", "tracking_uid", "volume_ml", "longest_diameter_mm",
        "short_axis_mm", "key_slice", "long_axis_ij", "short_axis_ij", "outline_ij", "area_mm2",
        "centroid_xyz")})
    fresh.mean_hu = {"portal_venous": 110.0, "arterial": float("nan")}  # NaN: not measured
    result.lesions[0], result.liver_median_hu = fresh, {}
    seg = build_seg(study, result, input_key=INPUT_KEY)
    sr = build_sr(study, result, seg, input_key=INPUT_KEY, time_point="baseline")
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    items = _volumetric_items(ds)[fresh.tracking_uid]
    _assert_nums(_nums(items), {
        (codes.VOLUME.value, None, None): (fresh.volume_ml, "ml"),
        (codes.ATTENUATION.value, codes.MEAN.value, codes.PHASE_CODES["portal_venous"].value):
            (110.0, "[hnsf'U]")})
    assert {i.ConceptNameCodeSequence[0].CodeValue for i in items if i.ValueType == "CODE"} \
        == {"276214006", codes.FINDING.value, "363698007"}  # category, finding, site only
    got = read_findings(ds)[fresh.tracking_uid]
    assert got.sd_hu == {} and got.size_pattern is None and got.necrotic_fraction is None
    (liver,) = [f for f in read_findings(ds).values() if f.is_liver]
    assert liver.median_hu == {} and liver.total_tumour_volume_ml is not None


def test_every_analysis_value_has_a_code() -> None:
    """The analysis' phases, size patterns and behaviours all map to a code."""
    assert {p.value for p in Phase} == codes.PHASE_CODES.keys() == codes.PHASE_BEHAVIOUR.keys()
    assert {p for _, p in SIZE_PATTERNS} == codes.SIZE_PATTERN_CODES.keys()
    assert codes.BEHAVIOUR_CODES.keys() == {"hyper", "iso", "hypo"}


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
    with pytest.raises(ValueError, match="TID 1500"):
        read_findings(pydicom.dcmread(case.seg_path))


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
    dciodvfy = str(require_tool("dciodvfy"))
    out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    assert [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")] == []
