"""Tests of the synthetic CT phantom (node.phantom): DICOM, truth, protocol, determinism."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.config import RAISE, settings
from scipy import ndimage

from node.phantom import (
    generate_baseline,
    generate_follow_up,
    load_truth,
    load_truth_labels,
    volumetric_category,
)

PHASES = ("native", "arterial", "portal_venous", "delayed")


@pytest.fixture(scope="module", autouse=True)
def strict_pydicom() -> object:
    """Strict pydicom validation while these tests run (house style)."""
    old = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = RAISE
    settings.writing_validation_mode = RAISE
    yield
    settings.reading_validation_mode, settings.writing_validation_mode = old


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("baseline")
    return generate_baseline(out, seed=11, size=128, n_lesions=4, lesion_diameter_mm=(18.0, 45.0))


@pytest.fixture(scope="module")
def follow_up_tace(baseline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("followup")
    return generate_follow_up(baseline, out, seed=5, tace=True, target_category="PR")


def read_series(study: Path, phase: str) -> list[pydicom.Dataset]:
    """All images of one phase, sorted by increasing z (truth slice order)."""
    dss = [pydicom.dcmread(p) for p in sorted((study / "dicom" / phase).glob("*.dcm"))]
    return sorted(dss, key=lambda ds: float(ds.ImagePositionPatient[2]))


def hu_volume(dss: list[pydicom.Dataset]) -> np.ndarray:
    return np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in dss]
    ).astype(np.float32)


def test_series_layout_and_headers(baseline: Path) -> None:
    truth = load_truth(baseline)
    lesions, _ = load_truth_labels(baseline)
    times = {}
    for phase in PHASES:
        dss = read_series(baseline, phase)
        assert len(dss) == lesions.shape[0]
        for ds in dss:
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
            assert ds.StudyInstanceUID == truth["study_instance_uid"]
            assert ds.FrameOfReferenceUID == truth["frame_of_reference_uid"]
            assert ds.SeriesInstanceUID == truth["series"][phase]
            assert ds.PatientID == truth["patient_id"]
            assert ds.Modality == "CT" and ds.PatientPosition == "HFS"
            assert (ds.Rows, ds.Columns) == lesions.shape[1:]
            assert ("ContrastBolusAgent" in ds) == (phase != "native")
        z = [float(ds.ImagePositionPatient[2]) for ds in dss]
        assert np.allclose(np.diff(z), float(dss[0].SliceThickness))
        assert z[0] == pytest.approx(truth["grid"]["origin_xyz"][2])
        times[phase] = datetime.strptime(dss[-1].AcquisitionTime[:6], "%H%M%S")
        if phase != "native":
            start = datetime.strptime(dss[0].ContrastBolusStartTime[:6], "%H%M%S")
            delay = (times[phase] - start).total_seconds()
            assert delay == {"arterial": 22, "portal_venous": 50, "delayed": 150}[phase]
    assert times["native"] < times["arterial"] < times["portal_venous"] < times["delayed"]
    assert len(set(truth["series"].values())) == 4
    assert truth["shift_mm"]["portal_venous"] == [0.0, 0.0, 0.0]
    assert all(abs(v) <= 6.0 for p in PHASES for v in truth["shift_mm"][p])


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None and os.environ.get("CI") != "true",
    reason="dciodvfy (dicom3tools) not installed",
)
def test_dciodvfy_reports_no_errors(baseline: Path, follow_up_tace: Path) -> None:
    for study in (baseline, follow_up_tace):
        for phase in PHASES:
            path = sorted((study / "dicom" / phase).glob("*.dcm"))[3]
            run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            errors = [ln for ln in (run.stdout + run.stderr).splitlines() if "Error" in ln]
            assert errors == [], f"{phase}: {errors}"


def test_truth_volumes_match_label_map(baseline: Path) -> None:
    truth = load_truth(baseline)
    labels, liver = load_truth_labels(baseline)
    g = truth["grid"]
    voxel_ml = g["pixel_spacing_mm"] ** 2 * g["slice_thickness_mm"] / 1000.0
    assert labels.shape == tuple(g["shape"]) and liver.dtype == bool
    assert 1300 <= truth["liver_volume_ml"] <= 1900
    assert liver.sum() * voxel_ml == pytest.approx(truth["liver_volume_ml"], rel=0.03)
    assert np.all(liver[labels > 0]), "lesions lie inside the liver mask"
    assert len(truth["lesions"]) == 4
    for les in truth["lesions"]:
        mask = labels == les["label"]
        counted = mask.sum() * voxel_ml
        assert counted == pytest.approx(les["volume_ml"], rel=0.15)
        assert les["diameter_mm"] == pytest.approx(
            (6 * les["volume_ml"] * 1000 / np.pi) ** (1 / 3), rel=1e-3
        )
        assert les["diameter_mm"] * 0.8 < les["longest_axial_diameter_mm"] < les["diameter_mm"] * 2
        k, i, j = np.argwhere(mask).mean(axis=0)
        centroid = np.array(g["origin_xyz"]) + np.array(
            [j * g["pixel_spacing_mm"], i * g["pixel_spacing_mm"], k * g["slice_thickness_mm"]]
        )
        assert np.linalg.norm(centroid - les["center_xyz"]) < 4.0
    assert truth["total_volume_ml"] == pytest.approx(
        sum(les["volume_ml"] for les in truth["lesions"]), rel=1e-6
    )


def _shifted(mask: np.ndarray, shift_mm: list[float], grid: dict) -> np.ndarray:
    """``mask`` moved by a phase's anatomy shift (rounded to whole voxels)."""
    dz = round(shift_mm[2] / grid["slice_thickness_mm"])
    di = round(shift_mm[1] / grid["pixel_spacing_mm"])
    dj = round(shift_mm[0] / grid["pixel_spacing_mm"])
    return np.roll(mask, (dz, di, dj), axis=(0, 1, 2))


def test_lesion_attenuation_follows_protocol(baseline: Path) -> None:
    truth = load_truth(baseline)
    labels, liver = load_truth_labels(baseline)
    g = truth["grid"]
    parenchyma = ndimage.binary_erosion(liver & (labels == 0), iterations=2)
    for phase in PHASES:
        hu = hu_volume(read_series(baseline, phase))
        liver_hu = float(np.median(hu[_shifted(parenchyma, truth["shift_mm"][phase], g)]))
        for les in truth["lesions"]:
            core = ndimage.binary_erosion(labels == les["label"], structure=np.ones((1, 3, 3)))
            lesion_hu = float(np.mean(hu[_shifted(core, truth["shift_mm"][phase], g)]))
            diff = lesion_hu - liver_hu
            if phase == "arterial":
                assert diff > 20, (les["truth_id"], diff)
            elif phase == "delayed":
                assert diff < -5, (les["truth_id"], diff)
            elif phase == "native":
                assert -30 < diff < 0, (les["truth_id"], diff)
            else:
                assert abs(diff) < 25, (les["truth_id"], diff)


def test_follow_up_same_patient_new_study(baseline: Path, follow_up_tace: Path) -> None:
    prior, cur = load_truth(baseline), load_truth(follow_up_tace)
    assert cur["patient_id"] == prior["patient_id"]
    assert cur["patient_name"] == prior["patient_name"]
    assert cur["study_instance_uid"] != prior["study_instance_uid"]
    assert cur["frame_of_reference_uid"] != prior["frame_of_reference_uid"]
    assert cur["study_date"] == "20260305" and prior["study_date"] == "20260105"
    assert cur["prior_study_instance_uid"] == prior["study_instance_uid"]
    assert {les["truth_id"] for les in prior["lesions"]} <= {
        les["truth_id"] for les in cur["lesions"]
    }
    ds = read_series(follow_up_tace, "portal_venous")[0]
    assert ds.PatientID == prior["patient_id"] and ds.StudyDate == "20260305"
    assert ds.StudyInstanceUID == cur["study_instance_uid"]
    by_id = {les["truth_id"]: les for les in prior["lesions"]}
    for les in cur["lesions"]:
        if les["status"] != "new":
            assert les["prior_volume_ml"] == pytest.approx(by_id[les["truth_id"]]["volume_ml"])


def test_tace_leaves_dense_lipiodol(follow_up_tace: Path) -> None:
    truth = load_truth(follow_up_tace)
    labels, _ = load_truth_labels(follow_up_tace)
    with_oil = [les for les in truth["lesions"] if les["lipiodol"]]
    assert with_oil, "TACE should leave lipiodol in at least one lesion"
    native = hu_volume(read_series(follow_up_tace, "native"))
    pv = hu_volume(read_series(follow_up_tace, "portal_venous"))
    g = truth["grid"]
    for les in with_oil:
        mask = labels == les["label"]
        assert pv[mask].max() > 100  # small lesions: partial volume with the 5 mm slice
    largest = max(with_oil, key=lambda les: les["volume_ml"])
    mask = labels == largest["label"]
    assert pv[mask].max() > 150
    near = ndimage.binary_dilation(_shifted(mask, truth["shift_mm"]["native"], g), iterations=2)
    assert native[near].max() > 150  # dense on the plain scan too: not enhancement


@pytest.fixture(scope="module")
def small_baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    return generate_baseline(out, seed=23, size=64, n_lesions=3, noise_hu=0.0)


@pytest.mark.parametrize("category", ["CR", "PR", "MR", "SD", "PD"])
def test_target_category_honoured(category: str, small_baseline: Path, tmp_path: Path) -> None:
    base = small_baseline
    fu = generate_follow_up(base, tmp_path / "f", seed=2, target_category=category)
    prior, cur = load_truth(base), load_truth(fu)
    assert cur["category"] == category
    assert cur["prior_total_volume_ml"] == pytest.approx(prior["total_volume_ml"])
    total = sum(les["volume_ml"] for les in cur["lesions"])
    assert cur["total_volume_ml"] == pytest.approx(total, abs=1e-4)
    assert volumetric_category(cur["prior_total_volume_ml"], total) == category
    change = cur["volume_change_fraction"]
    if category != "CR":
        assert min(abs(change - b) for b in (-0.5, -0.25, 0.25)) >= 0.08
    labels, _ = load_truth_labels(fu)
    if category == "CR":
        assert total == 0 and labels.max() == 0
        assert all(les["status"] == "vanished" for les in cur["lesions"])


def test_volumetric_rule_boundaries() -> None:
    assert volumetric_category(10.0, 0.0) == "CR"
    assert volumetric_category(10.0, 5.0) == "PR"  # exactly -50 %
    assert volumetric_category(10.0, 5.0001) == "MR"
    assert volumetric_category(10.0, 7.5) == "MR"  # exactly -25 %
    assert volumetric_category(10.0, 7.5001) == "SD"
    assert volumetric_category(10.0, 12.4999) == "SD"
    assert volumetric_category(10.0, 12.5) == "PD"  # exactly +25 %
    with pytest.raises(ValueError):
        volumetric_category(0.0, 1.0)


def test_same_seed_same_study(tmp_path: Path) -> None:
    a = generate_baseline(tmp_path / "a", seed=4, size=48, n_lesions=2)
    b = generate_baseline(tmp_path / "b", seed=4, size=48, n_lesions=2)
    assert load_truth(a) == load_truth(b)
    for phase in PHASES:
        fa = sorted((a / "dicom" / phase).glob("*.dcm"))
        fb = sorted((b / "dicom" / phase).glob("*.dcm"))
        assert [p.name for p in fa] == [p.name for p in fb]
        for pa, pb in zip(fa, fb, strict=True):
            assert pa.read_bytes() == pb.read_bytes()
    c = generate_baseline(tmp_path / "c", seed=5, size=48, n_lesions=2)
    assert load_truth(c)["study_instance_uid"] != load_truth(a)["study_instance_uid"]


def test_phantom_does_not_import_analysis() -> None:
    code = (
        "import sys, node.phantom; "
        "sys.exit(any(m.startswith('node.analysis') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
