"""The volumetric response rule (node.analysis.response) at every boundary."""

from __future__ import annotations

import math

import pytest

from node.analysis.response import assess_response, change_fraction, classify_volumetric
from node.analysis.results import LesionMeasurement, PriorLesion, PriorStudy
from node.analysis.results import VolumetricResponse as R


@pytest.mark.parametrize(
    ("prior", "current", "expected"),
    [
        (10.0, 0.0, R.CR),  # all gone
        (10.0, 1e-9, R.PR),  # a trace left is not CR
        (10.0, 4.0, R.PR),  # -60 %
        (10.0, 5.0, R.PR),  # exactly -50 %: PR
        (10.0, 5.0001, R.MR),  # just above -50 %
        (10.0, 7.0, R.MR),  # -30 %
        (10.0, 7.5, R.MR),  # exactly -25 %: MR
        (10.0, 7.5001, R.SD),  # just above -25 %
        (10.0, 10.0, R.SD),  # unchanged
        (10.0, 12.4999, R.SD),  # just below +25 %
        (10.0, 12.5, R.PD),  # exactly +25 %: PD
        (10.0, 30.0, R.PD),
        (7.5, 9.375, R.PD),  # exactly +25 %
        (0.0, 0.0, R.SD),  # no disease before or now
        (0.0, 0.3, R.PD),  # new disease
    ],
)
def test_boundaries(prior: float, current: float, expected: R) -> None:
    assert classify_volumetric(prior, current) is expected


def test_float_boundaries_are_exact() -> None:
    # 0.1 + 0.2 style errors must not move a value across a boundary.
    assert classify_volumetric(0.3, 0.15) is R.PR  # -50 %
    assert classify_volumetric(0.7, 0.525) is R.MR  # -25 %
    assert classify_volumetric(0.7, 0.875) is R.PD  # +25 %


@pytest.mark.parametrize("bad", [(-1.0, 1.0), (1.0, -0.1), (math.nan, 1.0), (1.0, math.inf)])
def test_invalid_volumes(bad: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="_total_ml"):
        classify_volumetric(*bad)


def test_change_fraction() -> None:
    assert change_fraction(10.0, 5.0) == -0.5
    assert change_fraction(0.0, 1.0) == math.inf
    assert change_fraction(0.0, 0.0) == 0.0


def _lesion(uid: str, volume: float, new: bool = False) -> LesionMeasurement:
    return LesionMeasurement(
        label=1, tracking_id=uid, tracking_uid=uid, volume_ml=volume, longest_diameter_mm=1.0,
        short_axis_mm=1.0, key_slice=0, long_axis_ij=((0, 0), (1, 0)),
        short_axis_ij=((0, 0), (0, 1)), outline_ij=[(0, 0), (1, 0), (0, 1), (0, 0)],
        area_mm2=1.0, centroid_xyz=(0.0, 0.0, 0.0), is_new=new)


def test_assess_response_counts_new_lesions_and_vanished() -> None:
    prior = PriorStudy("1.2.3", "20240101",
                       [PriorLesion("A", "A", 6.0), PriorLesion("B", "B", 4.0)])
    result = assess_response(prior, [_lesion("A", 4.0), _lesion("N", 1.0, new=True)])
    assert result.prior_total_volume_ml == 10.0
    assert result.current_total_volume_ml == 5.0
    assert result.change_fraction == -0.5
    assert result.category is R.PR
    assert result.new_lesions == 1
    assert result.vanished_lesions == ["B"]


def test_assess_response_complete_response() -> None:
    prior = PriorStudy("1.2.3", "20240101", [PriorLesion("A", "A", 6.0)])
    result = assess_response(prior, [])
    assert result.category is R.CR
    assert result.change_fraction == -1.0
    assert result.vanished_lesions == ["A"]
