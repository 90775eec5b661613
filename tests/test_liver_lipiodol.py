"""Dense deposits (lipiodol after TACE) at the liver's edge and inside it belong to the liver;
a rib-like dense structure next to the liver, and the blood pool, do not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from node.analysis import liver as L
from node.analysis.liver_dense import include_deposits
from node.analysis.run import with_deposits
from node.phantom import generate_baseline
from node.phantom.truth import load_truth_labels
from node.study.assembly import load_study_dir
from node.study.model import Geometry, Phase


def _ball(shape: tuple[int, ...], spacing: tuple[float, ...], centre: np.ndarray,
          r: float) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    d2 = sum(((grid[a] - centre[a]) * spacing[a]) ** 2 for a in range(3))
    return np.asarray(d2 <= r * r)


@pytest.fixture(scope="module")
def painted(tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[dict[Phase, np.ndarray], Geometry, dict[str, np.ndarray]]:
    """A phantom (phases aligned) with lipiodol painted at the liver's lateral edge and deep
    inside, and a rib-like dense arc outside the liver, 3-9 mm from its surface."""
    out = generate_baseline(tmp_path_factory.mktemp("lip") / "p", 21, size=192, n_lesions=0,
                            max_shift_mm=0.0)
    study = load_study_dir(out / "dicom")
    _, liver = load_truth_labels(out)
    geometry = study.reference.geometry
    phases = {p: v.array.astype(np.float32).copy() for p, v in study.volumes.items()}
    spacing = geometry.spacing
    inner = ndimage.distance_transform_edt(liver, sampling=spacing)
    outer = ndimage.distance_transform_edt(~liver, sampling=spacing)
    k = int(np.argmax(liver.sum(axis=(1, 2))))  # the liver's largest slice
    rows, cols = np.nonzero(liver[k])
    # The patient's right (image left here, smallest column): the lateral surface.
    # The deposit's centre 3 mm inside the surface: it reaches 3 mm beyond it.
    edge_rc = (float(np.median(rows[cols == cols.min()])), cols.min() + 3.0 / spacing[2])
    edge = _ball(liver.shape, spacing, np.array([k, *edge_rc]), 6.0)
    deep = _ball(liver.shape, spacing, np.array(np.unravel_index(np.argmax(inner), liver.shape),
                                                float), 6.0)
    # Rib: an arc along the liver's posterior surface (away from the deposit), same slices.
    rr, cc = np.indices(liver.shape[1:])
    centre_r, centre_c = rows.mean(), cols.mean()
    angle = np.degrees(np.arctan2(rr - centre_r, cc - centre_c))
    arc = (outer[k] >= 3.0) & (outer[k] <= 9.0) & (np.abs(angle - 110.0) < 20.0)
    rib = np.zeros_like(liver)
    rib[k - 1:k + 2] = arc
    for a in phases.values():
        a[edge] = 900.0
        a[deep] = 700.0
        a[rib] = 800.0
    return phases, geometry, {"edge": edge, "deep": deep, "rib": rib, "liver": liver}


def test_deposits_at_the_edge_and_inside_are_liver_not_the_rib(painted: tuple) -> None:
    phases, geometry, m = painted
    seg = L.segment_liver(phases[Phase.PORTAL_VENOUS], geometry)
    assert m["edge"].sum() > 10 and m["rib"].sum() > 20
    # The window cuts the edge deposit out of the mask: the step below must bring it back.
    assert (m["edge"] & ~seg.mask).sum() > 0.3 * m["edge"].sum()
    out = include_deposits(seg, phases[Phase.PORTAL_VENOUS], phases[Phase.NATIVE], geometry)
    assert out.envelope is not None
    inside_edge = m["edge"] & m["liver"]  # the part of the deposit inside the liver
    assert (out.mask & inside_edge).sum() >= 0.95 * inside_edge.sum()
    assert (out.mask & m["deep"]).sum() >= 0.95 * m["deep"].sum()
    assert not (out.envelope & m["rib"]).any()
    assert (out.mask & ~seg.mask & ~m["liver"]).sum() <= m["edge"].sum()  # nothing else


def test_contrast_without_native_density_is_not_a_deposit(painted: tuple) -> None:
    """The same deposits dense only with contrast (blood pool, kidney): not added."""
    phases, geometry, m = painted
    native = phases[Phase.NATIVE].copy()
    native[m["edge"] | m["deep"]] = 40.0
    seg = L.segment_liver(phases[Phase.PORTAL_VENOUS], geometry)
    out = include_deposits(seg, phases[Phase.PORTAL_VENOUS], native, geometry)
    assert not (out.mask & ~seg.mask & m["edge"]).any()


def test_no_native_phase_no_change_and_a_note(painted: tuple) -> None:
    phases, geometry, _ = painted
    seg = L.segment_liver(phases[Phase.PORTAL_VENOUS], geometry)
    notes: list[str] = []
    without = {p: a for p, a in phases.items() if p is not Phase.NATIVE}
    assert with_deposits(seg, phases[Phase.PORTAL_VENOUS], geometry, without, notes) is seg
    assert not notes
    with_deposits(seg, phases[Phase.PORTAL_VENOUS], geometry, phases, notes)
    assert notes and notes[0].startswith("dense deposits included")


def test_no_dense_voxels_leaves_the_liver_alone(tmp_path: Path) -> None:
    out = generate_baseline(tmp_path / "p", 22, size=96, n_lesions=1, max_shift_mm=0.0)
    study = load_study_dir(out / "dicom")
    ref = study.reference
    seg = L.segment_liver(ref.array, ref.geometry)
    grown = include_deposits(seg, ref.array, study.volumes[Phase.NATIVE].array, ref.geometry)
    assert np.array_equal(grown.mask, seg.mask)
