"""Stacking sorted CT slices into a regular volume, repairing what can be repaired.

Slices are ordered along the normal of their image plane (PS3.3 C.7.6.2.1.1), never by
Instance Number. Defects are detected and either repaired (and reported) or refused:

- gantry tilt: positions drift in-plane from slice to slice; each slice is shifted back
  onto an orthogonal grid (the usual shear correction);
- missing slices / uneven spacing: the stack is interpolated linearly onto a regular grid at
  the median spacing, as long as no gap exceeds :data:`MAX_GAP_STEPS` spacings;
- non-axial orientation: reported (the volume is kept; its geometry is exact);
- duplicate positions: refused (two acquisitions that were not separated).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from scipy import ndimage

from node.errors import StudyError
from node.study.model import Geometry

#: Tolerances of the geometry checks.
ORIENTATION_TOLERANCE = 1e-3
SPACING_RELATIVE_TOLERANCE = 0.1
#: In-plane drift (fraction of a pixel) from which the stack counts as gantry-tilted.
TILT_MIN_DRIFT_PIXELS = 0.1
#: Largest gap (in median spacings) that is still bridged by interpolation.
MAX_GAP_STEPS = 3.0
#: The slice normal may deviate this much (degrees) from the patient's z axis for "axial".
AXIAL_MAX_DEGREES = 10.0


@dataclass
class Stack:
    """A regular volume made of slices: one dataset per output slice, and what was repaired."""

    datasets: list[Dataset]
    geometry: Geometry
    array: np.ndarray
    notes: list[str] = field(default_factory=list)


def stack_slices(datasets: Sequence[Dataset]) -> Stack:
    """Order, check, repair and stack the slices of one acquisition.

    Parameters
    ----------
    datasets:
        Slices sharing orientation, matrix and pixel spacing (CT Image, or frames of an
        Enhanced CT image split into per-frame datasets).

    Returns
    -------
    Stack
        ``datasets[k]`` is the source of slice ``k`` (nearest source for interpolated slices).

    Raises
    ------
    StudyError
        On non-orthonormal orientation, duplicate positions or a gap too large to bridge.
    """
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    if abs(np.linalg.norm(normal) - 1) > ORIENTATION_TOLERANCE or abs(row_cos @ col_cos) > 0.01:
        raise StudyError("ImageOrientationPatient cosines are not orthonormal")
    pos = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for ds in datasets])
    order = np.argsort(pos @ normal, kind="stable")
    pos, ordered = pos[order], [datasets[i] for i in order]
    z = (pos - pos[0]) @ normal
    steps = np.diff(z)
    if np.any(steps < 1e-3):
        raise StudyError("duplicate slice positions (two acquisitions not separated?)")
    px = [float(v) for v in ordered[0].PixelSpacing]
    notes: list[str] = []
    array = np.empty((len(ordered), int(ordered[0].Rows), int(ordered[0].Columns)),
                     dtype=np.float32)
    for k, ds in enumerate(ordered):
        to_hu(ds, out=array[k])
    drift = (pos - pos[0]) - np.outer(z, normal)
    if np.abs(drift).max() > TILT_MIN_DRIFT_PIXELS * min(px):
        array = _untilt(array, drift, row_cos, col_cos, px)
        angle = math.degrees(math.atan2(float(np.linalg.norm(drift[-1])), float(z[-1])))
        notes.append(f"gantry tilt {angle:.1f} deg corrected (slices shifted in-plane)")
    step = float(np.median(steps))
    if np.max(np.abs(steps - step)) > SPACING_RELATIVE_TOLERANCE * step:
        if steps.max() > MAX_GAP_STEPS * step:
            raise StudyError(f"gap of {steps.max():.1f} mm between slices (spacing "
                             f"{step:.2f} mm): too many slices missing")
        array, ordered, note = _regularise(array, ordered, z, step)
        notes.append(note)
    tilt_from_z = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if tilt_from_z > AXIAL_MAX_DEGREES:
        notes.append(f"non-axial orientation ({_plane_name(normal)}, normal "
                     f"{tilt_from_z:.0f} deg from the patient z axis)")
    geometry = Geometry(
        origin=tuple(float(v) for v in pos[0]),  # type: ignore[arg-type]
        row_cosine=tuple(float(v) for v in row_cos),  # type: ignore[arg-type]
        column_cosine=tuple(float(v) for v in col_cos),  # type: ignore[arg-type]
        slice_normal=tuple(float(v) for v in normal),  # type: ignore[arg-type]
        spacing=(step, px[0], px[1]),
        shape=(array.shape[0], int(ordered[0].Rows), int(ordered[0].Columns)),
    )
    return Stack(ordered, geometry, array, notes)


def _untilt(array: np.ndarray, drift: np.ndarray, row_cos: np.ndarray, col_cos: np.ndarray,
            px: list[float]) -> np.ndarray:
    """Shift every slice in-plane so that the stack lies on an orthogonal grid."""
    out = np.empty_like(array)
    for k in range(array.shape[0]):
        shift = (float(drift[k] @ col_cos) / px[0], float(drift[k] @ row_cos) / px[1])
        out[k] = ndimage.shift(array[k], shift, order=1, mode="nearest")
    return out


def _regularise(array: np.ndarray, datasets: list[Dataset], z: np.ndarray,
                step: float) -> tuple[np.ndarray, list[Dataset], str]:
    """Linear interpolation along the slice axis onto ``0, step, 2 step, ...``."""
    steps = np.diff(z)
    n = int(round(float(z[-1]) / step)) + 1
    grid = np.arange(n) * step
    hi = np.clip(np.searchsorted(z, grid, side="left"), 1, len(z) - 1)
    lo = hi - 1
    w = np.clip((grid - z[lo]) / (z[hi] - z[lo]), 0.0, 1.0).astype(np.float32)
    out = array[lo] * (1 - w)[:, None, None] + array[hi] * w[:, None, None]
    nearest = np.where(w < 0.5, lo, hi)
    multiples = steps / step
    if np.allclose(multiples, np.round(multiples), atol=SPACING_RELATIVE_TOLERANCE):
        missing = int(round(float(multiples.sum()))) - len(steps)
        where = ", ".join(f"{float(z[i]):.1f}" for i in np.nonzero(multiples > 1.5)[0])
        note = (f"{missing} missing slice(s) after z offset(s) {where} mm, "
                "interpolated")
    else:
        note = (f"uneven slice spacing {steps.min():.2f}-{steps.max():.2f} mm, resampled "
                f"to {step:.2f} mm")
    return out.astype(np.float32), [datasets[i] for i in nearest], note


def _plane_name(normal: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(normal)))
    return ("sagittal", "coronal", "axial")[axis] if abs(normal[axis]) > 0.9 else "oblique"


def to_hu(ds: Dataset, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values to Hounsfield units via Rescale Slope / Intercept (PS3.3 C.11.1.1.2).

    The decoded pixels are not cached on the dataset (``pydicom.pixels.pixel_array``), so a
    volume's headers do not hold a second copy of its pixels. ``out``: float32 target.
    """
    slope = np.float32(float(ds.get("RescaleSlope", 1.0) or 1.0))
    intercept = np.float32(float(ds.get("RescaleIntercept", 0.0) or 0.0))
    if out is None:
        out = np.empty((int(ds.Rows), int(ds.Columns)), dtype=np.float32)
    out[...] = pixel_array(ds)
    out *= slope
    out += intercept
    return out
