"""PNG overlays of the analysis: the key slice of the largest lesions, one image per phase.

The liver outline is drawn in green, lesion outlines in red, on a soft-tissue window
(W 400 / L 40). PNGs are written with SimpleITK (no plotting library needed).

    .venv/bin/python benchmarks/overlays.py STUDY_DIR OUT_DIR [--lesions 3]

STUDY_DIR is anything :func:`node.study.assembly.load_study_dir` reads, e.g.
``../shared/data/HCC-TACE-Seg/HCC_007/03-14-1998-NA-CT ABDOMEN WWO CONT-48924``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from node.analysis import analyze
from node.analysis.register import align_to_reference
from node.study.assembly import load_study_dir
from node.study.model import Study

GREEN = np.array([0, 220, 0], dtype=np.uint8)
RED = np.array([255, 40, 40], dtype=np.uint8)


def _window(slice_hu: np.ndarray, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    g = np.clip((slice_hu - (level - width / 2)) / width, 0.0, 1.0) * 255.0
    return np.repeat(g.astype(np.uint8)[..., None], 3, axis=-1)


def _edge(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def write_png(rgb: np.ndarray, path: Path) -> None:
    """Write an (rows, columns, 3) uint8 image as PNG."""
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))


def phase_slices(study: Study, k: int) -> dict[str, np.ndarray]:
    """Slice ``k`` of every phase on the reference grid (others aligned rigidly)."""
    ref = study.reference
    out = {ref.phase.value: ref.array[k]}
    for phase, vol in study.volumes.items():
        if vol is ref:
            continue
        al = align_to_reference(vol.array, vol.geometry, ref.array, ref.geometry)
        out[phase.value] = al.array[k]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("study_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--lesions", type=int, default=3, help="how many of the largest lesions")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    study = load_study_dir(args.study_dir)
    result = analyze(study)
    print(f"liver {result.liver_volume_ml:.0f} ml, {len(result.lesions)} lesions")
    for les in sorted(result.lesions, key=lambda m: -m.volume_ml)[: args.lesions]:
        k = les.key_slice
        print(f"{les.tracking_id}: {les.volume_ml:.1f} ml, slice {k}, "
              f"lipiodol {les.lipiodol_volume_ml or 0:.1f} ml, {les.phase_behaviour}")
        for name, img in phase_slices(study, k).items():
            rgb = _window(img)
            rgb[_edge(result.liver_mask[k])] = GREEN
            rgb[_edge(result.lesion_labels[k] > 0)] = RED
            path = args.out_dir / f"{les.tracking_id.replace(' ', '_')}_k{k}_{name}.png"
            write_png(rgb, path)
            print(f"  {path}")


if __name__ == "__main__":
    main()
