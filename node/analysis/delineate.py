"""Delineation of one detected lesion: signatures, partial-volume fraction, border.

Each voxel's partial-volume fraction is estimated by unmixing its deviation vector (from the
liver median, per phase) into the lesion's own signatures (matched filter over phases); the
lesion is where that fraction is >= 0.5, the half-contrast level, and its voxel count is its
volume. On 5 mm slices the half level samples a lesion's cross-section at the slice centres
(Cavalieri's estimator: unbiased), unless the analysis moves the border itself. In-plane
smoothing does: the half level of a Gaussian-smoothed image lies sigma^2 * curvature / 2
inside the border, so each closed contour loses pi * sigma^2 of area whatever its shape (5-15 %
of a 10-20 mm lesion at the 1.5 mm detection smoothing). The border is therefore placed on a
less smoothed fraction map and the remaining loss given back (:func:`compensate_smoothing`).

Partial-volume sums (over a border band, or over a lesion's first and last slice, where the
half level of a 5 mm slice is all or nothing) are blur-free in principle but were less
accurate on the phantoms: they also count what else lies in the band (vessel edges, a
neighbour, a few HU of local liver inhomogeneity over a hundred voxels) and scale with the
signature's error, which for a 10 mm lesion (no voxel fully inside it after blurring) is
10-20 %.

Two kinds of voxels need more than the liver median as reference:

* within a slice or so of fat, lung or air above or below (the liver's dome and tip, a
  fissure, an organ's fat capsule), hypo-density is partial volume with that tissue
  (``no_hypo``, see :func:`node.analysis.lesions.near_fat_in_z`): there only the other
  evidence of the voxel and of the signatures is compared;
* lipiodol (after TACE) is hundreds of HU above liver and its blur covers most of a small
  lesion: the tissue signature is measured across the lipiodol direction, so that what lies
  around a deposit is unmixed into lipiodol plus the tumour's own tissue, both lesion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from node.analysis.liver import with_reach
from node.study.model import Geometry, Phase

PARAMS: dict[str, Any] = {
    "half_level": 0.5,  # partial-volume fraction at the lesion border
    "border_smooth_mm": 0.75,  # in-plane sigma of the fraction map that places the border
    "border_reach_sigmas": 2.0,  # ...within this many detection sigmas of the first border
    "core_percentile": 75.0,  # signature from the component's voxels above this percentile
    "min_group_share": 0.1,  # a tissue signature group needs this share of the tissue core
    "lipiodol_rim_voxels": 2,  # lipiodol's blurred rim: tissue signatures from beyond it
}


@dataclass(frozen=True)
class Evidence:
    """What the delineation of every candidate of one study works on (one array box)."""

    devs: Mapping[Phase, np.ndarray]  # deviation from the liver median, detection smoothing
    fine: Mapping[Phase, np.ndarray]  # the same at the border smoothing
    sds: Mapping[Phase, float]  # liver SD per phase (of ``devs``)
    lipiodol: np.ndarray  # lipiodol map
    search: np.ndarray  # where a lesion may extend (vessels excluded)
    no_hypo: np.ndarray  # hypo-density is partial volume with fat / lung / air here
    geometry: Geometry
    smooth_mm: float  # in-plane sigma of the detection smoothing
    min_score: float  # a signature must be this strong (seed score, in SD)


@dataclass(frozen=True)
class Delineation:
    """One delineated candidate, in the array box ``box``."""

    box: tuple[slice, ...]
    mask: np.ndarray  # half level at the detection smoothing
    border: np.ndarray  # half level at the border smoothing (the lesion)
    frac: np.ndarray  # lesion fraction at the border smoothing


def grow_box(sl: tuple[slice, ...], shape: tuple[int, ...], geometry: Geometry,
             margin_mm: float) -> tuple[slice, ...]:
    """Bounding box enlarged by ``margin_mm`` (at least one voxel) on every side."""
    reach = [max(1, int(np.ceil(margin_mm / sp))) for sp in geometry.spacing]
    return with_reach(sl, reach, shape)[0]


def delineate(labels: np.ndarray, lab: int, sl: tuple[slice, ...],
              ev: Evidence) -> Delineation | None:
    """Half-contrast delineation of seed component ``lab`` by matched filtering of signatures.

    ``ev.search`` excludes vessels, so an adjacent enhancing vessel is not absorbed. The
    candidate is delineated on ``ev.devs`` (detection smoothing); its border is then placed
    again on ``ev.fine`` (border smoothing), see :func:`_place_border`.
    """
    geometry = ev.geometry
    extent = max((s.stop - s.start) * sp for s, sp in zip(sl[1:], geometry.spacing[1:],
                                                          strict=True))
    box = grow_box(sl, labels.shape, geometry, extent + 2 * ev.smooth_mm + 3.0)
    comp = labels[box] == lab
    d = np.stack([ev.devs[p][box] for p in ev.devs])  # (phases, z, y, x)
    w = np.array([1.0 / ev.sds[p] ** 2 for p in ev.devs], dtype=np.float32)
    lip = ev.lipiodol[box]
    tissue_d = d
    if (comp & lip).any():
        # Around a deposit a voxel is tissue plus blurred lipiodol: measured across the
        # lipiodol direction, what is left is the tissue's own signature.
        tissue_d = _across(d, np.median(d[:, comp & lip], axis=1), w)
    sigs = []
    for group in _signature_groups(comp, tissue_d, lip, list(ev.devs)):
        # The group's plateau deviation per phase.
        sig = np.median((d if (group & lip).any() else tissue_d)[:, group], axis=1)
        # A weak signature would turn noise into large fractions: it must be seed-strong.
        if float(np.sum(w * sig * sig)) >= ev.min_score ** 2:
            sigs.append(sig)
    if not sigs:
        return None
    sig_matrix = np.stack(sigs, axis=1)
    no_hypo = ev.no_hypo[box]
    mask = _half_level_region(unmix_fraction(d, sig_matrix, w, no_hypo, ev.min_score), comp,
                              ev.search[box])
    if mask is None:
        return None
    mask = _fill_holes(mask)
    fine = np.stack([ev.fine[p][box] for p in ev.devs])
    frac = unmix_fraction(fine, sig_matrix, w, no_hypo, ev.min_score)
    reach = PARAMS["border_reach_sigmas"] * ev.smooth_mm
    border = _place_border(frac, mask, ev.search[box], geometry, reach)
    return Delineation(box=box, mask=mask, border=border, frac=frac)


def _across(d: np.ndarray, direction: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``d`` (phases first) without its component along ``direction`` (weights ``w``)."""
    wd = w * direction
    coef = np.tensordot(wd, d, axes=1) / float(np.sum(wd * direction))
    return d - direction.reshape(-1, *([1] * (d.ndim - 1))) * coef[None]


def unmix_fraction(d: np.ndarray, sigs: np.ndarray, w: np.ndarray, no_hypo: np.ndarray,
                   min_score: float) -> np.ndarray:
    """Lesion fraction per voxel by non-negative linear unmixing of the lesion's signatures.

    Each voxel's deviation vector over the phases is modelled as a non-negative mix of the
    lesion's signatures (columns of ``sigs``, e.g. enhancing tissue, necrosis, lipiodol) plus
    liver (zero deviation); the lesion fraction is the sum of the mix weights. A voxel that is
    part tissue, part blurred lipiodol then counts fully, where projecting on either signature
    alone would leave it below the half level. Weighted least squares (weights ``w`` = 1 /
    liver variance per phase), the non-negative solution found over every subset of
    signatures (at most three, so at most seven small solves).

    Where ``no_hypo`` is set, the hypo-dense parts of the voxel's deviations and of the
    signatures are left out, so only the remaining evidence is compared; a signature with
    less than ``min_score`` of it left explains nothing there (it would turn noise into
    large fractions).
    """
    flat = d.reshape(d.shape[0], -1).T  # (voxels, phases)
    frac = np.zeros(flat.shape[0], dtype=np.float32)
    clip = no_hypo.ravel()
    frac[~clip] = _fit_sum(flat[~clip], sigs, w, min_score)
    if clip.any():
        frac[clip] = _fit_sum(np.maximum(flat[clip], 0.0), np.maximum(sigs, 0.0), w,
                              min_score)
    return frac.reshape(d.shape[1:])


def _fit_sum(x: np.ndarray, sigs: np.ndarray, w: np.ndarray, min_score: float) -> np.ndarray:
    """Sum of the non-negative weights of ``sigs`` (phases, k) that fit ``x`` (voxels, phases)."""
    best_res = np.full(x.shape[0], np.inf, dtype=np.float32)
    best_sum = np.zeros(x.shape[0], dtype=np.float32)
    strong = np.flatnonzero(np.sum(w[:, None] * sigs**2, axis=0) >= min_score**2)
    for bits in range(1, 2 ** strong.size):
        s = sigs[:, [int(strong[j]) for j in range(strong.size) if bits >> j & 1]]
        gram = s.T @ (w[:, None] * s)
        if abs(np.linalg.det(gram)) < 1e-9:
            continue
        coef = np.linalg.solve(gram, (s.T * w) @ x.T)  # (len(cols), voxels)
        res = np.sum(w * (x - (s @ coef).T) ** 2, axis=1)
        ok = np.all(coef >= 0, axis=0) & (res < best_res)
        best_res[ok] = res[ok]
        best_sum[ok] = coef[:, ok].sum(axis=0)
    return best_sum


def _half_level_region(frac: np.ndarray, comp: np.ndarray,
                       search: np.ndarray) -> np.ndarray | None:
    """Voxels at or above the half level that are connected to the seed component."""
    inside = (frac >= PARAMS["half_level"]) & search
    lab_in, _ = ndimage.label(inside)
    keep = np.unique(lab_in[comp & inside])
    mask = np.isin(lab_in, keep[keep > 0])
    return mask if mask.any() else None


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Holes filled in 3D, then per slice (a slice of a lesion is one disk-like region)."""
    mask = ndimage.binary_fill_holes(mask)
    for k in range(mask.shape[0]):
        mask[k] = ndimage.binary_fill_holes(mask[k])
    return mask


def _place_border(frac: np.ndarray, mask: np.ndarray, search: np.ndarray,
                  geometry: Geometry, reach: float) -> np.ndarray:
    """The half level of the less smoothed fraction ``frac`` near the border of ``mask``.

    Only voxels within ``reach`` (mm) of the detection smoothing (in plane, and one slice
    above and below, where a slice cut near the lesion's pole may pass the half level once
    less smoothed) can join; parts not touching ``mask`` are noise and are left out.
    """
    _, dy, dx = geometry.spacing
    ry, rx = int(np.ceil(reach / dy)), int(np.ceil(reach / dx))
    yy, xx = np.mgrid[-ry:ry + 1, -rx:rx + 1]
    disk = (yy * dy) ** 2 + (xx * dx) ** 2 <= reach**2
    zone = ndimage.binary_dilation(mask, structure=disk[None])
    zone |= ndimage.binary_dilation(mask, structure=np.array([1, 1, 1], bool)[:, None, None])
    region = _half_level_region(frac, mask, search & zone)
    return mask if region is None else _fill_holes(region)


def compensate_smoothing(mask: np.ndarray, frac: np.ndarray, free: np.ndarray,
                         geometry: Geometry) -> np.ndarray:
    """Grow ``mask`` by the area that its in-plane smoothing took from each closed contour.

    The half level of an image smoothed in plane with a Gaussian of SD sigma lies
    sigma^2 * curvature / 2 inside the border (to first order), so each closed contour loses
    pi * sigma^2 of area. That many voxels per contour (holes are filled, so each connected
    region of a slice is one contour) are added: those of highest fraction among the free
    in-plane neighbours, i.e. the half level lowered just enough.
    """
    _, dy, dx = geometry.spacing
    eight = np.ones((3, 3), dtype=bool)
    n_contours = sum(ndimage.label(plane, structure=eight)[1] for plane in mask if plane.any())
    n_add = int(round(n_contours * np.pi * PARAMS["border_smooth_mm"] ** 2 / (dy * dx)))
    ring = ndimage.binary_dilation(mask, structure=ndimage.generate_binary_structure(2, 1)[None])
    ring &= free & ~mask
    if n_add <= 0 or not ring.any():
        return mask
    idx = np.flatnonzero(ring)
    best = idx[np.argsort(-frac.ravel()[idx], kind="stable")[:n_add]]
    grown = mask.copy()
    np.put(grown, best, True)
    return grown


def _signature_groups(comp: np.ndarray, d: np.ndarray, lipiodol: np.ndarray,
                      phases: list[Phase]) -> list[np.ndarray]:
    """Voxel groups of the lesion core with one signature each: lipiodol, enhancing, other.

    The core is the strongest quarter of the component, so the signature is the plateau,
    not the partial-volume border. Lipiodol is set apart first: it would otherwise be the
    strongest quarter and give the tumour tissue a lipiodol signature under which it falls
    below the half level. Tissue is taken beyond lipiodol's blurred rim when there is some.
    A tissue group needs 5 voxels and a tenth of the tissue core (a median of fewer is
    noise); lipiodol, hundreds of HU above liver, needs one voxel: a small lesion's deposit
    has few, and without its signature the lesion would shrink to the tissue around it.
    """
    # Ranked on a 3x3x3 mean, not on the voxel: ranking noisy voxels by their own magnitude
    # selects positive noise and biases the signature (and the half level) up.
    mag = ndimage.uniform_filter(np.sqrt(np.sum(d**2, axis=0)), size=3)
    groups: list[np.ndarray] = []
    if (comp & lipiodol).any():
        groups.append(_strongest(comp & lipiodol, mag))
    tissue = comp & ~ndimage.binary_dilation(lipiodol, iterations=PARAMS["lipiodol_rim_voxels"])
    if tissue.sum() < 5:
        tissue = comp & ~lipiodol
    if tissue.any():
        rest = _strongest(tissue, mag)
        parts = [rest]
        if Phase.ARTERIAL in phases:
            art = d[phases.index(Phase.ARTERIAL)]
            parts = [rest & (art > 0), rest & (art <= 0)]
        groups += [g for g in parts
                   if g.sum() >= max(5, PARAMS["min_group_share"] * rest.sum())]
    return groups or [comp]


def _strongest(part: np.ndarray, mag: np.ndarray) -> np.ndarray:
    """The voxels of ``part`` whose ``mag`` reaches the core percentile (at least one)."""
    n_keep = int(np.ceil(part.sum() * (1.0 - PARAMS["core_percentile"] / 100.0)))
    return part & (mag >= np.sort(mag[part])[-n_keep])
