"""Contrast phase classification of CT volumes: header evidence first, image evidence as backup.

Every source of evidence votes for a phase with a weight (the tables below are the rules, kept
as data). The phase with the largest total weight wins, so a stronger source (e.g. a measured
aortic attenuation) can overrule a weaker one (e.g. an empty Contrast/Bolus Agent).
Header attributes: Contrast/Bolus Agent (0018,0010), Contrast/Bolus Start Time (0018,1042),
Acquisition Time (0008,0032), Series Description (0008,103E) (PS3.3 C.7.6.4, C.7.3.1).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from node.study.model import Geometry, Phase, Volume

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

#: Aortic attenuation (HU, median of the detected aorta): lower bound (inclusive) -> phase.
AORTA_TABLE: tuple[tuple[float, Phase], ...] = (
    (200.0, Phase.ARTERIAL),
    (130.0, Phase.PORTAL_VENOUS),
    (90.0, Phase.DELAYED),
)
#: Aorta candidate shape: equivalent diameter (mm) and minimal fill of its bounding circle.
AORTA_DIAMETER_MM = (14.0, 40.0)
AORTA_MIN_ROUNDNESS = 0.55
AORTA_MAX_SD_HU = 45.0


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
    if array is not None and geometry is not None:
        votes.extend(image_evidence(array, geometry))
    phase, _ = decide(votes)
    return phase, "; ".join(f"{v.reason} -> {v.phase.value} ({v.weight:g})" for v in votes)


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
    """Votes from the image: the attenuation of the abdominal aorta."""
    hu = aorta_attenuation(array, geometry)
    if hu is None:
        return [Evidence(Phase.NATIVE, WEIGHTS["image"] / 2, "no enhanced aorta found")]
    for bound, phase in AORTA_TABLE:
        if hu >= bound:
            return [Evidence(phase, WEIGHTS["image"], f"aorta {hu:.0f} HU")]
    return [Evidence(Phase.NATIVE, WEIGHTS["image"], f"aorta {hu:.0f} HU")]


def aorta_attenuation(array: np.ndarray, geometry: Geometry) -> float | None:
    """Median HU of the enhanced aorta in the central slices, None if none is found.

    The aorta is taken as the brightest round, homogeneous blob of aortic size near the
    left-right middle of the body; bone is excluded by its inhomogeneity and cortical rim.
    """
    nz = array.shape[0]
    slices = sorted({int(nz * f) for f in (0.35, 0.45, 0.55, 0.65)} & set(range(nz)))
    _, dy, dx = geometry.spacing
    values: list[float] = []
    for k in slices:
        img = ndimage.uniform_filter(array[k], size=3)
        body = img > -300
        if body.sum() < 100:
            continue
        cols = np.nonzero(body.any(axis=0))[0]
        mid, half = (cols[0] + cols[-1]) / 2.0, (cols[-1] - cols[0]) / 2.0
        labels, n = ndimage.label((img > AORTA_TABLE[-1][0]) & (img < 600))
        best: float | None = None
        for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            region = labels[sl] == lab
            area = float(region.sum()) * dy * dx
            diameter = 2.0 * np.sqrt(area / np.pi)
            if not AORTA_DIAMETER_MM[0] <= diameter <= AORTA_DIAMETER_MM[1]:
                continue
            extent = max((sl[0].stop - sl[0].start) * dy, (sl[1].stop - sl[1].start) * dx)
            roundness = area / (np.pi * (extent / 2.0) ** 2)
            centre = (sl[1].start + sl[1].stop) / 2.0
            inner = ndimage.binary_erosion(region, iterations=2)
            vals = array[k][sl][inner if inner.any() else region]
            if (roundness < AORTA_MIN_ROUNDNESS or abs(centre - mid) > 0.3 * half
                    or vals.std() > AORTA_MAX_SD_HU):
                continue
            med = float(np.median(vals))
            best = med if best is None else max(best, med)
        if best is not None:
            values.append(best)
    return float(np.median(values)) if values else None


def assign_phases(volumes: Sequence[Volume]) -> tuple[dict[Phase, Volume], list[str]]:
    """Classify every volume and keep the best one per phase.

    Ranking among volumes claiming the same phase: evidence weight, then number of slices,
    then series UID (for determinism). The others are reported as skipped.

    Returns
    -------
    tuple
        ``{phase: volume}`` and the skip reasons for the volumes not kept.
    """
    ranked: dict[Phase, list[tuple[float, int, str, Volume]]] = defaultdict(list)
    for vol in volumes:
        votes = header_evidence(vol.datasets[0])
        if not votes or all(v.weight < WEIGHTS["keyword"] for v in votes):
            votes.extend(image_evidence(vol.array, vol.geometry))
        phase, score = decide(votes)
        vol.phase = phase
        vol.phase_evidence = "; ".join(
            f"{v.reason} -> {v.phase.value} ({v.weight:g})" for v in votes)
        ranked[phase].append((score, vol.array.shape[0], vol.series_instance_uid, vol))
    chosen: dict[Phase, Volume] = {}
    skipped: list[str] = []
    for phase, cands in ranked.items():
        cands.sort(key=lambda c: (-c[0], -c[1], c[2]))
        chosen[phase] = cands[0][3]
        for _, _, uid, vol in cands[1:]:
            skipped.append(f"{uid}: another volume was preferred as {phase.value} "
                           f"({vol.phase_evidence})")
    return chosen, skipped
