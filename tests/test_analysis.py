"""Analysis (node.analysis): measurements, tracking, and accuracy on the synthetic phantom.

The phantom is only a test patient here: ``node.analysis`` itself never imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from node.analysis import analyze
from node.analysis.measure import measure_lesion, trace_outline
from node.analysis.results import (
    AnalysisResult,
    LesionMeasurement,
    PriorLesion,
    PriorStudy,
)
from node.analysis.tracking import assign_baseline, track
from node.study.assembly import load_study_dir
from node.study.model import Geometry

ANALYSIS_DIR = Path(__file__).resolve().parents[1] / "node" / "analysis"
FORBIDDEN = ("node.ingest", "node.archive", "node.phantom")
SEEDS = (11, 12)
MIN_DIAMETER_MM = 15.0


# --- walls ------------------------------------------------------------------------------
def test_analysis_never_imports_ingest_archive_or_phantom() -> None:
    for path in ANALYSIS_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"


# --- measurements -----------------------------------------------------------------------
def _geometry(shape: tuple[int, int, int]) -> Geometry:
    return Geometry((10.0, -5.0, 100.0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (5.0, 0.5, 0.5), shape)


def test_measure_ellipse() -> None:
    shape = (5, 80, 100)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    mask = np.zeros(shape, dtype=bool)
    mask[2] = ((yy - 40) / 10.0) ** 2 + ((xx - 50) / 20.0) ** 2 <= 1  # 20 x 10 mm semi-axes
    mask[1] = ((yy - 40) / 5.0) ** 2 + ((xx - 50) / 5.0) ** 2 <= 1
    m = measure_lesion(mask, _geometry(shape), 3, {"portal_venous": mask * 100.0})
    assert m.key_slice == 2 and m.label == 3
    assert m.longest_diameter_mm == pytest.approx(20.5, abs=0.6)
    assert m.short_axis_mm == pytest.approx(10.5, abs=0.6)
    assert m.area_mm2 == pytest.approx(np.pi * 10 * 5, rel=0.03)
    assert m.volume_ml == pytest.approx(mask.sum() * 5 * 0.25 / 1000)
    assert m.outline_ij[0] == m.outline_ij[-1] and len(m.outline_ij) <= 100
    (c0, r0), (c1, r1) = m.long_axis_ij
    assert r0 == pytest.approx(r1, abs=0.6)  # horizontal long axis, in (column, row)
    assert abs(c1 - c0) == pytest.approx(41, abs=1.0)
    assert m.mean_hu["portal_venous"] == 100.0
    x, y, z = m.centroid_xyz
    assert z == pytest.approx(100.0 + 5.0 * mask.sum(axis=(1, 2)) @ np.arange(5) / mask.sum())
    assert x == pytest.approx(10.0 + 0.5 * 50, abs=0.01) and y == pytest.approx(-5 + 20, abs=0.01)


def test_outline_is_scoord_corner_based() -> None:
    plane = np.zeros((5, 5), dtype=bool)
    plane[1:3, 2:4] = True  # rows 1-2, columns 2-3: pixel corners span columns 2..4, rows 1..3
    pts = trace_outline(plane)
    assert tuple(pts[0]) == tuple(pts[-1])
    assert pts[:, 0].min() == 2.0 and pts[:, 0].max() == 4.0
    assert pts[:, 1].min() == 1.0 and pts[:, 1].max() == 3.0


# --- tracking ---------------------------------------------------------------------------
def _les(volume: float, xyz: tuple[float, float, float]) -> LesionMeasurement:
    return LesionMeasurement(
        label=1, tracking_id="", tracking_uid="", volume_ml=volume, longest_diameter_mm=20.0,
        short_axis_mm=15.0, key_slice=0, long_axis_ij=((0, 0), (1, 0)),
        short_axis_ij=((0, 0), (0, 1)), outline_ij=[(0, 0), (1, 0), (0, 1), (0, 0)],
        area_mm2=1.0, centroid_xyz=xyz)


def test_baseline_ids_by_volume_and_deterministic() -> None:
    a, b = _les(2.0, (0, 0, 0)), _les(5.0, (50, 0, 0))
    assign_baseline([a, b], "1.2.3")
    assert (b.tracking_id, a.tracking_id) == ("Lesion 1", "Lesion 2")
    uid = b.tracking_uid
    c, d = _les(2.0, (0, 0, 0)), _les(5.0, (50, 0, 0))
    assign_baseline([c, d], "1.2.3")
    assert d.tracking_uid == uid and uid.startswith("2.25.")


def test_tracking_removes_liver_shift_and_numbers_new_lesions() -> None:
    prior = PriorStudy("1.2.1", "20240101", [
        PriorLesion("Lesion 1", "2.25.1", 8.0, 25.0, (0.0, 0.0, 0.0)),
        PriorLesion("Lesion 2", "2.25.2", 3.0, 18.0, (30.0, 0.0, 0.0)),
        PriorLesion("Lesion 3", "2.25.3", 1.0, 12.0, (0.0, 60.0, 0.0)),
    ], liver_centroid_xyz=(0.0, 0.0, 0.0))
    shift = np.array([12.0, -9.0, 15.0])  # the whole patient moved
    cur = [_les(6.0, tuple(shift + (1.0, 0.0, 0.0))), _les(4.0, tuple(shift + (31, 2, 0))),
           _les(0.5, tuple(shift + (-60.0, 0.0, 0.0)))]
    out = track(cur, prior, "1.2.9", tuple(shift))
    assert [c.tracking_id for c in cur] == ["Lesion 1", "Lesion 2", "Lesion 4"]
    assert cur[0].tracking_uid == "2.25.1" and cur[0].prior_volume_ml == 8.0
    assert cur[2].is_new and not cur[0].is_new
    assert out.vanished == ["Lesion 3"]


# --- the phantom ------------------------------------------------------------------------
phantom = pytest.importorskip("node.phantom")


def _truth_match(result: AnalysisResult, labels: np.ndarray, label: int) -> int | None:
    """The detected label that overlaps truth label ``label`` most (None: missed)."""
    hits = result.lesion_labels[labels == label]
    hits = hits[hits > 0]
    return int(np.bincount(hits).argmax()) if hits.size else None


@pytest.fixture(scope="module", params=SEEDS)
def baseline(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, AnalysisResult]:
    out = tmp_path_factory.mktemp(f"baseline{request.param}")
    phantom.generate_baseline(out, request.param, size=256, n_lesions=3,
                              lesion_diameter_mm=(MIN_DIAMETER_MM, 40.0))
    return out, analyze(load_study_dir(out / "dicom"))


@pytest.mark.slow
def test_phantom_liver_and_lesions(baseline: tuple[Path, AnalysisResult]) -> None:
    out, result = baseline
    truth = phantom.load_truth(out)
    lesion_labels, liver = phantom.load_truth_labels(out)
    dice = 2 * (result.liver_mask & liver).sum() / (result.liver_mask.sum() + liver.sum())
    assert dice >= 0.9
    found = set()
    for t in truth["lesions"]:
        hit = _truth_match(result, lesion_labels, t["label"])
        assert hit is not None, f"{t['truth_id']} ({t['diameter_mm']:.0f} mm) missed"
        found.add(hit)
        if t["diameter_mm"] >= 20.0:
            got = next(les for les in result.lesions if les.label == hit).volume_ml
            assert got == pytest.approx(t["volume_ml"], rel=0.10), t["truth_id"]
    false_positives = [les for les in result.lesions if les.label not in found]
    assert not false_positives
    assert [les.tracking_id for les in result.lesions] == [
        f"Lesion {n}" for n in range(1, len(result.lesions) + 1)]


@pytest.mark.slow
def test_phantom_follow_up_tracking(baseline: tuple[Path, AnalysisResult],
                                    tmp_path: Path) -> None:
    base_dir, base = baseline
    base_truth = phantom.load_truth(base_dir)
    base_labels, _ = phantom.load_truth_labels(base_dir)
    by_truth = {t["truth_id"]: _truth_match(base, base_labels, t["label"])
                for t in base_truth["lesions"]}
    tracking_of = {les.label: les.tracking_id for les in base.lesions}
    prior = PriorStudy(
        base.study_instance_uid, "20260105",
        [PriorLesion(les.tracking_id, les.tracking_uid, les.volume_ml,
                     les.longest_diameter_mm, les.centroid_xyz) for les in base.lesions],
        liver_centroid_xyz=base.liver_centroid_xyz)
    fu_dir = phantom.generate_follow_up(base_dir, tmp_path / "fu", 5, new_lesions=0)
    fu = analyze(load_study_dir(fu_dir / "dicom"), prior)
    fu_truth = phantom.load_truth(fu_dir)
    fu_labels, _ = phantom.load_truth_labels(fu_dir)
    assert fu.response is not None
    for t in fu_truth["lesions"]:
        if t["status"] != "present" or t["diameter_mm"] < 10.0:
            continue
        hit = _truth_match(fu, fu_labels, t["label"])
        assert hit is not None, f"{t['truth_id']} missed at follow-up"
        les = next(m for m in fu.lesions if m.label == hit)
        assert les.tracking_id == tracking_of[by_truth[t["truth_id"]]]
        assert not les.is_new and les.prior_volume_ml is not None
