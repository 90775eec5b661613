"""Alignment of the phases onto the portal venous volume (node.analysis.register).

The phantom displaces each phase's anatomy rigidly by a known ``shift_mm`` (truth.json)
relative to the portal venous phase; the registration must recover it within one voxel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from node.analysis.register import align_to_reference
from node.phantom import generate_baseline, load_truth, load_truth_labels
from node.study.assembly import load_study_dir
from node.study.model import Phase, Study


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four phases, 192 x 192 (about 2 mm pixels), 5 mm slices, shifts up to 8 mm."""
    return generate_baseline(tmp_path_factory.mktemp("register") / "study", 31, size=192,
                             n_lesions=2, max_shift_mm=8.0)


@pytest.fixture(scope="module")
def study(phantom: Path) -> Study:
    return load_study_dir(phantom / "dicom")


@pytest.fixture(scope="module")
def region(phantom: Path, study: Study) -> np.ndarray:
    """The true liver dilated by 20 mm, on the portal venous grid."""
    _, liver = load_truth_labels(phantom)
    geom = study.reference.geometry
    return np.asarray(ndimage.distance_transform_edt(~liver, sampling=geom.spacing) <= 20.0)


@pytest.mark.parametrize("phase", [Phase.ARTERIAL, Phase.NATIVE, Phase.DELAYED])
def test_known_shift_recovered_within_one_voxel(phantom: Path, study: Study,
                                                region: np.ndarray, phase: Phase) -> None:
    truth = np.asarray(load_truth(phantom)["shift_mm"][phase.value])
    ref, vol = study.reference, study.volumes[phase]
    al = align_to_reference(vol.array, vol.geometry, ref.array, ref.geometry,
                            fixed_mask=region, measure_residual=True)
    dz, dy, dx = ref.geometry.spacing
    voxel = np.array([dx, dy, dz])
    assert np.all(np.abs(np.asarray(al.shift_mm) - truth) <= voxel), (al.shift_mm, truth)
    assert al.residual_mm is not None and al.residual_mm < min(voxel), al.notes
    assert al.array.shape == ref.array.shape


def test_rigid_with_rotation_then_deformable(phantom: Path, study: Study,
                                            region: np.ndarray) -> None:
    truth = np.asarray(load_truth(phantom)["shift_mm"]["arterial"])
    ref, vol = study.reference, study.volumes[Phase.ARTERIAL]
    al = align_to_reference(vol.array, vol.geometry, ref.array, ref.geometry,
                            fixed_mask=region, rotation=True, deformable=True,
                            measure_residual=True)
    dz, dy, dx = ref.geometry.spacing
    assert np.all(np.abs(np.asarray(al.shift_mm) - truth) <= [dx, dy, dz]), al.shift_mm
    assert max(abs(a) for a in al.rotation_deg) < 2.0  # the phantom moves without rotation
    assert 0.0 <= al.deformation_mm <= 10.0
    assert any("deformable step" in n for n in al.notes), al.notes
    assert al.residual_mm is not None and al.residual_mm < min(dx, dy, dz), al.notes


def test_geometry_only_keeps_the_reference_grid(study: Study) -> None:
    ref, vol = study.reference, study.volumes[Phase.NATIVE]
    al = align_to_reference(vol.array, vol.geometry, ref.array, ref.geometry,
                            estimate_shift=False)
    assert al.shift_mm == (0.0, 0.0, 0.0) and al.array.shape == ref.array.shape
