"""Placing metastases inside the liver: inside, apart, and some of them near the edge.

Every lesion is placed so that the lesion GROWN by :data:`GROWTH_MARGIN` (linear) still lies at
least 2 mm inside the liver (away from the IVC and the portal trunk) and at least
:data:`SEPARATION_MM` from every other grown lesion: a follow-up can then enlarge any lesion by
up to ``GROWTH_MARGIN ** 3`` in volume without crossing the liver surface or touching a
neighbour, and no 5 mm slice holds two lesions in one pixel column's partial volume.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from node.phantom.lesions import Lesion, make_lesion

Array = np.ndarray

GROWTH_MARGIN = 1.25
SEPARATION_MM = 7.0
MAX_VOLUME_FACTOR = GROWTH_MARGIN**3 * 0.97


def _apart(center: Array, extent: float, others: list[Lesion]) -> bool:
    for o in others:
        gap = np.linalg.norm(center - np.asarray(o.center)) - (extent + o.extent) * GROWTH_MARGIN
        if gap < SEPARATION_MM:
            return False
    return True


def _fits(lesion: Lesion, interior_sd: Callable[[Array], Array]) -> bool:
    pts = lesion.surface_points(300, GROWTH_MARGIN)
    return bool(np.all(interior_sd(pts) < -2.0))


def place_one(
    rng: np.random.Generator,
    truth_id: str,
    diameter_mm: float,
    interior_sd: Callable[[Array], Array],
    bounds: tuple[Array, Array],
    others: list[Lesion],
    near_edge: bool,
) -> Lesion | None:
    """Try to place one lesion of the given diameter; None if no admissible position is found."""
    template = make_lesion(rng, truth_id, np.zeros(3), diameter_mm)
    cand = rng.uniform(bounds[0], bounds[1], size=(4000, 3))
    sd = interior_sd(cand)
    need = template.extent * GROWTH_MARGIN * 0.8
    cand, sd = cand[sd < -need], sd[sd < -need]
    order = rng.permutation(len(cand))
    valid: list[tuple[float, Lesion]] = []
    for idx in order[:120]:
        c = cand[idx]
        if not _apart(c, template.extent, others):
            continue
        lesion = _moved(template, c)
        if _fits(lesion, interior_sd):
            valid.append((float(sd[idx]), lesion))
            if len(valid) >= 12:
                break
    if not valid:
        return None
    if near_edge:
        return max(valid, key=lambda v: v[0])[1]  # the admissible position closest to the edge
    return valid[0][1]


def _moved(lesion: Lesion, center: Array) -> Lesion:
    d = lesion.to_dict()
    d["center"] = [float(v) for v in center]
    return Lesion.from_dict(d)


def place_lesions(
    rng: np.random.Generator,
    n: int,
    diameter_range: tuple[float, float],
    interior_sd: Callable[[Array], Array],
    bounds: tuple[Array, Array],
    liver_volume_ml: float,
    *,
    others: list[Lesion] | None = None,
    first_index: int = 1,
) -> list[Lesion]:
    """Place ``n`` lesions with equivalent diameters log-uniform in ``diameter_range``.

    The total volume is kept below a third of the liver; a lesion that cannot be placed is
    retried smaller (down to the lower end of the range).
    """
    dmin, dmax = diameter_range
    if not 0 < dmin <= dmax:
        raise ValueError(f"lesion_diameter_mm must satisfy 0 < min <= max, got {diameter_range}")
    placed: list[Lesion] = []
    existing = list(others or [])
    budget = liver_volume_ml / 3.0
    for i in range(n):
        d = float(np.exp(rng.uniform(np.log(dmin), np.log(dmax))))
        while np.pi / 6 * d**3 / 1000 > budget and d > dmin:
            d = max(d * 0.85, dmin)
        lesion = None
        for _ in range(12):
            lesion = place_one(
                rng,
                f"T{first_index + i}",
                d,
                interior_sd,
                bounds,
                existing + placed,
                near_edge=(i % 2 == 1),
            )
            if lesion is not None or d <= dmin:
                break
            d = max(d * 0.85, dmin)
        if lesion is None:
            raise RuntimeError(f"could not place lesion {i + 1} of {n} (diameter {d:.1f} mm)")
        placed.append(lesion)
        budget -= lesion.volume_ml()
    return placed
