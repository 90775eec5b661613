"""Follow-up studies: the same patient after treatment, with lesion volumes changed.

The anatomy is rebuilt from the prior study's anatomy seed (stored in its ``truth.json``), the
patient lies a few millimetres differently, and each prior lesion keeps its ``truth_id`` while
its volume is multiplied by a factor (0 = vanished). With a target category the factors are
drawn so the total change lands inside :data:`node.phantom.truth.TARGET_CHANGE`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from node.phantom.anatomy import Anatomy, build_anatomy
from node.phantom.generator import _add_months, _grid, _rng, _study_info, _write_study
from node.phantom.lesions import Lesion, lipiodol_spots
from node.phantom.placement import MAX_VOLUME_FACTOR, place_lesions
from node.phantom.truth import CATEGORIES, TARGET_CHANGE, load_truth

Array = np.ndarray


def _solve_factors(
    rng: np.random.Generator, volumes: Array, change: float, new_ml: float, allow_vanish: bool
) -> Array:
    """Per-lesion volume factors with ``sum(v * f) + new_ml == (1 + change) * sum(v)``."""
    budget = (1.0 + change) * volumes.sum() - new_ml
    f = np.exp(rng.normal(np.log(max(1.0 + change, 0.05)), 0.25, len(volumes)))
    if allow_vanish and len(volumes) >= 2 and rng.random() < 0.5:
        smallest = int(np.argmin(volumes))
        if volumes[smallest] < 0.3 * budget:
            f[smallest] = 0.0
    for _ in range(50):
        free = (f > 0) & (f < MAX_VOLUME_FACTOR)
        fixed = float((volumes * f)[~free].sum())
        movable = float((volumes * f)[free].sum())
        if movable <= 0:
            break
        f[free] *= (budget - fixed) / movable
        f = np.minimum(f, MAX_VOLUME_FACTOR)
        if abs(float((volumes * f).sum()) - budget) < 1e-9 * max(budget, 1.0):
            break
    if abs(float((volumes * f).sum()) - budget) > 1e-6 * max(budget, 1.0) or np.any(f < 0):
        raise RuntimeError("cannot reach the requested volume change with these lesions")
    return f


def _limit_new(new: list[Lesion], max_ml: float | None) -> list[Lesion]:
    """Shrink new lesions so they take at most ``max_ml`` of the target total."""
    new_ml = float(sum(les.volume_ml() for les in new))
    if max_ml is None or new_ml <= max_ml:
        return new
    return [les.scaled(max_ml / new_ml) for les in new]


def _choose_factors(
    rng: np.random.Generator,
    volumes: Array,
    target: str | None,
    change: float | None,
    tace: bool,
    new_ml: float,
) -> Array:
    """Volume factors for the prior lesions (0 = vanished)."""
    if target == "CR":
        return np.zeros(len(volumes))
    if change is not None:
        return _solve_factors(rng, volumes, change, new_ml, allow_vanish=(target == "PR"))
    mu = -0.6 if tace else -0.05
    f = np.minimum(np.exp(rng.normal(mu, 0.35, len(volumes))), MAX_VOLUME_FACTOR)
    return np.where(f < 0.12, 0.0, f)


def _treated(rng: np.random.Generator, lesion: Lesion, factor: float, tace: bool) -> Lesion:
    """The lesion after treatment: resized, devascularised if responding, lipiodol if TACE."""
    les = lesion.scaled(factor)
    if factor < 0.75:
        les = replace(
            les, enhancement=float(rng.uniform(0.2, 0.6) if tace else rng.uniform(0.5, 0.9))
        )
    if tace and not les.lipiodol and rng.random() < 0.7:
        les = replace(les, lipiodol=lipiodol_spots(rng))
    return replace(les, status="present")


def generate_follow_up(
    baseline_dir: Path,
    out_dir: Path,
    seed: int,
    *,
    months: int = 2,
    tace: bool = False,
    target_category: str | None = None,
    new_lesions: int | None = None,
) -> Path:
    """Write a follow-up of the study in ``baseline_dir`` into ``out_dir``; return ``out_dir``.

    Parameters
    ----------
    baseline_dir:
        A phantom study directory (a baseline or itself a follow-up).
    seed:
        Seed of the follow-up (lesion changes, noise, UIDs, positioning).
    months:
        Time since the prior study (StudyDate moves by this many months).
    tace:
        After chemo-embolisation: lipiodol deposits in most treated lesions, shrinkage likely.
    target_category:
        "CR", "PR", "MR", "SD" or "PD": total volume change drawn >= 8 points from boundaries.
    new_lesions:
        Number of new lesions (default: 0, or 0-1 at random without a target or for PD).
    """
    if target_category is not None and target_category not in CATEGORIES:
        raise ValueError(f"target_category must be one of {CATEGORIES}, got {target_category!r}")
    if months < 1:
        raise ValueError(f"months must be >= 1, got {months}")
    if target_category == "CR" and new_lesions:
        raise ValueError("a complete response (CR) cannot have new lesions")
    prior = load_truth(Path(baseline_dir))
    ph: dict[str, Any] = dict(prior["phantom"])
    if prior["total_volume_ml"] <= 0 and target_category is not None:
        raise ValueError("the prior study has no lesions: no response category can be targeted")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"followup-{prior['study_instance_uid']}"
    rng = _rng(seed, tag, "lesions")
    anatomy = build_anatomy(_rng(ph["anatomy_seed"], "anatomy"))
    lesions = _evolve(
        rng,
        anatomy,
        [Lesion.from_dict(d) for d in ph["lesions"]],
        target_category,
        tace,
        new_lesions,
    )
    pos = _rng(seed, tag, "position")
    patient_shift = np.array([*pos.uniform(-4, 4, 2), pos.uniform(-8, 8)]).round(3)
    shifted_z = (anatomy.liver_z[0] + patient_shift[2], anatomy.liver_z[1] + patient_shift[2])
    grid = _grid(
        _rng(seed, tag, "grid"), int(ph["size"]), float(ph["slice_thickness_mm"]), shifted_z
    )
    study = _study_info(seed, _patient(ph), _add_months(prior["study_date"], months), tag)
    ph["patient_shift_mm"] = [float(v) for v in patient_shift]
    _write_study(
        out_dir,
        seed,
        study,
        anatomy,
        lesions,
        grid,
        patient_shift,
        float(ph["max_shift_mm"]),
        float(ph["noise_hu"]),
        ph,
        prior,
    )
    return out_dir


def _evolve(
    rng: np.random.Generator,
    anatomy: Anatomy,
    all_prior: list[Lesion],
    target_category: str | None,
    tace: bool,
    new_lesions: int | None,
) -> list[Lesion]:
    """The lesions at follow-up: prior ones resized or vanished, plus new ones."""
    old = [les for les in all_prior if les.status != "vanished"]
    if new_lesions is None:
        new_lesions = int(rng.integers(0, 2)) if target_category in (None, "PD") else 0
    dmax = 20.0 if target_category in (None, "PD") else 10.0
    grown = [les.scaled(MAX_VOLUME_FACTOR) for les in old]
    new = place_lesions(
        rng,
        new_lesions,
        (7.0, dmax),
        anatomy.liver_interior_sd,
        (anatomy.liver.lo, anatomy.liver.hi),
        1600.0,
        others=grown,
        first_index=1 + max((int(le.truth_id[1:]) for le in all_prior), default=0),
    )
    vols = np.array([les.volume_ml() for les in old])
    change = (
        float(rng.uniform(*TARGET_CHANGE[target_category]))
        if target_category in TARGET_CHANGE
        else None
    )
    new = _limit_new(new, None if change is None else 0.5 * (1 + change) * vols.sum())
    factors = _choose_factors(
        rng, vols, target_category, change, tace, float(sum(les.volume_ml() for les in new))
    )
    lesions = [les for les in all_prior if les.status == "vanished"]
    for les, f in zip(old, factors, strict=True):
        lesions.append(replace(les, status="vanished") if f == 0 else _treated(rng, les, f, tace))
    lesions += [replace(les, status="new") for les in new]
    return lesions


def _patient(ph: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in ph["patient"].items()}
