"""Volumetric response of liver metastases: the five-grade rule of the source study.

The source defines overlapping ranges (25 % belongs to both MR and SD, ...). The node's one
unambiguous rule, with ``change = (current - prior) / prior`` of the TOTAL metastasis volume:

=====  ===========================================================
CR     current total == 0 and prior total > 0 (all lesions gone)
PR     change <= -50 %
MR     -50 % < change <= -25 %
SD     -25 % < change < +25 %
PD     change >= +25 %
=====  ===========================================================

A prior total of 0 (no measurable disease before): PD if any volume now, else SD; the change
fraction is then reported as +inf (new disease) or 0.0. Boundaries are compared on the change
rounded to 12 decimals, so that e.g. 7.5 ml -> 10 ml is exactly +25 % despite float error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from node.analysis.results import (
    LesionMeasurement,
    PriorStudy,
    ResponseAssessment,
    VolumetricResponse,
)

#: (upper bound of the change fraction, inclusive?, category), checked in order after CR.
RESPONSE_TABLE: tuple[tuple[float, bool, VolumetricResponse], ...] = (
    (-0.50, True, VolumetricResponse.PR),
    (-0.25, True, VolumetricResponse.MR),
    (0.25, False, VolumetricResponse.SD),
    (math.inf, True, VolumetricResponse.PD),
)
_DECIMALS = 12


def change_fraction(prior_total_ml: float, current_total_ml: float) -> float:
    """(current - prior) / prior; +inf for new disease, 0.0 when both are zero."""
    _check(prior_total_ml, current_total_ml)
    if prior_total_ml == 0:
        return math.inf if current_total_ml > 0 else 0.0
    return (current_total_ml - prior_total_ml) / prior_total_ml


def classify_volumetric(prior_total_ml: float, current_total_ml: float) -> VolumetricResponse:
    """Classify the change of total metastasis volume (see the module docstring for the rule).

    Raises
    ------
    ValueError
        If a volume is negative or not finite.
    """
    _check(prior_total_ml, current_total_ml)
    if prior_total_ml == 0:
        return VolumetricResponse.PD if current_total_ml > 0 else VolumetricResponse.SD
    if current_total_ml == 0:
        return VolumetricResponse.CR
    change = round(change_fraction(prior_total_ml, current_total_ml), _DECIMALS)
    for bound, inclusive, category in RESPONSE_TABLE:
        if change < bound or (inclusive and change == bound):
            return category
    return VolumetricResponse.PD  # pragma: no cover - the table ends with +inf


def assess_response(
    prior: PriorStudy, lesions: Sequence[LesionMeasurement]
) -> ResponseAssessment:
    """Compare the current lesions (new ones included) with the prior study's lesions.

    A prior lesion counts as vanished when no current lesion carries its tracking UID.
    """
    prior_total = float(sum(p.volume_ml for p in prior.lesions))
    current_total = float(sum(les.volume_ml for les in lesions))
    current_uids = {les.tracking_uid for les in lesions}
    vanished = [p.tracking_id for p in prior.lesions if p.tracking_uid not in current_uids]
    if prior_total > 0 and current_total == 0:
        change = -1.0
    else:
        change = change_fraction(prior_total, current_total)
    return ResponseAssessment(
        prior_study_instance_uid=prior.study_instance_uid,
        prior_total_volume_ml=prior_total,
        current_total_volume_ml=current_total,
        change_fraction=change,
        category=classify_volumetric(prior_total, current_total),
        new_lesions=sum(1 for les in lesions if les.is_new),
        vanished_lesions=vanished,
    )


def _check(prior_total_ml: float, current_total_ml: float) -> None:
    for name, value in (("prior_total_ml", prior_total_ml),
                        ("current_total_ml", current_total_ml)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite volume >= 0, got {value!r}")
