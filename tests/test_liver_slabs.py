"""Thin slices: the liver is segmented on slabs of about 2.5 mm, then mapped back per slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.analysis import liver as L
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
