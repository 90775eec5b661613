"""Thin slices: the liver is segmented on slabs of about 2.5 mm, then mapped back per slice;
and the steps that work on the liver's box instead of the whole volume (thin-slice volumes are
large) give exactly what the whole volume gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from node.analysis import liver as L
from node.analysis import run
from node.analysis.enhancement import phase_context
from node.phantom import generate_baseline
from node.phantom.truth import load_truth_labels
from node.study.assembly import load_study_dir
from node.study.model import Geometry


@pytest.mark.parametrize(("dz", "factor"), [(5.0, 1), (3.0, 1), (2.5, 1), (1.25, 2),
                                             (1.0, 2), (0.625, 4)])
def test_slab_factor(dz: float, factor: int) -> None:
    g = Geometry((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0),
                 (dz, 0.8, 0.8), (10, 8, 8))
    assert L.slab_factor(g) == factor


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_thin_slices_segmented_in_slabs_match_truth(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = generate_baseline(tmp_path / "thin", 11, size=128, slice_thickness_mm=1.25,
                            n_lesions=2)
    ref = load_study_dir(out / "dicom").reference
    _, truth = load_truth_labels(out)
    slabs = L.segment_liver(ref.array, ref.geometry)
    assert slabs.mask.shape == slabs.envelope.shape == truth.shape  # type: ignore[union-attr]
    assert _dice(slabs.envelope, truth) > 0.95  # type: ignore[arg-type]
    monkeypatch.setitem(L.PARAMS, "slab_mm", 0.0)  # every slice on its own, for comparison
    full = L.segment_liver(ref.array, ref.geometry)
    assert _dice(slabs.envelope, full.envelope) > 0.97  # type: ignore[arg-type]
    assert abs(slabs.median_hu - full.median_hu) < 5.0


# The steps below work on the liver's box, or on all slices at once, instead of the whole
# volume slice by slice; each must give exactly what the whole-volume computation gives.

def _blobs(seed: int, shape: tuple[int, int, int], level: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.asarray(ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > level)


def _geometry(spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> Geometry:
    return Geometry((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0),
                    spacing, shape)


@pytest.mark.parametrize("seed", range(3))
def test_fill_holes_matches_scipy(seed: int) -> None:
    mask = _blobs(seed, (8, 40, 50), level=-0.1 * seed)
    mask[2:7, 5:15, 5:15] = True
    mask[3:6, 8:12, 8:12] = False  # a closed cavity: a hole in 3D as well
    filled = ndimage.binary_fill_holes(mask)
    assert filled[4, 10, 10] and np.array_equal(L.fill_holes(mask), filled)
    per_slice = np.stack([ndimage.binary_fill_holes(m) for m in mask])
    assert (per_slice & ~filled).any()  # holes open through the slices: per slice only
    assert np.array_equal(L.fill_holes(mask, per_slice=True), per_slice)


@pytest.mark.parametrize("spacing", [(1.25, 0.7, 0.7), (2.5, 0.8, 0.6), (1.0, 1.1, 1.1),
                                     (5.0, 0.7, 0.7)])
def test_distance_through_slices_matches_3d_transform(spacing: tuple[float, float, float]
                                                      ) -> None:
    window = _blobs(1, (20, 50, 60), level=-0.1)
    geometry = _geometry(spacing, window.shape)  # type: ignore[arg-type]
    dist = L.edt_slices(window, geometry)
    for r in (2.5, 4.0, 6.0):
        expected = ndimage.distance_transform_edt(window, sampling=spacing) > r
        assert np.array_equal(L._farther_than(dist, spacing[0], r), expected), r


def test_box_steps_match_the_whole_volume() -> None:
    rng = np.random.default_rng(5)
    shape = (12, 60, 70)
    geometry = _geometry((2.5, 0.7, 0.7), shape)
    array = rng.normal(80.0, 30.0, shape).astype(np.float32)
    liver = np.zeros(shape, dtype=bool)
    liver[3:9, 20:40, 25:50] = True
    box = ndimage.find_objects(liver.view(np.uint8))[0]
    whole = L.smooth_inplane(array, geometry, 1.5)
    assert np.array_equal(L.smooth_inplane(array, geometry, 1.5, box), whole[box])
    edge = (slice(0, 12), slice(0, 5), slice(60, 70))  # the kernel reaches past the volume
    assert np.array_equal(L.smooth_inplane(array, geometry, 1.5, edge), whole[edge])
    assert np.array_equal(L.blood_pool(array, liver, geometry, box),
                          L.blood_pool(array, liver, geometry)[box])


def test_border_refinement_on_the_box_matches_the_whole_volume() -> None:
    rng = np.random.default_rng(6)
    shape = (10, 50, 60)
    geometry = _geometry((2.5, 0.8, 0.8), shape)
    sm = rng.normal(60.0, 40.0, shape).astype(np.float32)
    body = np.ones(shape, dtype=bool)
    body[:, :, :4] = False
    mask = np.zeros(shape, dtype=bool)
    mask[3:7, 15:35, 2:40] = True  # reaches the edge of the body
    # The whole-volume rule, as documented in refine_border.
    size = (1, 2 * int(np.ceil(4.0 / 0.8)) + 1, 2 * int(np.ceil(4.0 / 0.8)) + 1)
    outside = ndimage.minimum_filter(np.where(body, sm, np.float32(60.0)), size=size)
    thr = (60.0 + np.maximum(outside, L.PARAMS["border_floor_hu"])) / 2.0
    expected = mask.copy()
    for _ in range(int(L.PARAMS["border_rings"])):
        shell = ndimage.binary_dilation(expected, ndimage.generate_binary_structure(3, 1))
        expected |= shell & ~expected & body & (sm >= thr) & (sm <= 90.0)
    refined = L.refine_border(mask, sm, body, geometry, 60.0, 90.0)
    assert np.array_equal(refined, expected) and refined.sum() > mask.sum()


def test_dilation_on_the_box_matches_the_whole_volume() -> None:
    mask = np.zeros((40, 60, 70), dtype=bool)
    mask[30:36, 5:20, 40:55] = True
    geometry = _geometry((1.25, 0.8, 0.7), mask.shape)  # type: ignore[arg-type]
    expected = ndimage.distance_transform_edt(~mask, sampling=geometry.spacing) <= 20.0
    assert np.array_equal(run._dilate_mm(mask, geometry, 20.0), expected)


def test_phase_context_on_the_liver_box_matches_the_whole_volume() -> None:
    rng = np.random.default_rng(7)
    shape = (10, 60, 70)
    geometry = _geometry((2.5, 0.7, 0.7), shape)
    arrays = {p: rng.normal(mu, 15.0, shape).astype(np.float32)
              for p, mu in (("native", 50.0), ("arterial", 80.0), ("portal_venous", 110.0))}
    parenchyma = np.zeros(shape, dtype=bool)
    parenchyma[2:8, 10:40, 20:50] = True
    lesion = np.zeros(shape, dtype=bool)
    lesion[4:6, 38:45, 45:52] = True  # reaches beyond the parenchyma's box
    whole, boxed = (phase_context(arrays, parenchyma & ~lesion, geometry, region)
                    for region in (None, lesion))
    assert boxed.liver_median == whole.liver_median and boxed.liver_sd == whole.liver_sd
    assert boxed.diff_sd == whole.diff_sd
    for k, a in whole.smoothed.items():
        assert np.array_equal(boxed.smoothed[k][parenchyma | lesion], a[parenchyma | lesion])
        assert np.isnan(boxed.smoothed[k][0, 0, 0])  # outside the box: not computed
