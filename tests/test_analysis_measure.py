"""Lesion characterisation (node.analysis.enhancement) and the segmentation backend interface."""

from __future__ import annotations

import numpy as np
import pytest

from node.analysis.enhancement import characterise, largest_diameter_3d, phase_context
from node.analysis.measure import measure_lesion
from node.analysis.segment import DEFAULT_BACKEND, ClassicalBackend, SegmentationBackend
from node.study.model import Geometry

LIVER = {"native": 55.0, "arterial": 75.0, "portal_venous": 110.0, "delayed": 90.0}
VIABLE = {"native": 40.0, "arterial": 160.0, "portal_venous": 115.0, "delayed": 60.0}
NECROSIS = {"native": 20.0, "arterial": 22.0, "portal_venous": 23.0, "delayed": 22.0}
LIPIODOL = {"native": 600.0, "arterial": 610.0, "portal_venous": 605.0, "delayed": 600.0}


def _geometry(shape: tuple[int, int, int]) -> Geometry:
    return Geometry((0.0, 0.0, 0.0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (2.0, 1.0, 1.0), shape)


def _study() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, Geometry]:
    """A 40 mm ball: viable shell, necrotic part, lipiodol core, in noisy liver."""
    shape = (40, 100, 100)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
    r = np.sqrt(((zz - 20) * 2.0) ** 2 + (yy - 50) ** 2 + (xx - 50) ** 2)
    lesion = r <= 20.0
    lip = np.sqrt(((zz - 20) * 2.0) ** 2 + (yy - 50) ** 2 + (xx - 42) ** 2) <= 6.0
    nec = (np.sqrt(((zz - 20) * 2.0) ** 2 + (yy - 50) ** 2 + (xx - 60) ** 2) <= 7.0) & ~lip
    rng = np.random.default_rng(0)
    arrays = {}
    for phase, hu in LIVER.items():
        a = np.full(shape, hu, dtype=np.float32)
        a[lesion] = VIABLE[phase]
        a[nec] = NECROSIS[phase]
        a[lip] = LIPIODOL[phase]
        arrays[phase] = a + rng.normal(0.0, 10.0, shape).astype(np.float32)
    return arrays, lesion, lip, _geometry(shape)


def test_characterise_viable_necrotic_lipiodol() -> None:
    arrays, lesion, lip, geom = _study()
    m = measure_lesion(lesion, geom, 1, arrays)
    characterise(m, lesion, phase_context(arrays, ~lesion, geom), geom)
    vox = geom.voxel_volume_ml
    assert m.largest_diameter_3d_mm == pytest.approx(41.0, abs=2.0)
    assert m.lipiodol_volume_ml == pytest.approx(lip.sum() * vox, rel=0.3)
    nec_true = 4 / 3 * np.pi * 7.0**3 / 1000.0
    assert m.necrotic_volume_ml == pytest.approx(nec_true, rel=0.4)
    total = m.enhancing_volume_ml + m.necrotic_volume_ml + m.lipiodol_volume_ml  # type: ignore
    assert total == pytest.approx(lesion.sum() * vox)
    # Lipiodol is dense on the plain scan too: its voxels never count as enhancing.
    assert m.enhancing_volume_ml < (lesion.sum() - lip.sum()) * vox  # type: ignore[operator]
    assert m.size_pattern == "necrotic"
    assert m.phase_behaviour == {"arterial": "hyper", "portal_venous": "iso",
                                 "delayed": "hypo"}
    assert set(m.sd_hu) == set(arrays)
    assert m.enhancement_vs_native_hu["arterial"] > 50.0
    assert m.enhancement_vs_liver_hu["arterial"] > 30.0
    assert "native" not in m.enhancement_vs_native_hu


def test_characterise_without_plain_scan() -> None:
    arrays, lesion, _, geom = _study()
    del arrays["native"]
    m = measure_lesion(lesion, geom, 1, arrays)
    characterise(m, lesion, phase_context(arrays, ~lesion, geom), geom)
    assert m.enhancement_vs_native_hu == {}
    assert m.lipiodol_volume_ml and m.lipiodol_volume_ml > 0  # dense in every phase present
    assert m.phase_behaviour["arterial"] == "hyper"


def test_size_patterns_and_3d_diameter() -> None:
    shape = (10, 60, 60)
    geom = _geometry(shape)
    mask = np.zeros(shape, dtype=bool)
    mask[4:7, 25:35, 20:35] = True  # 15 x 10 mm in plane, 6 mm deep
    arrays = {"portal_venous": np.where(mask, 50.0, 110.0).astype(np.float32)}
    m = measure_lesion(mask, geom, 1, arrays)
    characterise(m, mask, phase_context(arrays, ~mask, geom), geom)
    assert m.size_pattern == "homogeneous"
    assert largest_diameter_3d(mask, geom) == pytest.approx(
        np.sqrt(14**2 + 9**2 + 4**2) + 1.0, abs=0.01)
    assert m.phase_behaviour == {"portal_venous": "hypo"}


def test_default_backend_is_classical() -> None:
    assert isinstance(DEFAULT_BACKEND, ClassicalBackend)
    assert isinstance(DEFAULT_BACKEND, SegmentationBackend)
    assert DEFAULT_BACKEND.name and DEFAULT_BACKEND.version
