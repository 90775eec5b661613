"""Contrast phase from the images: aorta, liver and intrahepatic (portal) vessel attenuation.

Structures are found automatically (no header needed):

- aorta: the brightest round, homogeneous blob of aortic size near the left-right middle of
  the body, in front of the spine, found in at least two of the sampled central slices (a
  vertebral body is excluded by its shell of cortical bone, a lipiodol deposit by its
  position and by not running through the slices);
- liver: the largest thick soft-tissue region in the patient's right half of the body, in the
  upper slices (found after an erosion that cuts it off from the muscles);
- portal / hepatic veins: the bright tail (high percentile) of the liver region, i.e. the
  intrahepatic vessels, which enhance strongly only from the portal venous phase on.

The phase follows from enhancement *contrasts* between these structures (tables below), which
depend on physiology rather than on a scanner's kV or a phantom's exact values: in the arterial
phase the aorta is far brighter than the liver and the portal vessels, in the portal venous
phase the aorta-liver gap narrows and the portal vessels reach the aorta, in the delayed phase
everything converges. Near a boundary the aortic attenuation itself decides; across the volumes
of one study, distinct acquisitions keep distinct phases in gap order (:func:`resolve_in_study`).
Orientation comes from the geometry (patient right, anterior, superior), never from the array
layout.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.study.model import Geometry, Phase

#: Unenhanced blood is 30-70 HU, delayed-phase blood >= ~110 HU: an aorta at or above this is
#: contrast-enhanced (HU).
ENHANCED_BLOOD_HU = 100.0
#: Aorta minus liver (HU), lower bound -> phase, checked in order (contrast volumes only).
#: Typical values: arterial 150-250, portal venous 40-90, delayed 0-40.
AORTA_LIVER_TABLE: tuple[tuple[float, Phase], ...] = (
    (110.0, Phase.ARTERIAL),
    (38.0, Phase.PORTAL_VENOUS),
    (-float("inf"), Phase.DELAYED),
)
#: Within this distance (HU) of a boundary of AORTA_LIVER_TABLE, the aortic attenuation alone
#: decides, by AORTA_TABLE (typical: arterial 200-400, portal venous 140-200, delayed 100-140).
GAP_AMBIGUITY_HU = 10.0
AORTA_TABLE: tuple[tuple[float, Phase], ...] = (
    (220.0, Phase.ARTERIAL),
    (138.0, Phase.PORTAL_VENOUS),
    (-float("inf"), Phase.DELAYED),
)
#: Contrast phases in their order in time, and the gap difference (HU) from which two
#: acquisitions of one study are certainly different phases.
CONTRAST_PHASES = (Phase.ARTERIAL, Phase.PORTAL_VENOUS, Phase.DELAYED)
DISTINCT_GAP_HU = 30.0
#: Intrahepatic vessels relative to the aorta, (vessel - liver) / (aorta - liver): below this
#: the portal vessels lag far behind the aorta, i.e. arterial.
PORTAL_LAG_ARTERIAL_MAX = 0.45
#: Aorta candidate shape: equivalent diameter (mm), fill of its bounding circle, SD (HU).
AORTA_DIAMETER_MM = (14.0, 40.0)
AORTA_MIN_ROUNDNESS = 0.55
AORTA_MAX_SD_HU = 45.0
#: A vertebral body looks like an aorta at high thresholds, but a shell of cortical bone
#: (>= CORTICAL_BONE_HU) surrounds it: candidates with more of their BONE_RIM_MM ring in bone
#: than AORTA_MAX_BONE_RIM are bone. The aorta only touches the spine on one side.
CORTICAL_BONE_HU = 450.0
BONE_MARGIN_HU = 150.0
BONE_RIM_MM = 4.0
AORTA_MAX_BONE_RIM = 0.1
#: Position of the aorta's centre: depth from the anterior (0) to the posterior (1) body
#: surface, and distance from the left-right middle as a share of the half-width.
AORTA_DEPTH_RANGE = (0.35, 0.9)
AORTA_MAX_OFF_MIDLINE = 0.3
#: Sampled slices in which the aorta must be found.
AORTA_MIN_SLICES = 2
#: Brightest plausible aorta (HU); denser blobs are bone or calcification.
AORTA_MAX_HU = 600.0
#: Thresholds (HU) at which aorta candidates are separated from their neighbours.
AORTA_THRESHOLDS_HU = (ENHANCED_BLOOD_HU, 150.0, 200.0, 260.0)
#: Pixel size (mm) the measurements work at: finer images are binned (speed, not accuracy).
WORKING_PIXEL_MM = 1.4
#: Soft tissue band for the liver search (HU) and erosion radius (mm) separating organs.
SOFT_TISSUE_HU = (-10.0, 250.0)
LIVER_EROSION_MM = 8.0
LIVER_MIN_AREA_MM2 = 2500.0
#: Percentile of the liver region that samples its vessels.
VESSEL_PERCENTILE = 97.0
#: Lipiodol / calcification: excluded from the liver vessel percentile (HU).
DENSE_HU = 300.0


@dataclass(frozen=True)
class ImageFeatures:
    """Attenuations measured on one volume (HU, None where the structure was not found)."""

    aorta_hu: float | None
    liver_hu: float | None
    vessel_hu: float | None

    def describe(self) -> str:
        """Short human-readable summary for evidence strings."""
        parts = [f"{name} {'?' if v is None else f'{v:.0f}'} HU" for name, v in
                 (("aorta", self.aorta_hu), ("liver", self.liver_hu),
                  ("liver vessels", self.vessel_hu))]
        return ", ".join(parts)


def measure_features(array: np.ndarray, geometry: Geometry) -> ImageFeatures:
    """Aorta, liver and intrahepatic vessel attenuation of one HU volume."""
    liver, vessel = liver_attenuation(array, geometry)
    return ImageFeatures(aorta_attenuation(array, geometry), liver, vessel)


def phase_from_features(f: ImageFeatures) -> tuple[Phase | None, str]:
    """The phase the features indicate, with the reason; None when they are inconclusive."""
    if f.aorta_hu is None or f.aorta_hu < ENHANCED_BLOOD_HU:
        if f.liver_hu is None and f.aorta_hu is None:
            return None, "no aorta and no liver found"
        return Phase.NATIVE, f"no enhanced aorta (>= {ENHANCED_BLOOD_HU:g} HU)"
    if f.liver_hu is None:
        return None, "enhanced aorta but no liver found"
    gap = f.aorta_hu - f.liver_hu
    phase = next(p for bound, p in AORTA_LIVER_TABLE if gap >= bound)
    reason = f"aorta-liver {gap:.0f} HU"
    if min(abs(gap - bound) for bound, _ in AORTA_LIVER_TABLE[:-1]) < GAP_AMBIGUITY_HU:
        # Too close to a boundary: the aorta's own attenuation decides.
        phase = next(p for bound, p in AORTA_TABLE if f.aorta_hu >= bound)
        reason += f" (near a boundary: aorta {f.aorta_hu:.0f} HU decides)"
    if f.vessel_hu is not None and gap > 0:
        lag = (f.vessel_hu - f.liver_hu) / gap
        reason += f", portal lag {lag:.2f}"
        if phase is Phase.PORTAL_VENOUS and lag < PORTAL_LAG_ARTERIAL_MAX / 2:
            phase = Phase.ARTERIAL  # aorta only moderately bright, but portal vessels unlit
    return phase, reason


def resolve_in_study(gaps: Sequence[float], phases: Sequence[Phase]) -> list[Phase]:
    """Phases for a study's contrast volumes that respect their aorta-liver ordering.

    Per-volume rules can give two acquisitions of one study the same phase when a value lies
    near a boundary. Acquisitions whose aorta-liver gaps differ by more than
    :data:`DISTINCT_GAP_HU` are different phases, and a larger gap is an earlier phase. Among
    the assignments that respect this, the one closest to the per-volume table
    (:data:`AORTA_LIVER_TABLE`) wins; without a collision nothing changes.

    Parameters
    ----------
    gaps:
        Aorta minus liver (HU) of each contrast volume.
    phases:
        The per-volume phases (arterial, portal venous or delayed).
    """
    order = sorted(range(len(gaps)), key=lambda i: -gaps[i])
    distinct = all(gaps[order[n]] - gaps[order[n + 1]] > DISTINCT_GAP_HU
                   for n in range(len(order) - 1))
    if len(set(phases)) == len(phases) or not distinct or len(gaps) > len(CONTRAST_PHASES):
        return list(phases)
    best: tuple[float, int, tuple[Phase, ...]] | None = None
    for combo in itertools.combinations(CONTRAST_PHASES, len(gaps)):
        assigned = dict(zip(order, combo, strict=True))
        cost = sum(_distance_to_phase(gaps[i], assigned[i]) for i in order)
        changes = sum(assigned[i] is not phases[i] for i in order)
        cand = (cost, changes, tuple(assigned[i] for i in range(len(gaps))))
        if best is None or cand[:2] < best[:2]:
            best = cand
    return list(best[2]) if best is not None else list(phases)


def _distance_to_phase(gap: float, phase: Phase) -> float:
    """HU from ``gap`` to the interval that :data:`AORTA_LIVER_TABLE` gives ``phase``."""
    upper = float("inf")
    for bound, p in AORTA_LIVER_TABLE:
        if p is phase:
            return max(0.0, bound - gap, gap - upper)
        upper = bound
    return float("inf")


def _bin_factor(dy: float, dx: float) -> int:
    """In-plane binning that brings the pixels to about :data:`WORKING_PIXEL_MM`."""
    return max(1, int(round(WORKING_PIXEL_MM / min(dy, dx))))


def _binned(image: np.ndarray, f: int) -> np.ndarray:
    """Block mean over f x f pixels (edges that do not fill a block are dropped)."""
    if f == 1:
        return image
    r, c = image.shape[0] // f * f, image.shape[1] // f * f
    return np.asarray(image[:r, :c].reshape(r // f, f, c // f, f).mean(axis=(1, 3)))


def _central_slices(nz: int, fractions: tuple[float, ...]) -> list[int]:
    return sorted({min(nz - 1, int(nz * f)) for f in fractions})


def aorta_attenuation(array: np.ndarray, geometry: Geometry) -> float | None:
    """Median HU of the enhanced aorta in the central slices, None if none is found."""
    _, dy, dx = geometry.spacing
    f = _bin_factor(dy, dx)
    posterior_is_high_row = geometry.column_cosine[1] >= 0  # LPS: +y is posterior
    values: list[float] = []
    for k in _central_slices(array.shape[0], (0.3, 0.4, 0.5, 0.6, 0.7)):
        best = _aorta_in_slice(_binned(array[k], f), dy * f, dx * f, posterior_is_high_row)
        if best is not None:
            values.append(best)
    # The aorta is a tube through every abdominal slice; a blob in one slice is something else
    # (a lipiodol deposit, a calcification).
    return float(np.median(values)) if len(values) >= AORTA_MIN_SLICES else None


def _aorta_in_slice(slice_hu: np.ndarray, dy: float, dx: float,
                    posterior_is_high_row: bool) -> float | None:
    """Brightest aorta-like blob of one slice (median HU), None if there is none."""
    img = ndimage.uniform_filter(slice_hu, size=3)
    body = img > -300
    if body.sum() < 100:
        return None
    allowed = _aorta_zone(body, posterior_is_high_row)
    best: float | None = None
    # Inside a closed shell of cortical bone: a vertebral body, however round and homogeneous.
    enclosed = ndimage.binary_fill_holes(ndimage.binary_closing(img > CORTICAL_BONE_HU))
    # Several thresholds: at a low one the aorta may merge with the vertebra (cancellous bone
    # ~250 HU) or the crus; a higher one separates them when the aorta is brighter.
    for threshold in AORTA_THRESHOLDS_HU:
        labels, _ = ndimage.label((img > threshold) & (img < AORTA_MAX_HU))
        found = _best_round_blob(slice_hu, labels * ~enclosed, dy, dx, allowed)
        if found is not None and (best is None or found > best):
            best = found
    return best


def _aorta_zone(body: np.ndarray, posterior_is_high_row: bool) -> np.ndarray:
    """Where the aorta's centre may lie: near the left-right middle, in front of the spine."""
    rows = np.nonzero(body.any(axis=1))[0]
    cols = np.nonzero(body.any(axis=0))[0]
    mid, half = (cols[0] + cols[-1]) / 2.0, (cols[-1] - cols[0]) / 2.0
    depth = (np.arange(body.shape[0]) - rows[0]) / max(1, rows[-1] - rows[0])
    if not posterior_is_high_row:
        depth = 1.0 - depth
    lo, hi = AORTA_DEPTH_RANGE
    row_ok = (depth >= lo) & (depth <= hi)
    col_ok = np.abs(np.arange(body.shape[1]) - mid) <= AORTA_MAX_OFF_MIDLINE * half
    return np.asarray(row_ok[:, None] & col_ok[None, :])


def _best_round_blob(slice_hu: np.ndarray, labels: np.ndarray, dy: float, dx: float,
                     allowed: np.ndarray) -> float | None:
    """Median HU of the brightest labelled blob with the aorta's size, shape and position."""
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
        centre = (int((sl[0].start + sl[0].stop) / 2), int((sl[1].start + sl[1].stop) / 2))
        inner = ndimage.binary_erosion(region, iterations=2)
        vals = slice_hu[sl][inner if inner.any() else region]
        if (roundness < AORTA_MIN_ROUNDNESS or not allowed[centre]
                or vals.std() > AORTA_MAX_SD_HU
                or _bone_rim_fraction(slice_hu, labels == lab, sl, dy, dx) > AORTA_MAX_BONE_RIM):
            continue
        med = float(np.median(vals))
        best = med if best is None else max(best, med)
    return best


def _bone_rim_fraction(slice_hu: np.ndarray, region: np.ndarray, sl: tuple[slice, ...],
                       dy: float, dx: float) -> float:
    """Share of a thin ring around a blob that is cortical bone (a vertebral body's shell)."""
    r = max(1, int(round(BONE_RIM_MM / min(dy, dx))))
    window = tuple(slice(max(0, s.start - r - 1), s.stop + r + 1) for s in sl)
    blob = region[window]
    ring = ndimage.binary_dilation(blob, iterations=r) & ~blob
    if not ring.any():
        return 0.0
    # Denser than the blob itself by a margin: a very bright aorta's own edge never is.
    dense = max(CORTICAL_BONE_HU, float(np.median(slice_hu[window][blob])) + BONE_MARGIN_HU)
    return float(np.mean(slice_hu[window][ring] > dense))


def liver_attenuation(array: np.ndarray, geometry: Geometry) -> tuple[float | None,
                                                                       float | None]:
    """(median liver HU, intrahepatic vessel HU) from the upper slices, None if not found."""
    _, dy, dx = geometry.spacing
    f = _bin_factor(dy, dx)
    # Patient right is -x in LPS; which column direction points there follows from the
    # row cosine (PS3.3 C.7.6.2.1.1), so flipped or rotated images are handled alike.
    right_is_low_col = geometry.row_cosine[0] > 0
    superior_is_high_k = geometry.slice_normal[2] > 0
    fractions = (0.55, 0.65, 0.75) if superior_is_high_k else (0.25, 0.35, 0.45)
    liver_vals: list[np.ndarray] = []
    for k in _central_slices(array.shape[0], fractions):
        img = _binned(array[k], f)
        region = _liver_region(img, dy * f, dx * f, right_is_low_col)
        if region is not None:
            liver_vals.append(img[region])
    if not liver_vals:
        return None, None
    vals = np.concatenate(liver_vals)
    soft = vals[vals < DENSE_HU]
    if soft.size == 0:
        return None, None
    return float(np.median(soft)), float(np.percentile(soft, VESSEL_PERCENTILE))


def _liver_region(slice_hu: np.ndarray, dy: float, dx: float,
                  right_is_low_col: bool) -> np.ndarray | None:
    """Largest thick soft-tissue region in the patient's right half of one slice."""
    img = ndimage.uniform_filter(slice_hu, size=3)
    body = ndimage.binary_fill_holes(img > -300)
    if body.sum() < 100:
        return None
    cols = np.nonzero(body.any(axis=0))[0]
    mid = int((cols[0] + cols[-1]) / 2)
    soft = (img > SOFT_TISSUE_HU[0]) & (img < SOFT_TISSUE_HU[1]) | (img >= DENSE_HU)
    half = np.zeros_like(soft)
    if right_is_low_col:
        half[:, :mid] = True
    else:
        half[:, mid:] = True
    r = max(1, int(round(LIVER_EROSION_MM / min(dy, dx))))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    core = ndimage.binary_erosion(soft & half & body, structure=(yy**2 + xx**2) <= r * r)
    labels, n = ndimage.label(core)
    if n == 0:
        return None
    sizes = ndimage.sum(core, labels, index=np.arange(1, n + 1))
    best = int(np.argmax(sizes)) + 1
    if sizes[best - 1] * dy * dx < LIVER_MIN_AREA_MM2 / 4:
        return None
    region = ndimage.binary_dilation(labels == best, iterations=r) & soft & body
    if region.sum() * dy * dx < LIVER_MIN_AREA_MM2:
        return None
    return np.asarray(region)
