"""Alignment of the phases onto the portal venous volume (node.analysis.register).

The phantom displaces each phase's anatomy rigidly by a known ``shift_mm`` (truth.json)
relative to the portal venous phase (here up to 20 mm per axis: breathing between phases
moves the liver 1-2 cm); the registration must recover it within one voxel. Rotations and
deformations are applied to a phantom volume with SimpleITK, so their truth is known too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from node.analysis import analyze
from node.analysis import register as reg
from node.analysis.register import align_to_reference, to_sitk
from node.analysis.results import AnalysisResult
from node.analysis.run import DEFORM_ABOVE_MM
from node.phantom import generate_baseline, load_truth, load_truth_labels
from node.study.assembly import load_study_dir
from node.study.model import Geometry, Phase, Study

#: The triggered policy (node.analysis.run: DEFORM_ABOVE_MM, once DEFORMABLE_STEP is on).
POLICY = {"rotation": True, "deformable": True, "measure_residual": True,
          "deform_above_mm": DEFORM_ABOVE_MM}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four phases, 192 x 192 (about 2 mm pixels), 5 mm slices, shifts up to 20 mm."""
    return generate_baseline(tmp_path_factory.mktemp("register") / "study", 31, size=192,
                             n_lesions=2, max_shift_mm=20.0)


@pytest.fixture(scope="module")
def study(phantom: Path) -> Study:
    return load_study_dir(phantom / "dicom")


@pytest.fixture(scope="module")
def region(phantom: Path, study: Study) -> np.ndarray:
    """The true liver dilated by 20 mm, on the portal venous grid."""
    _, liver = load_truth_labels(phantom)
    geom = study.reference.geometry
    return np.asarray(ndimage.distance_transform_edt(~liver, sampling=geom.spacing) <= 20.0)


@pytest.fixture(scope="module")
def analysed(study: Study) -> AnalysisResult:
    return analyze(study)


def _voxel(geometry: Geometry) -> np.ndarray:
    """Voxel size in patient-axis order (x, y, z), as ``shift_mm`` is."""
    dz, dy, dx = geometry.spacing
    return np.array([dx, dy, dz])


def _region_centre(region: np.ndarray, image: sitk.Image) -> np.ndarray:
    k, i, j = (float(v) for v in np.asarray(ndimage.center_of_mass(region)))
    return np.array(image.TransformContinuousIndexToPhysicalPoint([j, i, k]))


def _bump(array: np.ndarray, geometry: Geometry, centre: np.ndarray,
          amplitude_mm: tuple[float, float, float], sigma_mm: float = 50.0) -> np.ndarray:
    """``array`` warped by a smooth Gaussian displacement (a local, non-rigid motion)."""
    img = to_sitk(array, geometry)
    points = sitk.GetArrayFromImage(sitk.PhysicalPointSource(
        sitk.sitkVectorFloat64, img.GetSize(), img.GetOrigin(), img.GetSpacing(),
        img.GetDirection()))
    weight = np.exp(-np.sum((points - centre) ** 2, axis=-1) / (2 * sigma_mm**2))
    field = sitk.GetImageFromArray(weight[..., None] * np.asarray(amplitude_mm), isVector=True)
    field.CopyInformation(img)
    out = sitk.Resample(img, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, -1000.0)
    return sitk.GetArrayFromImage(out)


@pytest.mark.parametrize("phase", [Phase.ARTERIAL, Phase.NATIVE, Phase.DELAYED])
def test_known_shift_recovered_within_one_voxel(phantom: Path, study: Study,
                                                region: np.ndarray, phase: Phase) -> None:
    truth = np.asarray(load_truth(phantom)["shift_mm"][phase.value])
    assert np.linalg.norm(truth) > 10.0  # breathing-sized: 1-2 cm
    ref, vol = study.reference, study.volumes[phase]
    al = align_to_reference(vol.array, vol.geometry, ref.array, ref.geometry,
                            fixed_mask=region, measure_residual=True)
    voxel = _voxel(ref.geometry)
    assert np.all(np.abs(np.asarray(al.shift_mm) - truth) <= voxel), (al.shift_mm, truth)
    assert al.residual_mm is not None and al.residual_mm < min(voxel), al.notes
    assert al.array.shape == ref.array.shape and al.method == "translation"


def test_rigid_with_rotation_then_deformable(phantom: Path, study: Study,
                                            region: np.ndarray) -> None:
    truth = np.asarray(load_truth(phantom)["shift_mm"]["arterial"])
    ref, vol = study.reference, study.volumes[Phase.ARTERIAL]
    al = align_to_reference(vol.array, vol.geometry, ref.array, ref.geometry,
                            fixed_mask=region, rotation=True, deformable=True,
                            measure_residual=True)
    voxel = _voxel(ref.geometry)
    assert np.all(np.abs(np.asarray(al.shift_mm) - truth) <= voxel), al.shift_mm
    assert max(abs(a) for a in al.rotation_deg) < 2.0  # the phantom moves without rotation
    assert 0.0 <= al.deformation_mm <= reg.MAX_DEFORMATION_MM
    assert any("deformable step" in n for n in al.notes), al.notes
    assert al.residual_mm is not None and al.residual_mm < min(voxel), al.notes


def _rotated(study: Study, region: np.ndarray, angles_deg: tuple[float, float, float]
             ) -> np.ndarray:
    """The reference volume with its anatomy rotated about the region's centre."""
    ref = study.reference
    img = to_sitk(ref.array, ref.geometry)
    anatomy = sitk.Euler3DTransform(_region_centre(region, img),
                                    *np.radians(angles_deg), (0.0, 0.0, 0.0))
    return sitk.GetArrayFromImage(
        sitk.Resample(img, anatomy.GetInverse(), sitk.sitkLinear, -1000.0))


@pytest.mark.parametrize("angles", [(0.0, 0.0, 3.0), (3.0, 0.0, 0.0)])  # about z, about x
def test_known_rotation_recovered_within_one_degree(
        study: Study, region: np.ndarray, angles: tuple[float, float, float]) -> None:
    ref = study.reference
    al = align_to_reference(_rotated(study, region, angles), ref.geometry, ref.array,
                            ref.geometry, fixed_mask=region, rotation=True,
                            measure_residual=True)
    assert np.all(np.abs(np.asarray(al.rotation_deg) - angles) <= 1.0), al.rotation_deg
    assert al.residual_mm is not None and al.residual_mm < min(_voxel(ref.geometry))
    assert al.method == "rigid"


def test_implausible_rotation_falls_back_to_translation(
        study: Study, region: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reg, "MAX_ROTATION_DEG", 1.0)
    ref = study.reference
    al = align_to_reference(_rotated(study, region, (0.0, 0.0, 3.0)), ref.geometry,
                            ref.array, ref.geometry, fixed_mask=region, rotation=True)
    assert al.method == "translation" and al.rotation_deg == (0.0, 0.0, 0.0)
    assert any("rejected; translation only" in n for n in al.notes), al.notes


def test_deformable_step_runs_where_rigid_leaves_a_residual(phantom: Path, study: Study,
                                                            region: np.ndarray) -> None:
    ref, vol = study.reference, study.volumes[Phase.ARTERIAL]
    centre = _region_centre(region, to_sitk(ref.array, ref.geometry)) + [30.0, 0.0, 30.0]
    deformed = _bump(vol.array, vol.geometry, centre, (3.0, 4.0, 10.0))
    al = align_to_reference(deformed, vol.geometry, ref.array, ref.geometry,
                            fixed_mask=region, **POLICY)  # type: ignore[arg-type]
    assert al.method == "rigid+deformable", al.notes
    assert al.rigid_residual_mm is not None and al.rigid_residual_mm > DEFORM_ABOVE_MM
    assert al.residual_mm is not None and al.residual_mm < al.rigid_residual_mm / 2, al.notes
    assert 0.0 < al.deformation_mm <= reg.MAX_DEFORMATION_MM


def test_deformation_stays_within_its_cap(study: Study, region: np.ndarray,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A 28 mm local motion: the bounded B-spline may follow it only up to the cap."""
    monkeypatch.setattr(reg, "MAX_DEFORMATION_MM", 3.0)
    ref, vol = study.reference, study.volumes[Phase.ARTERIAL]
    centre = _region_centre(region, to_sitk(ref.array, ref.geometry)) + [30.0, 0.0, 30.0]
    deformed = _bump(vol.array, vol.geometry, centre, (8.0, 10.0, 25.0))
    al = align_to_reference(deformed, vol.geometry, ref.array, ref.geometry,
                            fixed_mask=region, rotation=True, deformable=True)
    assert al.method == "rigid+deformable", al.notes
    assert 1.0 < al.deformation_mm <= 3.0, al.notes  # the bound is reached, not exceeded


def test_identical_inputs_give_identical_alignments(study: Study, region: np.ndarray) -> None:
    ref, vol = study.reference, study.volumes[Phase.NATIVE]
    runs = [align_to_reference(vol.array, vol.geometry, ref.array, ref.geometry,
                               fixed_mask=region, **POLICY)  # type: ignore[arg-type]
            for _ in range(2)]
    assert runs[0].shift_mm == runs[1].shift_mm
    assert runs[0].rotation_deg == runs[1].rotation_deg
    assert runs[0].residual_mm == runs[1].residual_mm
    assert np.array_equal(runs[0].array, runs[1].array)


def test_analysis_records_the_alignment_of_every_other_phase(
        phantom: Path, study: Study, analysed: AnalysisResult) -> None:
    truth = load_truth(phantom)["shift_mm"]
    voxel = _voxel(study.reference.geometry)
    others = sorted(p.value for p in study.volumes if p is not study.reference.phase)
    assert [a.phase for a in analysed.alignments] == others
    for a in analysed.alignments:
        # A rigid phantom: rigid with rotation suffices, no deformable step is needed.
        assert a.method == "rigid", a
        assert np.all(np.abs(np.asarray(a.shift_mm) - truth[a.phase]) <= voxel), a
        assert max(abs(v) for v in a.rotation_deg) < 1.0, a
        assert isinstance(a.residual_mm, float) and a.residual_mm < min(voxel), a
        assert a.deformation_mm == 0.0
        assert any(n.startswith(f"{a.phase}: shift") for n in analysed.notes)


@pytest.mark.parametrize(("spacing", "bins"), [
    ((5.0, 0.7, 0.7), (2, 2, 1)), ((2.5, 0.7, 0.7), (2, 2, 1)), ((1.25, 0.7, 0.7), (2, 2, 2)),
    ((1.0, 0.9, 0.9), (2, 2, 2)), ((0.625, 2.0, 2.0), (1, 1, 4)), ((3.0, 1.5, 1.5), (1, 1, 1))])
def test_registration_grid_is_coarse_in_plane_and_through_thin_slices(
        spacing: tuple[float, float, float], bins: tuple[int, int, int]) -> None:
    assert reg.registration_bins(spacing) == bins


def test_box_and_grid_geometry_match_itk(study: Study) -> None:
    """The reference is cropped before conversion and resampled onto by geometry alone:
    both must put every voxel where ITK's own region and reference-image paths put it."""
    ref, vol = study.reference, study.volumes[Phase.NATIVE]
    img = to_sitk(ref.array, ref.geometry)
    box = (slice(3, 20), slice(40, 150), slice(25, 170))
    sub = to_sitk(ref.array[box], reg._sub_geometry(ref.geometry, box))
    roi = sitk.RegionOfInterest(img, [145, 110, 17], [25, 40, 3])
    assert sub.GetOrigin() == roi.GetOrigin() and sub.GetSize() == roi.GetSize()
    assert np.array_equal(sitk.GetArrayViewFromImage(sub), sitk.GetArrayViewFromImage(roi))
    tx = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.01, 0.02, 0.03, (4.0, -3.0, 7.0))
    moving = to_sitk(vol.array, vol.geometry)
    expected = sitk.Resample(moving, img, tx, sitk.sitkLinear, reg.OUTSIDE_HU, sitk.sitkFloat32)
    assert np.array_equal(reg.resample(moving, ref.geometry, tx),
                          sitk.GetArrayViewFromImage(expected))


@pytest.mark.slow
def test_thin_slices_register_on_thicker_bins(tmp_path: Path) -> None:
    """1.25 mm slices are registered on ~2.5 mm bins: shifts still within one thin voxel."""
    out = generate_baseline(tmp_path / "thin", 31, size=192, n_lesions=2,
                            max_shift_mm=20.0, slice_thickness_mm=1.25)
    thin = load_study_dir(out / "dicom")
    ref = thin.reference
    assert reg.registration_bins(ref.geometry.spacing)[2] == 2
    _, liver = load_truth_labels(out)
    region = ndimage.distance_transform_edt(~liver, sampling=ref.geometry.spacing) <= 20.0
    truth = load_truth(out)["shift_mm"]
    for phase in (Phase.ARTERIAL, Phase.NATIVE):
        vol = thin.volumes[phase]
        al = align_to_reference(vol.array, vol.geometry, ref.array, ref.geometry,
                                fixed_mask=region, rotation=True, measure_residual=True)
        error = np.abs(np.asarray(al.shift_mm) - truth[phase.value])
        assert np.all(error <= _voxel(ref.geometry)), (phase, al.shift_mm)
        assert max(abs(a) for a in al.rotation_deg) < 1.0, al.rotation_deg
        assert al.residual_mm is not None and al.residual_mm < 1.25, al.notes


def test_geometry_only_keeps_the_reference_grid(study: Study) -> None:
    ref, vol = study.reference, study.volumes[Phase.NATIVE]
    al = align_to_reference(vol.array, vol.geometry, ref.array, ref.geometry,
                            estimate_shift=False)
    assert al.shift_mm == (0.0, 0.0, 0.0) and al.array.shape == ref.array.shape
    assert al.method == "geometry"
