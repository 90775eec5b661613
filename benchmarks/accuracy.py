"""Segmentation accuracy against the phantom's ground truth.

Generates seeded phantom studies (baselines with varied lesion count, size 5-70 mm, noise and
inter-phase motion, each followed by a TACE follow-up with lipiodol), runs the analysis, and
prints per size band: detection sensitivity, false positives per study, per-lesion Dice,
|volume error| (median and 90th percentile) and the signed median (bias), liver Dice, and the
bars of issue #5 for lesions >= 10 mm. The truth volume is the lesion's exact continuous volume
(analytic quadrature, not a voxel count), so a systematic error of the node shows as a bias.

    .venv/bin/python benchmarks/accuracy.py --studies 16 --size 256 [--details out.tsv]

A truth lesion is detected when a node label overlaps it (the label with the largest overlap
is its match); node lesions overlapping no truth lesion are false positives, assigned to the
size band of their equivalent-sphere diameter.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from node.analysis import analyze
from node.phantom import generate_baseline, generate_follow_up, load_truth, load_truth_labels
from node.study.assembly import load_study_dir

BANDS = [(5.0, 10.0), (10.0, 20.0), (20.0, 30.0), (30.0, 200.0)]
BARS = {"sens": 0.95, "fp": 0.3, "dice": 0.85, "err_med": 5.0, "err_p90": 15.0, "liver": 0.95}


def _band(d_mm: float) -> tuple[float, float] | None:
    return next((b for b in BANDS if b[0] <= d_mm < b[1]), None)


def evaluate(study_dir: Path, rows: dict, fps: dict, liver_dice: list[float],
             details: list[str]) -> float:
    """Analyse one phantom study and append its per-lesion rows; return the analysis time."""
    t0 = time.perf_counter()
    result = analyze(load_study_dir(study_dir / "dicom"))
    seconds = time.perf_counter() - t0
    truth = load_truth(study_dir)
    labels, liver = load_truth_labels(study_dir)
    overlap = (result.liver_mask & liver).sum()
    liver_dice.append(2 * overlap / (result.liver_mask.sum() + liver.sum()))
    matched: set[int] = set()
    liver_k = np.flatnonzero(liver.any(axis=(1, 2)))
    for les in truth["lesions"]:
        if les["status"] == "vanished" or les["label"] == 0:
            continue
        gt = labels == les["label"]
        band = _band(les["diameter_mm"])
        if band is None:
            continue
        hits = result.lesion_labels[gt]
        hits = hits[hits > 0]
        row: tuple[bool, float, float] = (False, 0.0, 0.0)
        if hits.size:
            best = int(np.bincount(hits).argmax())
            matched.add(best)
            pred = result.lesion_labels == best
            dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
            vol = next(m.volume_ml for m in result.lesions if m.label == best)
            row = (True, float(dice), (vol - les["volume_ml"]) / les["volume_ml"])
        rows[band].append(row)
        # Slices between the lesion and the liver's first or last slice (partial volume there).
        ks = np.flatnonzero(gt.any(axis=(1, 2)))
        edge = min(ks[0] - liver_k[0], liver_k[-1] - ks[-1]) if ks.size else -1
        details.append(f"{study_dir.name}\t{les['truth_id']}\t{les['diameter_mm']:.1f}\t"
                       f"{int(les.get('lipiodol', False))}\t{int(row[0])}\t{row[1]:.3f}\t"
                       f"{row[2] * 100:+.1f}\t{edge}\t{les['center_xyz']}")
    overlapping = set(np.unique(result.lesion_labels[labels > 0]))
    for m in result.lesions:
        if m.label in matched | overlapping:
            continue
        d = (6.0 * m.volume_ml * 1000.0 / np.pi) ** (1.0 / 3.0)
        fps[_band(d) or BANDS[0]] += 1
        details.append(f"{study_dir.name}\tFP\t{d:.1f}\t0\t0\t0\t0\t\t{m.centroid_xyz}")
    return seconds


def _study_params(i: int, seed: int) -> dict[str, Any]:
    """Varied lesion count, size range, noise and motion (deterministic in the seed)."""
    rng = np.random.default_rng(seed)
    return {
        "n_lesions": int(rng.integers(1, 11)),
        "lesion_diameter_mm": (5.0, 70.0) if i % 3 else (5.0, 25.0),
        "noise_hu": float(rng.choice([8.0, 12.0, 16.0])),
        "max_shift_mm": float(rng.choice([3.0, 6.0, 9.0])),
    }


def summarise(rows: dict, fps: dict, liver_dice: list[float], n: int) -> None:
    """Print the per-band table and the >= 10 mm bars."""
    print(f"{'diameter mm':<12}{'lesions':>8}{'sens':>7}{'FP/st':>7}{'Dice med':>9}"
          f"{'|vol err| med':>14}{'p90':>7}{'signed med':>11}")
    big: list[tuple[bool, float, float]] = []
    for band in BANDS:
        r = rows[band]
        if band[0] >= 10.0:
            big.extend(r)
        if not r:
            continue
        _line(f"{band[0]:>4.0f}-{band[1]:<7.0f}", r, fps[band] / n)
    _line(f"{'>= 10':<12}", big, sum(fps[b] for b in BANDS[1:]) / n)
    print(f"liver Dice: median {np.median(liver_dice):.3f}, min {np.min(liver_dice):.3f}")
    found = [x for x in big if x[0]]
    errs = np.abs([x[2] for x in found]) * 100
    checks = {
        "sens": len(found) / max(len(big), 1) >= BARS["sens"],
        "fp": sum(fps[b] for b in BANDS[1:]) / n <= BARS["fp"],
        "dice": float(np.median([x[1] for x in found])) >= BARS["dice"],
        "err_med": float(np.median(errs)) <= BARS["err_med"],
        "err_p90": float(np.percentile(errs, 90)) <= BARS["err_p90"],
        "liver": float(np.median(liver_dice)) >= BARS["liver"],
    }
    print("bars (>= 10 mm): " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}"
                                           for k, v in checks.items()))


def _line(name: str, r: list[tuple[bool, float, float]], fp: float) -> None:
    found = [x for x in r if x[0]]
    signed = np.array([x[2] for x in found]) * 100 if found else np.array([np.nan])
    errs = np.abs(signed)
    dices = [x[1] for x in found] or [np.nan]
    print(f"{name}{len(r):>8}{len(found) / max(len(r), 1):>7.0%}{fp:>7.2f}"
          f"{np.median(dices):>9.3f}{np.median(errs):>13.1f}%{np.percentile(errs, 90):>6.1f}%"
          f"{np.median(signed):>+10.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--studies", type=int, default=16, help="baselines (each + a TACE follow-up)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--first-seed", type=int, default=1000)
    ap.add_argument("--details", type=Path, help="write one row per lesion (TSV)")
    args = ap.parse_args()
    rows: dict = defaultdict(list)
    fps: dict = defaultdict(int)
    liver_dice: list[float] = []
    details: list[str] = []
    times = []
    categories = ["PR", "MR", "SD", "PD"]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.studies):
            seed = args.first_seed + i
            base = generate_baseline(Path(tmp) / f"b{seed}", seed, size=args.size,
                                     **_study_params(i, seed))
            try:
                follow = generate_follow_up(base, Path(tmp) / f"f{seed}", seed + 500,
                                            tace=True,
                                            target_category=categories[i % len(categories)])
            except RuntimeError:  # that category is out of reach for these lesions
                follow = generate_follow_up(base, Path(tmp) / f"f{seed}", seed + 500,
                                            tace=True)
            for d in (base, follow):
                times.append(evaluate(d, rows, fps, liver_dice, details))
            print(f"  seed {seed} done ({times[-2]:.1f} s, {times[-1]:.1f} s)", flush=True)
            if args.details:
                args.details.write_text(
                    "study\ttruth\td_mm\tlipiodol\tfound\tdice\tvol_err%\tedge_slices\tcentre\n"
                    + "\n".join(details) + "\n", encoding="utf-8")
    n = len(liver_dice)
    print(f"{n} studies ({args.studies} baselines + TACE follow-ups), {args.size}x{args.size}, "
          f"analysis {np.median(times):.1f} s median")
    summarise(rows, fps, liver_dice, n)


if __name__ == "__main__":
    main()
