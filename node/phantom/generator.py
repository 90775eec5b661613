"""Generate phantom studies: a baseline, and follow-ups of it (see the package docstring)."""

from __future__ import annotations

import hashlib
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from node.phantom.anatomy import Anatomy, Item, build_anatomy
from node.phantom.attenuation import PHASES, draw_table
from node.phantom.lesions import Lesion, longest_axial_diameter_mm
from node.phantom.placement import place_lesions
from node.phantom.render import Grid, SdCache, add_noise, render_phase, to_stored
from node.phantom.truth import volumetric_category, write_truth
from node.phantom.writer import StudyInfo, uid, write_series

Array = np.ndarray
GENERATOR_VERSION = 1
#: Shortest scan range (mm): 35 slices of 5 mm.
MIN_COVERAGE_MM = 175.0


def _rng(seed: int, *tags: object) -> np.random.Generator:
    """An independent random stream per purpose, so adding draws in one leaves others alone."""
    digest = hashlib.sha256(repr((seed, *tags)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _short(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:10].upper()


def _study_info(seed: int, patient: dict[str, str], study_date: str, tag: str) -> StudyInfo:
    rng = _rng(seed, tag, "identity")
    hour, minute = int(rng.integers(8, 17)), int(rng.integers(0, 60))
    return StudyInfo(
        patient_name=patient["name"],
        patient_id=patient["id"],
        birth_date=patient["birth_date"],
        sex=patient["sex"],
        study_instance_uid=uid(tag, seed, "study"),
        study_date=study_date,
        study_time=f"{hour:02d}{minute:02d}00",
        accession_number="A" + _short(tag, seed),
        study_id=_short(tag, seed, "id")[:8],
        frame_of_reference_uid=uid(tag, seed, "for"),
        uid_seed=f"{tag}-{seed}",
    )


def _grid(
    rng: np.random.Generator, size: int, slice_mm: float, liver_z: tuple[float, float]
) -> Grid:
    """Axial grid: FOV 380-400 mm, slices covering the liver plus a 10-20 mm margin."""
    fov = float(rng.uniform(380.0, 400.0))
    px = fov / size
    lo = liver_z[0] - rng.uniform(10.0, 20.0)
    hi = liver_z[1] + rng.uniform(10.0, 20.0)
    n = int(np.ceil((hi - lo) / slice_mm)) + 1
    if n * slice_mm < MIN_COVERAGE_MM:  # a short liver: still scan the usual range
        extra = int(np.ceil(MIN_COVERAGE_MM / slice_mm)) - n
        lo -= (extra // 2) * slice_mm
        n += extra
    z0 = round(float(lo), 1)
    return Grid(
        origin=(-fov / 2 + px / 2, -fov / 2 + px / 2 + 10.0, z0),
        pixel_mm=px,
        slice_mm=slice_mm,
        shape=(n, size, size),
    )


def _phase_shifts(rng: np.random.Generator, max_shift_mm: float) -> dict[str, list[float]]:
    """Breathing between phases: a random rigid shift per phase, none for portal venous."""
    return {
        p: (
            [0.0, 0.0, 0.0]
            if p == "portal_venous"
            else [round(float(v), 3) for v in rng.uniform(-max_shift_mm, max_shift_mm, 3)]
        )
        for p in PHASES
    }


def _lesion_items(lesions: list[Lesion]) -> list[Item]:
    present = [les for les in lesions if les.status != "vanished"]
    return [
        Item(les.truth_id, les, hu_field=les.hu_field, liver=1.0, lesion_label=i + 1)
        for i, les in enumerate(present)
    ]


def _render_and_write(
    out_dir: Path,
    study: StudyInfo,
    anatomy: Anatomy,
    lesions: list[Lesion],
    grid: Grid,
    patient_shift: Array,
    shifts: dict[str, list[float]],
    table: dict[str, dict[str, float]],
    noise_rng: np.random.Generator,
    noise_hu: float,
) -> tuple[dict[str, str], Array, Array, float]:
    """Render every phase, write it, return (series UIDs, lesion labels, liver mask, liver ml)."""
    items = anatomy.items + _lesion_items(lesions)
    series: dict[str, str] = {}
    labels = liver = None
    liver_ml = 0.0
    pad = float(np.abs(np.asarray(list(shifts.values()))).max()) + 10.0
    lo = np.array([grid.axis(d)[0] for d in "xyz"]) - patient_shift - pad
    hi = np.array([grid.axis(d)[-1] for d in "xyz"]) - patient_shift + pad
    cache = SdCache(lo, hi)
    for phase in PHASES:
        offset = patient_shift + np.asarray(shifts[phase])
        res = render_phase(
            items, grid, offset, phase, table, truth=(phase == "portal_venous"), cache=cache
        )
        stored = to_stored(add_noise(res.hu, noise_rng, noise_hu))
        series[phase] = uid(study.uid_seed, "series", phase)
        write_series(out_dir / "dicom" / phase, study, phase, series[phase], grid, stored)
        if res.lesion_labels is not None and res.liver_fraction is not None:
            labels, liver = res.lesion_labels, res.liver_fraction >= 0.5
            liver_ml = res.liver_volume_ml
    assert labels is not None and liver is not None
    return series, labels, liver, liver_ml


def _lesion_truth(
    lesions: list[Lesion], patient_shift: Array, prior: dict[str, float] | None
) -> list[dict[str, Any]]:
    out = []
    label = 0
    for les in sorted(lesions, key=lambda le: int(le.truth_id[1:])):
        gone = les.status == "vanished"
        if not gone:
            label += 1
        vol = 0.0 if gone else les.volume_ml()
        out.append(
            {
                "truth_id": les.truth_id,
                "label": 0 if gone else label,
                "center_xyz": [
                    round(float(c + s), 3) for c, s in zip(les.center, patient_shift, strict=True)
                ],
                "diameter_mm": 0.0 if gone else round(les.diameter_mm(), 3),
                "longest_axial_diameter_mm": 0.0
                if gone
                else round(longest_axial_diameter_mm(les), 3),
                "volume_ml": round(vol, 5),
                "status": les.status,
                "prior_volume_ml": None
                if prior is None
                else round(prior.get(les.truth_id, 0.0), 5),
                "lipiodol": bool(les.lipiodol) and not gone,
            }
        )
    return out


def _write_study(
    out_dir: Path,
    seed: int,
    study: StudyInfo,
    anatomy: Anatomy,
    lesions: list[Lesion],
    grid: Grid,
    patient_shift: Array,
    max_shift_mm: float,
    noise_hu: float,
    phantom: dict[str, Any],
    prior: dict[str, Any] | None,
) -> dict[str, Any]:
    """Render, write DICOM and truth files; return the truth document."""
    tag = study.uid_seed
    # Labels must follow truth order (by truth_id) for the label map to match truth.json.
    lesions = sorted(lesions, key=lambda le: int(le.truth_id[1:]))
    shifts = _phase_shifts(_rng(seed, tag, "shifts"), max_shift_mm)
    table = draw_table(_rng(seed, tag, "table"))
    series, labels, liver, liver_ml = _render_and_write(
        out_dir,
        study,
        anatomy,
        lesions,
        grid,
        patient_shift,
        shifts,
        table,
        _rng(seed, tag, "noise"),
        noise_hu,
    )
    prior_vols = None
    if prior is not None:
        prior_vols = {les["truth_id"]: les["volume_ml"] for les in prior["lesions"]}
    lesion_truth = _lesion_truth(lesions, patient_shift, prior_vols)
    total = float(sum(les.volume_ml() for les in lesions if les.status != "vanished"))
    truth: dict[str, Any] = {
        "patient_id": study.patient_id,
        "patient_name": study.patient_name,
        "study_instance_uid": study.study_instance_uid,
        "study_date": study.study_date,
        "frame_of_reference_uid": study.frame_of_reference_uid,
        "series": series,
        "shift_mm": shifts,
        "liver_volume_ml": round(liver_ml, 3),
        "lesions": lesion_truth,
        "total_volume_ml": round(total, 5),
        "grid": {
            "origin_xyz": list(grid.origin),
            "pixel_spacing_mm": grid.pixel_mm,
            "slice_thickness_mm": grid.slice_mm,
            "shape": list(grid.shape),
        },
        "hu_table": table,
    }
    if prior is not None:
        prior_total = float(prior["total_volume_ml"])
        truth["prior_study_instance_uid"] = prior["study_instance_uid"]
        truth["prior_total_volume_ml"] = prior_total
        truth["volume_change_fraction"] = round(total / prior_total - 1.0, 6)
        truth["category"] = volumetric_category(prior_total, round(total, 5))
    phantom["lesions"] = [les.to_dict() for les in lesions]
    truth["phantom"] = phantom
    write_truth(out_dir, truth, labels, liver)
    return truth


def generate_baseline(
    out_dir: Path,
    seed: int,
    *,
    size: int = 512,
    n_lesions: int | None = None,
    lesion_diameter_mm: tuple[float, float] = (7.0, 70.0),
    slice_thickness_mm: float = 5.0,
    patient_id: str | None = None,
    study_date: str = "20260105",
    noise_hu: float = 12.0,
    max_shift_mm: float = 6.0,
) -> Path:
    """Write a baseline (pre-treatment) four-phase study into ``out_dir``; return ``out_dir``.

    Parameters
    ----------
    out_dir:
        Target directory (created); receives ``dicom/<phase>/NNNN.dcm``, ``truth.json`` and
        ``truth_labels.npz``.
    seed:
        Everything (anatomy, lesions, noise, UIDs) is a deterministic function of the seed and
        the other arguments.
    size:
        Rows and columns of each image (FOV 380-400 mm, pixel spacing FOV / size).
    n_lesions:
        Number of metastases (default: random 1-8).
    lesion_diameter_mm:
        Range of equivalent-sphere diameters (log-uniform).
    """
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if slice_thickness_mm <= 0:
        raise ValueError(f"slice_thickness_mm must be > 0, got {slice_thickness_mm}")
    if n_lesions is not None and not 0 <= n_lesions <= 12:
        raise ValueError(f"n_lesions must be in 0..12, got {n_lesions}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    anatomy_seed = seed
    anatomy = build_anatomy(_rng(anatomy_seed, "anatomy"))
    rng = _rng(seed, "lesions")
    n = int(rng.integers(1, 9)) if n_lesions is None else n_lesions
    lesions = place_lesions(
        rng,
        n,
        lesion_diameter_mm,
        anatomy.liver_interior_sd,
        (anatomy.liver.lo, anatomy.liver.hi),
        anatomy.extras["liver_ml"],
    )
    ident = _rng(seed, "patient")
    patient = {
        "id": patient_id or f"LNP{seed:06d}"[:64],
        "name": f"PHANTOM^SEED{seed}",
        "birth_date": f"{int(ident.integers(1945, 1980))}{int(ident.integers(1, 13)):02d}"
        f"{int(ident.integers(1, 29)):02d}",
        "sex": str(ident.choice(["F", "M"])),
    }
    study = _study_info(seed, patient, study_date, "baseline")
    grid = _grid(_rng(seed, "grid"), size, slice_thickness_mm, anatomy.liver_z)
    phantom = {
        "version": GENERATOR_VERSION,
        "anatomy_seed": anatomy_seed,
        "size": size,
        "slice_thickness_mm": slice_thickness_mm,
        "noise_hu": noise_hu,
        "max_shift_mm": max_shift_mm,
        "patient": patient,
        "patient_shift_mm": [0.0, 0.0, 0.0],
    }
    _write_study(
        out_dir,
        seed,
        study,
        anatomy,
        lesions,
        grid,
        np.zeros(3),
        max_shift_mm,
        noise_hu,
        phantom,
        None,
    )
    return out_dir


def _add_months(da: str, months: int) -> str:
    d = date(int(da[:4]), int(da[4:6]), int(da[6:8]))
    m = d.month - 1 + months
    return date(d.year + m // 12, m % 12 + 1, min(d.day, 28)).strftime("%Y%m%d")
