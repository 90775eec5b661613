"""Lesion identity over time: tracking ids and tracking UIDs (TID 1500 Tracking Identifier).

Baseline: lesions are numbered "Lesion 1", "Lesion 2", ... by decreasing volume, with UIDs
derived from the study UID and that index (deterministic, PS3.5 B.2 via ``derive_uid``).
Follow-up: current lesions are matched to the prior ones by centroid distance after removing
the shift of the liver centroid between the studies (globally optimal one-to-one assignment,
Hungarian method); a match keeps the prior tracking id and UID.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from node.analysis.results import LesionMeasurement, PriorStudy
from node.dicom.uids import derive_uid

#: Matching rule: the largest allowed distance (mm) is max(MIN_MATCH_MM, factor x prior diameter).
MIN_MATCH_MM = 15.0
MATCH_DIAMETER_FACTOR = 1.0
TRACKING_ID_FORMAT = "Lesion {}"
_ID_NUMBER = re.compile(r"(\d+)\s*$")


@dataclass(frozen=True)
class TrackingOutcome:
    """Which prior lesions were matched, and which vanished."""

    matched: dict[str, str]  # current tracking UID -> prior tracking id
    vanished: list[str]  # prior tracking ids without a current lesion


def order_by_volume(lesions: Sequence[LesionMeasurement]) -> list[LesionMeasurement]:
    """Largest first; ties by centroid (deterministic)."""
    return sorted(lesions, key=lambda les: (-round(les.volume_ml, 6), les.centroid_xyz))


def assign_baseline(lesions: Sequence[LesionMeasurement], study_uid: str) -> None:
    """Give every lesion a new tracking id and UID, numbered by decreasing volume."""
    for n, les in enumerate(order_by_volume(lesions), start=1):
        les.tracking_id = TRACKING_ID_FORMAT.format(n)
        les.tracking_uid = derive_uid(study_uid, "lesion", str(n))
        les.is_new = False
        les.prior_volume_ml = None


def match_distance_limit_mm(prior_volume_ml: float, prior_diameter_mm: float | None) -> float:
    """Largest centroid distance at which a current lesion can be the prior one."""
    diameter = prior_diameter_mm
    if diameter is None or diameter <= 0:
        # Diameter of the sphere of the prior volume.
        diameter = 2.0 * (3.0 * prior_volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    return max(MIN_MATCH_MM, MATCH_DIAMETER_FACTOR * diameter)


def track(
    lesions: Sequence[LesionMeasurement],
    prior: PriorStudy,
    study_uid: str,
    liver_centroid_xyz: tuple[float, float, float] | None,
) -> TrackingOutcome:
    """Match current lesions to the prior study's and set their tracking fields in place.

    Parameters
    ----------
    lesions:
        Current lesions (tracking fields are overwritten).
    prior:
        The prior time point; its lesions without a centroid cannot be matched.
    study_uid:
        Current Study Instance UID (new lesions' UIDs derive from it).
    liver_centroid_xyz:
        Current liver centroid; with the prior's, it removes the patient's overall shift.
    """
    offset = np.zeros(3)
    if liver_centroid_xyz is not None and prior.liver_centroid_xyz is not None:
        offset = np.asarray(liver_centroid_xyz) - np.asarray(prior.liver_centroid_xyz)
    cands = [p for p in prior.lesions if p.centroid_xyz is not None]
    current = order_by_volume(lesions)
    pairs: list[tuple[int, int]] = []
    if cands and current:
        cur = np.array([les.centroid_xyz for les in current]) - offset
        pri = np.array([p.centroid_xyz for p in cands], dtype=float)
        dist = np.linalg.norm(cur[:, None, :] - pri[None, :, :], axis=-1)
        limit = np.array([match_distance_limit_mm(p.volume_ml, p.longest_diameter_mm)
                          for p in cands])
        allowed = dist <= limit[None, :]
        cost = np.where(allowed, dist, 1e6)
        rows, cols = linear_sum_assignment(cost)
        pairs = [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if allowed[r, c]]
    matched: dict[str, str] = {}
    taken = set()
    for r, c in pairs:
        les, p = current[r], cands[c]
        les.tracking_id, les.tracking_uid = p.tracking_id, p.tracking_uid
        les.prior_volume_ml, les.is_new = p.volume_ml, False
        matched[les.tracking_uid] = p.tracking_id
        taken.add(r)
    number = max((id_number(p.tracking_id) for p in prior.lesions), default=0)
    for r, les in enumerate(current):
        if r in taken:
            continue
        number += 1
        les.tracking_id = TRACKING_ID_FORMAT.format(number)
        les.tracking_uid = derive_uid(study_uid, "lesion", str(number))
        les.prior_volume_ml, les.is_new = None, True
    vanished = [p.tracking_id for p in prior.lesions if p.tracking_id not in matched.values()]
    return TrackingOutcome(matched=matched, vanished=vanished)


def id_number(tracking_id: str) -> int:
    """The number at the end of a tracking id ("Lesion 7" -> 7; 0 if none)."""
    m = _ID_NUMBER.search(tracking_id)
    return int(m.group(1)) if m else 0
