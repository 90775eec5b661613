"""Segmentation accuracy against the phantom's ground truth.

Generates seeded phantom studies (baselines and TACE follow-ups), runs the analysis, and
prints per size band: detection sensitivity, false positives per study, per-lesion Dice,
volume error (median and 90th percentile of |error|), and liver Dice.

    .venv/bin/python benchmarks/accuracy.py --studies 10 --size 256

A lesion is detected when the node's label with the largest overlap covers part of it;
node lesions overlapping no truth lesion are false positives.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from node.analysis import analyze
from node.phantom import generate_baseline, generate_follow_up, load_truth, load_truth_labels
from node.study.assembly import load_study_dir

BANDS = [(5.0, 10.0), (10.0, 20.0), (20.0, 30.0), (30.0, 200.0)]


def evaluate(study_dir: Path, rows: dict, fps: list[int], liver_dice: list[float]) -> float:
    t0 = time.perf_counter()
    result = analyze(load_study_dir(study_dir / "dicom"))
    seconds = time.perf_counter() - t0
    truth = load_truth(study_dir)
    labels, liver = load_truth_labels(study_dir)
    overlap = (result.liver_mask & liver).sum()
    liver_dice.append(2 * overlap / (result.liver_mask.sum() + liver.sum()))
    matched: set[int] = set()
    for les in truth["lesions"]:
        if les["status"] == "vanished" or les["label"] == 0:
            continue
        gt = labels == les["label"]
        band = next((b for b in BANDS if b[0] <= les["diameter_mm"] < b[1]), None)
        if band is None:
            continue
        hits = result.lesion_labels[gt]
        hits = hits[hits > 0]
        if hits.size == 0:
            rows[band].append((False, 0.0, 0.0))
            continue
        best = int(np.bincount(hits).argmax())
        matched.add(best)
        pred = result.lesion_labels == best
        dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
        vol = next(m.volume_ml for m in result.lesions if m.label == best)
        rows[band].append((True, float(dice), (vol - les["volume_ml"]) / les["volume_ml"]))
    overlapping = set(np.unique(result.lesion_labels[labels > 0]))
    fps.append(sum(1 for m in result.lesions if m.label not in matched | overlapping))
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=10, help="baselines (each + a TACE follow-up)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--first-seed", type=int, default=1000)
    args = ap.parse_args()
    rows: dict = defaultdict(list)
    fps: list[int] = []
    liver_dice: list[float] = []
    times = []
    categories = ["PR", "MR", "SD", "PD"]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.studies):
            seed = args.first_seed + i
            base = generate_baseline(Path(tmp) / f"b{seed}", seed, size=args.size)
            follow = generate_follow_up(base, Path(tmp) / f"f{seed}", seed + 500, tace=True,
                                        target_category=categories[i % len(categories)])
            for d in (base, follow):
                times.append(evaluate(d, rows, fps, liver_dice))
    n = len(fps)
    print(f"{n} studies ({args.studies} baselines + TACE follow-ups), {args.size}x{args.size}, "
          f"analysis {np.median(times):.1f} s median")
    print(f"{'diameter mm':<12}{'lesions':>8}{'sens':>7}{'Dice med':>9}{'|vol err| med':>14}"
          f"{'p90':>7}")
    for band in BANDS:
        r = rows[band]
        if not r:
            continue
        found = [x for x in r if x[0]]
        errs = np.abs([x[2] for x in found]) * 100 if found else np.array([np.nan])
        dices = [x[1] for x in found] or [np.nan]
        print(f"{band[0]:>4.0f}-{band[1]:<7.0f}{len(r):>8}{len(found) / len(r):>7.0%}"
              f"{np.median(dices):>9.3f}{np.median(errs):>13.1f}%{np.percentile(errs, 90):>6.1f}%")
    print(f"false positives per study: {np.mean(fps):.2f} ({sum(fps)} in {n})")
    print(f"liver Dice: median {np.median(liver_dice):.3f}, min {np.min(liver_dice):.3f}")


if __name__ == "__main__":
    main()
