"""Characterisation of a lesion over the phases: attenuation, enhancement, viable/necrotic/lipiodol.

Everything is measured on the reference grid with the phases already aligned. Thresholds come
from the image (the liver parenchyma's own noise) and the rules are data (:data:`RULES`):

- lipiodol: denser than the liver by ``lipiodol_hu`` and ``lipiodol_z`` SD in EVERY phase,
  the plain scan included (the same rule as detection), and above half the deposit's plateau
  contrast (its partial-volume border counts half). It is part of the lesion's volume and is
  never enhancement;
- enhancing (viable) tissue: with a plain scan, a voxel whose in-plane smoothed attenuation in
  some contrast phase exceeds its plain-scan attenuation by ``enhancing_z`` x the noise SD of
  that difference over the liver (at least ``enhancing_min_hu``) and by half the lesion's
  plateau enhancement (the half-contrast border between viable and necrotic); without a plain
  scan, a voxel not darker than the liver by ``necrosis_liver_z`` SD in every contrast phase;
- necrotic: the rest of the lesion (non-enhancing tissue);
- phase behaviour: the viable part's mean HU against the liver median, "hyper" / "hypo" beyond
  ``behaviour_hu`` (at least ``behaviour_z`` liver SD), else "iso";
- size pattern (the source study's description): homogeneous < 2 cm, heterogeneous 2-3 cm,
  necrotic > 3 cm, by the longest axial diameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from node.analysis.liver import robust_stats
from node.analysis.results import LesionMeasurement
from node.study.model import Geometry, Phase

RULES: dict[str, float] = {
    "smooth_mm": 1.5,  # in-plane smoothing before voxel classification (noise)
    "lipiodol_hu": 70.0,
    "lipiodol_z": 6.0,
    "lipiodol_plateau_pct": 90.0,  # the deposit's plateau; its border is at half of it
    "enhancing_z": 3.0,
    "enhancing_min_hu": 10.0,
    "viable_plateau_pct": 90.0,  # the viable tissue's plateau enhancement; border at half
    "necrosis_liver_z": 3.0,
    "behaviour_hu": 10.0,
    "behaviour_z": 1.0,
}
#: (upper bound of the longest axial diameter in mm, pattern), first match wins.
SIZE_PATTERNS: tuple[tuple[float, str], ...] = (
    (20.0, "homogeneous"),
    (30.0, "heterogeneous"),
    (float("inf"), "necrotic"),
)
NATIVE = Phase.NATIVE.value


@dataclass(frozen=True)
class PhaseContext:
    """What the characterisation needs of a study: smoothed phases and liver statistics.

    ``smoothed`` maps Phase.value to the in-plane smoothed HU volume; ``liver_median`` and
    ``liver_sd`` are the liver parenchyma's median and robust SD per phase (smoothed image);
    ``diff_sd`` the robust SD over the liver of (phase - plain scan), per contrast phase.
    """

    raw: Mapping[str, np.ndarray]
    smoothed: Mapping[str, np.ndarray]
    liver_median: Mapping[str, float]
    liver_sd: Mapping[str, float]
    diff_sd: Mapping[str, float]


def phase_context(arrays: Mapping[str, np.ndarray], parenchyma: np.ndarray,
                  geometry: Geometry, region: np.ndarray | None = None) -> PhaseContext:
    """Smooth every phase and measure the liver parenchyma (``parenchyma``: bool mask).

    ``region`` (bool, optional) marks the other voxels whose smoothed values will be read
    (the lesions): only the bounding box of it and the parenchyma is smoothed, NaN elsewhere.
    Four thin-slice phases cost ~5 s to smooth whole, and the liver's box is a fraction.
    """
    from node.analysis.liver import smooth_inplane

    box: tuple[slice, ...] = tuple(slice(0, n) for n in parenchyma.shape)
    if region is not None and parenchyma.any():
        box = ndimage.find_objects(np.asarray(parenchyma | region, dtype=bool).view(np.uint8))[0]
    sm: dict[str, np.ndarray] = {}
    for k, a in arrays.items():
        sm[k] = np.full(a.shape, np.nan, dtype=np.float32)
        sm[k][box] = smooth_inplane(np.asarray(a, dtype=np.float32), geometry,
                                    RULES["smooth_mm"], box)
    med: dict[str, float] = {}
    sd: dict[str, float] = {}
    diff: dict[str, float] = {}
    for k, a in sm.items():
        if parenchyma.any():
            med[k], sd[k] = robust_stats(a[parenchyma])
        else:
            med[k], sd[k] = float(np.median(a)), 10.0
        sd[k] = max(sd[k], 1.0)
        if NATIVE in sm and k != NATIVE and parenchyma.any():
            diff[k] = max(robust_stats(a[parenchyma] - sm[NATIVE][parenchyma])[1], 1.0)
    return PhaseContext(arrays, sm, med, sd, diff)


def largest_diameter_3d(mask: np.ndarray, geometry: Geometry) -> float:
    """Longest distance (mm) between two voxel centres of the mask, plus one voxel width.

    Computed over the convex hull of the voxel centres in patient-scaled index space.
    """
    pts = np.argwhere(mask).astype(float) * np.asarray(geometry.spacing, dtype=float)
    if len(pts) < 2:
        return float(min(geometry.spacing[1:]))
    try:
        hull = pts[ConvexHull(pts).vertices] if len(pts) >= 5 else pts
    except QhullError:  # flat (one slice) or collinear: 2D hull on the in-plane points
        hull = pts
        if len(pts) > 2000:
            hull = pts[:: len(pts) // 2000 + 1]
    d = np.sqrt(((hull[:, None, :] - hull[None, :, :]) ** 2).sum(-1))
    return float(d.max()) + float(min(geometry.spacing[1:]))


def _tissue_classes(mask: np.ndarray, ctx: PhaseContext) -> tuple[np.ndarray, np.ndarray]:
    """(lipiodol, enhancing) voxel masks inside ``mask`` (both bool, mask-shaped)."""
    lip = mask.copy()
    devs = {k: a - ctx.liver_median[k] for k, a in ctx.smoothed.items()}
    for k, dev in devs.items():
        lip &= (dev > RULES["lipiodol_hu"]) & (dev > RULES["lipiodol_z"] * ctx.liver_sd[k])
    if lip.any():
        # Half the deposit's own plateau contrast: the partial-volume border counts half.
        for dev in devs.values():
            plateau = float(np.percentile(dev[lip], RULES["lipiodol_plateau_pct"]))
            lip &= dev > 0.5 * plateau
    if len(ctx.smoothed) < 2:  # one phase cannot tell lipiodol from enhancement
        lip[:] = False
    contrast = [k for k in ctx.smoothed if k != NATIVE]
    enh = np.zeros_like(mask)
    if NATIVE in ctx.smoothed and contrast:
        base = ctx.smoothed[NATIVE]
        # Enhancement in units of each phase's noise threshold; the strongest phase counts.
        rel = np.max([(ctx.smoothed[k] - base)
                      / max(RULES["enhancing_z"] * ctx.diff_sd[k], RULES["enhancing_min_hu"])
                      for k in contrast], axis=0)
        tissue = mask & ~lip
        # Viable/necrotic border at half the viable plateau (partial volume of the blur).
        plateau = float(np.percentile(rel[tissue], RULES["viable_plateau_pct"])) \
            if tissue.any() else 0.0
        enh = rel > max(1.0, 0.5 * plateau)
    else:
        enh = mask.copy()
        if contrast:
            dark = np.ones_like(mask)
            for k in contrast:
                dark &= ctx.smoothed[k] < (ctx.liver_median[k]
                                           - RULES["necrosis_liver_z"] * ctx.liver_sd[k])
            enh &= ~dark
    return lip & mask, enh & mask & ~lip


def characterise(m: LesionMeasurement, mask: np.ndarray, ctx: PhaseContext,
                 geometry: Geometry) -> None:
    """Fill the characterisation fields of ``m`` (in place) from the lesion's ``mask``."""
    vox_ml = geometry.voxel_volume_ml
    box = ndimage.find_objects(mask.astype(np.int8))[0]  # work on the lesion's box only
    mask = mask[box]
    ctx = PhaseContext({k: a[box] for k, a in ctx.raw.items()},
                       {k: a[box] for k, a in ctx.smoothed.items()},
                       ctx.liver_median, ctx.liver_sd, ctx.diff_sd)
    m.largest_diameter_3d_mm = largest_diameter_3d(mask, geometry)
    m.sd_hu = {k: float(a[mask].std()) for k, a in sorted(ctx.raw.items())}
    native = ctx.raw.get(NATIVE)
    if native is not None:
        base = float(native[mask].mean())
        m.enhancement_vs_native_hu = {k: float(a[mask].mean()) - base
                                      for k, a in sorted(ctx.raw.items()) if k != NATIVE}
    m.enhancement_vs_liver_hu = {k: float(a[mask].mean()) - ctx.liver_median[k]
                                 for k, a in sorted(ctx.raw.items())}
    lip, enh = _tissue_classes(mask, ctx)
    n = int(mask.sum())
    n_lip, n_enh = int(lip.sum()), int(enh.sum())
    n_nec = n - n_lip - n_enh
    m.lipiodol_volume_ml = n_lip * vox_ml
    m.enhancing_volume_ml = n_enh * vox_ml
    m.necrotic_volume_ml = n_nec * vox_ml
    m.necrotic_fraction = n_nec / n if n else 0.0
    m.size_pattern = next(p for lim, p in SIZE_PATTERNS if m.longest_diameter_mm < lim)
    viable = enh if n_enh else mask & ~lip
    m.phase_behaviour = {}
    if viable.any():
        for k, a in sorted(ctx.raw.items()):
            if k == NATIVE:
                continue
            diff = float(a[viable].mean()) - ctx.liver_median[k]
            thr = max(RULES["behaviour_hu"], RULES["behaviour_z"] * ctx.liver_sd[k])
            m.phase_behaviour[k] = "hyper" if diff > thr else "hypo" if diff < -thr else "iso"
