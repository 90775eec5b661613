"""Ground truth of a phantom study: the response rule, and reading/writing truth files.

The volumetric response rule of the source study is implemented here on its own (the phantom
must not borrow it from the analysis it tests), with one unambiguous reading of its overlapping
boundaries (change = current total / prior total - 1):

- CR if the current total is 0 and the prior total > 0;
- PR if change <= -50 %;
- MR if -50 % < change <= -25 %;
- PD if change >= +25 %;
- SD otherwise (strictly between -25 % and +25 %).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

TRUTH_JSON = "truth.json"
TRUTH_LABELS = "truth_labels.npz"
CATEGORIES: tuple[str, ...] = ("CR", "PR", "MR", "SD", "PD")

#: For a requested category, the interval the total volume change is drawn from: every
#: interval keeps >= 8 percentage points from each boundary, so measurement error of a few
#: percent cannot flip the category.
TARGET_CHANGE: dict[str, tuple[float, float]] = {
    "PR": (-0.85, -0.60),
    "MR": (-0.42, -0.33),
    "SD": (-0.15, 0.15),
    "PD": (0.35, 0.90),
}


def volumetric_category(prior_total_ml: float, current_total_ml: float) -> str:
    """Category of the source study's volumetric rule (see the module docstring)."""
    if prior_total_ml <= 0:
        raise ValueError("prior_total_ml must be > 0 to grade a response")
    if current_total_ml < 0:
        raise ValueError("current_total_ml must be >= 0")
    if current_total_ml == 0:
        return "CR"
    change = current_total_ml / prior_total_ml - 1.0
    if change <= -0.5:
        return "PR"
    if change <= -0.25:
        return "MR"
    if change >= 0.25:
        return "PD"
    return "SD"


def write_truth(
    study_dir: Path, truth: dict[str, Any], lesions: np.ndarray, liver: np.ndarray
) -> None:
    """Write ``truth.json`` and ``truth_labels.npz`` into ``study_dir``."""
    (study_dir / TRUTH_JSON).write_text(json.dumps(truth, indent=1, sort_keys=False) + "\n")
    np.savez_compressed(study_dir / TRUTH_LABELS, lesions=lesions, liver=liver.astype(bool))


def load_truth(study_dir: Path) -> dict[str, Any]:
    """The parsed ``truth.json`` of a phantom study directory."""
    path = Path(study_dir) / TRUTH_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no {TRUTH_JSON} in {study_dir}")
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def load_truth_labels(study_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(lesion label map, liver mask) on the portal venous grid, slice 0 = most inferior."""
    with np.load(Path(study_dir) / TRUTH_LABELS) as npz:
        return npz["lesions"], npz["liver"].astype(bool)
