"""Contrast phase classification of CT volumes: header and image evidence, images decide.

Every source of evidence votes for a phase with a weight (the tables below are the rules, kept
as data). Among the header votes the largest total weight wins; when the images are conclusive
(:mod:`node.study.image_phase`) they decide, and a disagreement with the headers is logged and
written into the evidence ("headers say X, images say Y: images win"). Within a study, contrast
acquisitions whose images clearly differ are kept in distinct phases (study context).
Header attributes: Contrast/Bolus Agent (0018,0010), Contrast/Bolus Start Time (0018,1042),
Acquisition Time (0008,0032), Series Description (0008,103E) (PS3.3 C.7.6.4, C.7.3.1).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from node.study.image_phase import (
    CONTRAST_PHASES,
    ImageFeatures,
    measure_features,
    phase_from_features,
    resolve_in_study,
)
from node.study.model import Geometry, Phase, Volume

logger = logging.getLogger(__name__)

#: Delay after contrast start (seconds): (upper bound, bound inclusive?, phase), in order:
#: < 35 s arterial, 35-90 s portal venous, > 90 s delayed.
DELAY_TABLE: tuple[tuple[float, bool, Phase], ...] = (
    (35.0, False, Phase.ARTERIAL),
    (90.0, True, Phase.PORTAL_VENOUS),
    (float("inf"), True, Phase.DELAYED),
)

#: Series description keywords (EN / DE / ZH), matched case-insensitively in this order; the
#: first matching pattern wins, so the more specific patterns come first.
KEYWORD_TABLE: tuple[tuple[str, Phase], ...] = (
    (r"portal[\s_-]*ven|portalven|\bpvp?\b|门静脉|门脉|portal", Phase.PORTAL_VENOUS),
    (r"non[\s_-]*contrast|\bnc\b|w/?o[\s_-]*contrast|unenhanced|plain|pre[\s_-]*contrast"
     r"|\bnative?\b|nativ|\bnat\b|平扫|非增强", Phase.NATIVE),
    (r"arteri|\bart\b|\bha\b|arteriell|动脉", Phase.ARTERIAL),
    (r"delay|\blate\b|equilibri|spät|spaet|verzögert|延迟|平衡期", Phase.DELAYED),
    (r"venous|venös|venoes|静脉", Phase.PORTAL_VENOUS),
)

#: Weights of the evidence sources.
WEIGHTS: dict[str, float] = {
    "timing": 3.0,
    "keyword": 2.0,
    "image": 1.5,
    "no_agent": 0.5,
}

@dataclass(frozen=True)
class Evidence:
    """One vote for a phase."""

    phase: Phase
    weight: float
    reason: str


def classify_phase(
    headers: Sequence[Dataset],
    array: np.ndarray | None = None,
    geometry: Geometry | None = None,
) -> tuple[Phase, str]:
    """Classify the contrast phase of one volume.

    Parameters
    ----------
    headers:
        The volume's slice datasets (the first one carries the series-level attributes).
    array, geometry:
        Optional HU volume and its geometry, for the image check (aortic attenuation).

    Returns
    -------
    tuple
        The phase and a human-readable evidence string.
    """
    votes = header_evidence(headers[0]) if headers else []
    image = image_evidence(array, geometry) if array is not None and geometry is not None else []
    phase, _, text = decide_with_images(votes, image)
    return phase, text


def decide(votes: Sequence[Evidence]) -> tuple[Phase, float]:
    """Sum the votes per phase; the highest total wins (UNKNOWN without votes)."""
    totals: dict[Phase, float] = defaultdict(float)
    for v in votes:
        totals[v.phase] += v.weight
    if not totals:
        return Phase.UNKNOWN, 0.0
    best = max(totals, key=lambda p: totals[p])
    return best, totals[best]


def header_evidence(ds: Dataset) -> list[Evidence]:
    """Votes from the headers: bolus timing, series description, contrast agent."""
    votes: list[Evidence] = []
    delay = contrast_delay_s(ds)
    if delay is not None:
        phase = next(p for bound, incl, p in DELAY_TABLE
                     if delay < bound or (incl and delay == bound))
        votes.append(Evidence(phase, WEIGHTS["timing"], f"delay {delay:.0f} s after bolus start"))
    description = str(ds.get("SeriesDescription", "") or "")
    kw = keyword_phase(description)
    if kw is not None:
        votes.append(Evidence(kw, WEIGHTS["keyword"], f"series description '{description}'"))
    agent = str(ds.get("ContrastBolusAgent", "") or "").strip()
    if not agent and not votes:
        votes.append(Evidence(Phase.NATIVE, WEIGHTS["no_agent"], "no contrast agent in header"))
    return votes


def keyword_phase(description: str) -> Phase | None:
    """The phase named in a series description, by :data:`KEYWORD_TABLE`."""
    # Underscores and dots separate words in scanner descriptions ("ABD_PV_5.0").
    text = re.sub(r"[_.]", " ", description.lower())
    for pattern, phase in KEYWORD_TABLE:
        if re.search(pattern, text):
            return phase
    return None


def parse_tm(value: object) -> float | None:
    """DICOM TM (PS3.5 6.2) -> seconds since midnight; accepts the old ``HH:MM:SS`` form."""
    text = str(value or "").strip().replace(":", "")
    if len(text) < 2 or not text.split(".")[0].isdigit():
        return None
    hh = int(text[0:2])
    mm = int(text[2:4]) if len(text) >= 4 else 0
    ss = float(text[4:]) if len(text) > 4 else 0.0
    return hh * 3600.0 + mm * 60.0 + ss


def contrast_delay_s(ds: Dataset) -> float | None:
    """Acquisition Time minus Contrast/Bolus Start Time in seconds (None if unknown)."""
    start = parse_tm(ds.get("ContrastBolusStartTime"))
    acq = parse_tm(ds.get("AcquisitionTime"))
    if start is None or acq is None:
        return None
    delay = acq - start
    if delay < -43200:  # acquisition after midnight
        delay += 86400
    return delay if 0 <= delay < 3600 else None


def image_evidence(array: np.ndarray, geometry: Geometry) -> list[Evidence]:
    """Votes from the image: aorta, liver and intrahepatic vessel attenuation.

    See :mod:`node.study.image_phase`; no vote when the images are inconclusive.
    """
    return evidence_from_features(measure_features(array, geometry))


def evidence_from_features(features: ImageFeatures) -> list[Evidence]:
    """The image vote for measured features (none when they are inconclusive)."""
    phase, reason = phase_from_features(features)
    if phase is None:
        return []
    return [Evidence(phase, WEIGHTS["image"], f"images: {features.describe()}; {reason}")]


def decide_with_images(header: Sequence[Evidence], image: Sequence[Evidence]
                       ) -> tuple[Phase, float, str]:
    """Headers and images together; when they disagree, the images win (and it is said).

    Returns
    -------
    tuple
        Phase, its score, and the evidence text.
    """
    votes = [*header, *image]
    text = "; ".join(f"{v.reason} -> {v.phase.value} ({v.weight:g})" for v in votes)
    header_phase, header_score = decide(header)
    if not image:
        return header_phase, header_score, text
    image_phase, image_score = decide(image)
    if header and header_phase is not image_phase:
        note = (f"headers say {header_phase.value}, images say {image_phase.value}: "
                "images win")
        # A strong header claim (timing, description) overruled is worth a warning; the
        # weak "no agent" hint (often emptied by de-identification) only a note.
        strong = any(v.weight >= WEIGHTS["keyword"] for v in header)
        logger.log(logging.WARNING if strong else logging.INFO, "phase conflict: %s (%s)",
                   note, text)
        return image_phase, image_score, f"{text}; {note}"
    if header_phase is image_phase:
        return image_phase, image_score + header_score, text
    return image_phase, image_score, text


def _order_contrast_phases(volumes: Sequence[Volume], features: Sequence[ImageFeatures]
                           ) -> None:
    """Study context: distinct contrast acquisitions get distinct phases in gap order."""
    idx = [i for i, (v, f) in enumerate(zip(volumes, features, strict=True))
           if v.phase in CONTRAST_PHASES and f.aorta_hu is not None and f.liver_hu is not None]
    gaps = [features[i].aorta_hu - features[i].liver_hu for i in idx]  # type: ignore[operator]
    new = resolve_in_study(gaps, [volumes[i].phase for i in idx])
    for i, phase in zip(idx, new, strict=True):
        vol = volumes[i]
        if phase is not vol.phase:
            note = (f"study context: aorta-liver gaps {', '.join(f'{g:.0f}' for g in gaps)} HU "
                    f"order the contrast acquisitions -> {phase.value} (not {vol.phase.value})")
            logger.warning("%s: %s", vol.series_instance_uid, note)
            vol.phase, vol.phase_evidence = phase, f"{vol.phase_evidence}; {note}"


def assign_phases(volumes: Sequence[Volume]) -> tuple[dict[Phase, Volume], list[str]]:
    """Classify every volume and keep the best one per phase.

    Ranking among volumes claiming the same phase: evidence weight, then number of slices,
    then series UID (for determinism). The others are reported as skipped.

    Returns
    -------
    tuple
        ``{phase: volume}`` and the skip reasons for the volumes not kept.
    """
    scores: list[float] = []
    features: list[ImageFeatures] = []
    for vol in volumes:
        features.append(measure_features(vol.array, vol.geometry))
        phase, score, text = decide_with_images(header_evidence(vol.datasets[0]),
                                                evidence_from_features(features[-1]))
        vol.phase, vol.phase_evidence = phase, text
        scores.append(score)
    _order_contrast_phases(volumes, features)
    ranked: dict[Phase, list[tuple[float, int, str, Volume]]] = defaultdict(list)
    for vol, score in zip(volumes, scores, strict=True):
        logger.info("%s: %s (%s)", vol.series_instance_uid, vol.phase.value, vol.phase_evidence)
        ranked[vol.phase].append((score, vol.array.shape[0], vol.series_instance_uid, vol))
    chosen: dict[Phase, Volume] = {}
    skipped: list[str] = []
    for phase, cands in ranked.items():
        cands.sort(key=lambda c: (-c[0], -c[1], c[2]))
        chosen[phase] = cands[0][3]
        for _, _, uid, vol in cands[1:]:
            skipped.append(f"{uid}: another volume was preferred as {phase.value} "
                           f"({vol.phase_evidence})")
    return chosen, skipped
