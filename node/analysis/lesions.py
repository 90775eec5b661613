"""Multi-phase detection and delineation of liver metastases (classical, CPU).

Per phase, attenuation is expressed as the deviation from the liver's robust median, in units
of the liver's robust SD (both measured on this image, so no scanner/protocol constants). The
directions that indicate tumour are rules kept as data (:data:`DIRECTIONS`): NET metastases are
hyper-enhancing in the arterial phase and wash out (hypo) in the delayed phase; necrosis is hypo
in every phase; lipiodol after TACE is very dense in every phase, the plain scan included.
Bright in the portal venous phase (and not more so in the arterial one) means vessel, not tumour.

Detection: hysteresis on the combined score; each candidate is then delineated at its
half-contrast level by :mod:`node.analysis.delineate`. Within a slice or so of fat, lung or air
above or below (the liver's dome and tip, a fissure, an organ's fat capsule), hypo-density is
partial volume with that tissue, not evidence (:func:`near_fat_in_z`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from node.analysis.delineate import PARAMS as DELINEATION
from node.analysis.delineate import Evidence, compensate_smoothing, delineate, grow_box
from node.analysis.liver import robust_stats
from node.study.model import Geometry, Phase

#: Which deviations count as tumour evidence, per phase: (hyper allowed, hypo allowed).
DIRECTIONS: dict[Phase, tuple[bool, bool]] = {
    Phase.ARTERIAL: (True, True),
    Phase.PORTAL_VENOUS: (False, True),
    Phase.DELAYED: (False, True),
    Phase.NATIVE: (False, True),
    Phase.UNKNOWN: (False, True),
}

#: Blood pool rule per phase: (z above liver, minimal ratio to the arterial excess). Blood
#: (vessels, IVC, residual misregistration of vessels) is bright in the portal venous and
#: delayed phases; tumour is iso in the portal venous phase and washes out (hypo) when delayed.
VESSEL_RULES: dict[Phase, tuple[float, float]] = {
    Phase.PORTAL_VENOUS: (3.0, 0.6),
    Phase.DELAYED: (2.0, 0.3),
}

PARAMS: dict[str, Any] = {
    "smooth_mm": 1.5,  # in-plane sigma of the (liver-restricted) smoothing
    "min_sd_hu": 2.0,  # floor of the liver SD (noise-free images)
    "seed_z": 6.0,  # combined score of a lesion core
    "lipiodol_hu": 70.0,  # lipiodol: this much denser than liver in every phase...
    "lipiodol_z": 6.0,  # ...and this many SD
    "native_dense_z": 2.0,  # denser than liver on the plain scan by this many SD: not blood
    "core_margin_mm": 2.0,  # seeds must lie this far inside the liver (surface partial volume)
    "search_margin_mm": 10.0,  # lesions may extend this far beyond the liver mask
    "vessel_margin_sigmas": 2.0,  # no seeds this close (x smoothing sigma) to blood pool
    "min_inside": 0.5,  # fraction of a lesion that must lie in the liver mask
    "min_volume_ml": 0.1,
    "min_contrast_hu": 10.0,  # a lesion must differ by this much in some phase
    "small_ml": 0.5,  # candidates smaller than this need evidence in several phases:
    "small_min_phases": 2,  # ...at least this many phases with...
    "support_z": 2.0,  # ...a median deviation of this many SD in the tumour direction
    "tubular_fill": 0.4,  # small candidates filling less of their extent's disk are vessels
    "tubular_max_ml": 2.0,  # ...up to this volume
}


@dataclass
class LesionMaps:
    """Detection output on the reference grid."""

    labels: np.ndarray  # int32, 0 background, 1..n lesions (in detection order)
    volumes_ml: dict[int, float] = field(default_factory=dict)  # label -> volume (ml)
    notes: list[str] = field(default_factory=list)


def masked_smooth(array: np.ndarray, region: np.ndarray, geometry: Geometry,
                  sigma_mm: float) -> np.ndarray:
    """Gaussian smoothing that uses only voxels inside ``region`` (normalised convolution).

    Fat and air next to the liver then do not bleed into liver voxels at the surface.
    """
    _, dy, dx = geometry.spacing
    sigma = (0.0, sigma_mm / dy, sigma_mm / dx)
    w = region.astype(np.float32)
    num = ndimage.gaussian_filter(array.astype(np.float32) * w, sigma)
    den = ndimage.gaussian_filter(w, sigma)
    out = np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0).astype(np.float32)
    return out


def _inplane_distance(mask: np.ndarray, geometry: Geometry, inside: bool) -> np.ndarray:
    """Per-slice distance (mm) to the mask border, from inside (or from outside)."""
    _, dy, dx = geometry.spacing
    out = np.zeros(mask.shape, dtype=np.float32)
    for k in range(mask.shape[0]):
        m = mask[k] if inside else ~mask[k]
        if m.all():
            out[k] = np.inf
        elif m.any():
            out[k] = ndimage.distance_transform_edt(m, sampling=(dy, dx))
    return out


def near_fat_in_z(body: np.ndarray) -> np.ndarray:
    """Soft-tissue voxels with fat, lung or air (not ``body``) close above or below them.

    Where the liver's top or bottom surface is nearly parallel to the slices (the dome, the
    tip, a fissure, an organ's fat capsule), a whole 5 mm slice through it is partly that
    tissue: darker than liver in every phase without holding any lesion. Hypo-density there
    is no lesion evidence: in the slice next to such tissue, above or below. Version 3 also
    reached over the other phases' residual misalignment (+5 mm): on the real HCC_007
    baseline (2.5 mm slices) that erased the hypo-dense part of a tumour under the dome
    (386 -> 85 ml), while on the 5 mm phantom suite one slice does as well (p90 |volume
    error| 14.6 % either way).
    """
    outside = ~body
    near = np.zeros(body.shape, dtype=bool)
    near[:-1] |= outside[1:]
    near[1:] |= outside[:-1]
    return near & body


def deviations(
    phases: Mapping[Phase, np.ndarray], liver: np.ndarray, region: np.ndarray,
    geometry: Geometry,
) -> tuple[dict[Phase, np.ndarray], dict[Phase, np.ndarray], dict[Phase, float]]:
    """Deviation from the liver median (HU) per phase, and the liver SD per phase.

    Returns
    -------
    tuple
        (deviations at the detection smoothing, deviations at the border smoothing, SDs).
    """
    devs: dict[Phase, np.ndarray] = {}
    fine: dict[Phase, np.ndarray] = {}
    sds: dict[Phase, float] = {}
    for phase, arr in phases.items():
        sm = masked_smooth(arr, region, geometry, PARAMS["smooth_mm"])
        med, sd = robust_stats(sm[liver])
        devs[phase] = sm - np.float32(med)
        fine[phase] = (masked_smooth(arr, region, geometry, DELINEATION["border_smooth_mm"])
                       - np.float32(med))
        sds[phase] = max(sd, PARAMS["min_sd_hu"])
    return devs, fine, sds


def evidence_vector(
    devs: Mapping[Phase, np.ndarray], sds: Mapping[Phase, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combined score, vessel map and lipiodol map.

    Returns
    -------
    tuple
        (score in SD units, vessel bool map, lipiodol bool map).
    """
    shape = next(iter(devs.values())).shape
    score2 = np.zeros(shape, dtype=np.float32)
    lipiodol = np.ones(shape, dtype=bool)
    for phase, d in devs.items():
        lipiodol &= (d > PARAMS["lipiodol_hu"]) & (d > PARAMS["lipiodol_z"] * sds[phase])
    vessel = np.zeros(shape, dtype=bool)
    # Blood pool (vessels, IVC): hyper in the portal venous or delayed phase, at least about
    # as much as in the arterial phase. Tumour is iso (portal) and washes out (delayed).
    for phase, (z_min, ratio) in VESSEL_RULES.items():
        dev = devs.get(phase)
        if dev is None:
            continue
        pool = dev > z_min * sds[phase]
        art = devs.get(Phase.ARTERIAL)
        if art is not None:
            pool &= dev >= ratio * art
        vessel |= pool
    # Unenhanced blood is iso- to hypodense to liver: what is dense on the plain scan
    # (lipiodol and its partial-volume rim, calcification, haemorrhage) is not blood pool.
    native = devs.get(Phase.NATIVE)
    if native is not None:
        vessel &= native <= PARAMS["native_dense_z"] * sds[Phase.NATIVE]
    vessel &= ~lipiodol
    for phase, d in devs.items():
        hyper, hypo = DIRECTIONS.get(phase, (False, True))
        z = d / np.float32(sds[phase])
        if hyper:
            score2 += np.where(z > 0, z, 0) ** 2
        if hypo:
            score2 += np.where(z < 0, z, 0) ** 2
    score = np.sqrt(score2)
    score[vessel] = 0.0
    score[lipiodol] = np.maximum(score[lipiodol], PARAMS["seed_z"] * 2)
    return score, vessel, lipiodol


def detect_lesions(
    phases: Mapping[Phase, np.ndarray], liver: np.ndarray, body: np.ndarray,
    geometry: Geometry,
) -> LesionMaps:
    """Detect and delineate lesions in and at the border of the liver.

    The work is done on the liver's bounding box plus the search margin and the smoothing's
    reach (lesions cannot extend further), which makes it several times faster on 512x512
    images; see :func:`_detect_in_box` for the parameters.
    """
    labels = np.zeros(liver.shape, dtype=np.int32)
    if not liver.any():
        return LesionMaps(labels=labels)
    box = grow_box(ndimage.find_objects(liver.astype(np.int8))[0], liver.shape, geometry,
                   PARAMS["search_margin_mm"] + 4.0 * PARAMS["smooth_mm"] + 3.0)
    box = (slice(max(box[0].start - 1, 0), min(box[0].stop + 1, liver.shape[0])), *box[1:])
    maps = _detect_in_box({p: a[box] for p, a in phases.items()}, liver[box], body[box],
                          geometry)
    labels[box] = maps.labels
    return LesionMaps(labels=labels, volumes_ml=maps.volumes_ml, notes=maps.notes)


def _detect_in_box(
    phases: Mapping[Phase, np.ndarray], liver: np.ndarray, body: np.ndarray,
    geometry: Geometry,
) -> LesionMaps:
    """Detect and delineate lesions in and at the border of the liver (arrays of one box).

    Parameters
    ----------
    phases:
        HU volumes on the reference grid, already aligned.
    liver:
        Liver mask on the reference grid.
    body:
        Soft-tissue region (no fat/air) allowed for lesion extent outside the liver mask.
    geometry:
        Reference grid geometry.
    """
    outside_dist = _inplane_distance(liver, geometry, inside=False)
    search = (liver | (outside_dist <= PARAMS["search_margin_mm"])) & body
    core = _inplane_distance(liver, geometry, inside=True) > PARAMS["core_margin_mm"]
    # The first and last liver slice are partial volume with what lies above / below.
    core[1:-1] &= liver[:-2] & liver[2:]
    core[[0, -1]] = False
    devs, fine, sds = deviations(phases, core, search, geometry)
    no_hypo = near_fat_in_z(body)
    for phase in phases:
        devs[phase] = np.where(no_hypo, np.maximum(devs[phase], 0.0), devs[phase])
        fine[phase] = np.where(no_hypo, np.maximum(fine[phase], 0.0), fine[phase])
    score, vessel, lipiodol = evidence_vector(devs, sds)
    score[~search] = 0.0
    # Blurred / misregistered vessel borders look like arterial enhancement: no seeds there.
    near_vessel = _inplane_distance(vessel, geometry, inside=False) <= (
        PARAMS["vessel_margin_sigmas"] * PARAMS["smooth_mm"])
    seeds = (score > PARAMS["seed_z"]) & core & ~near_vessel
    ev = Evidence(devs=devs, fine=fine, sds=sds, lipiodol=lipiodol, search=search & ~vessel,
                  no_hypo=no_hypo, geometry=geometry, smooth_mm=PARAMS["smooth_mm"],
                  min_score=PARAMS["seed_z"])
    labels, n = ndimage.label(seeds)
    boxes = ndimage.find_objects(labels)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    out = np.zeros(liver.shape, dtype=np.int32)
    notes: list[str] = []
    next_label = 1
    # Voxels of rejected candidates: a seed lying wholly in one would delineate it again.
    rejected = np.zeros(liver.shape, dtype=bool)
    # Largest seeds first; a seed inside an already delineated lesion adds nothing.
    for lab in sorted(range(1, n + 1), key=lambda i: (-sizes[i], i)):
        sl = boxes[lab - 1]
        if sl is None:
            continue
        seed = labels[sl] == lab
        if np.all((out[sl][seed] > 0) | rejected[sl][seed]):
            continue
        found = delineate(labels, lab, sl, ev)
        if found is None:
            continue
        box, mask = found.box, found.mask
        if not _accept(mask, liver[box], lipiodol[box], devs, sds, box, geometry, notes):
            rejected[box] |= mask
            continue
        free = search[box] & ~vessel[box] & (out[box] == 0)
        border = compensate_smoothing(found.border, found.frac, free, geometry)
        if _paint_lesion(out, box, border, next_label):
            next_label += 1
    out = _compact_labels(out)
    counts = np.bincount(out.ravel())
    volumes = {lab: float(counts[lab]) * geometry.voxel_volume_ml
               for lab in range(1, counts.size)}
    return LesionMaps(labels=out, volumes_ml=volumes, notes=notes)


def _paint_lesion(out: np.ndarray, box: tuple[slice, ...], mask: np.ndarray,
                  label: int) -> bool:
    """Write a lesion into the label map; merge it into lesions it overlaps.

    Returns True when ``label`` was used (a new lesion), False when it merged.
    """
    view = out[box]
    touched = np.unique(view[mask])
    touched = touched[touched > 0]
    if touched.size == 0:
        view[mask] = label
        return True
    # The same lesion reached from another seed.
    view[mask & (view == 0)] = int(touched[0])
    for t in touched[1:]:
        out[out == t] = int(touched[0])
    return False


def _compact_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 1..n in order of first appearance value."""
    values = np.unique(labels)
    values = values[values > 0]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    lut[values] = np.arange(1, values.size + 1, dtype=np.int32)
    return lut[labels]


def _fill_ratio(mask: np.ndarray, geometry: Geometry) -> float:
    """Area on the slice of largest area over the disk spanned by its longest extent.

    About 1 for round, 0.67 for a 3:2 ellipse, small for thin or curved tubes (vessels).
    """
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    ii, jj = np.nonzero(mask[k])
    if ii.size < 3:
        return 1.0
    _, dy, dx = geometry.spacing
    pts = np.column_stack([ii * dy, jj * dx])
    if len(pts) > 400:  # the extent needs only the outline; subsample big regions
        pts = pts[:: len(pts) // 400 + 1]
    extent = float(np.max(np.linalg.norm(pts[:, None] - pts[None], axis=-1))) + max(dy, dx)
    return float(ii.size * dy * dx / (np.pi / 4.0 * extent**2))


def _phase_support(mask: np.ndarray, lipiodol: np.ndarray, devs: Mapping[Phase, np.ndarray],
                   sds: Mapping[Phase, float], box: tuple[slice, ...]) -> int:
    """Number of phases whose median deviation over the candidate points the tumour way.

    Lipiodol is dense in every phase, the plain scan included (see :func:`evidence_vector`):
    a candidate holding some, or dense in every phase like a deposit too small and blurred
    for the lipiodol map, has evidence in all of them. A small lesion filled with lipiodol
    is mostly the deposit and its blur, hyper-dense where otherwise only hypo-density counts.
    """
    z = {p: float(np.median(d[box][mask])) / sds[p] for p, d in devs.items()}
    if (mask & lipiodol).any() or all(v > PARAMS["support_z"] for v in z.values()):
        return len(devs)
    n = 0
    for phase in devs:
        hyper, hypo = DIRECTIONS.get(phase, (False, True))
        if (hyper and z[phase] > PARAMS["support_z"]) or (hypo and z[phase] < -PARAMS["support_z"]):
            n += 1
    return n


def _accept(mask: np.ndarray, liver: np.ndarray, lipiodol: np.ndarray,
            devs: Mapping[Phase, np.ndarray], sds: Mapping[Phase, float],
            box: tuple[slice, ...], geometry: Geometry, notes: list[str]) -> bool:
    """Size, location and contrast checks of one delineated lesion."""
    vol = float(mask.sum()) * geometry.voxel_volume_ml
    if vol < PARAMS["min_volume_ml"]:
        return False
    inside = float((mask & liver).sum()) / float(mask.sum())
    if inside < PARAMS["min_inside"]:
        notes.append(f"candidate of {vol:.2f} ml rejected: {inside:.0%} inside the liver")
        return False
    if vol < PARAMS["tubular_max_ml"] and _fill_ratio(mask, geometry) < PARAMS["tubular_fill"]:
        notes.append(f"candidate of {vol:.2f} ml rejected: tubular (vessel)")
        return False
    if (vol < PARAMS["small_ml"] and len(devs) > 1
            and _phase_support(mask, lipiodol, devs, sds, box) < PARAMS["small_min_phases"]):
        notes.append(f"candidate of {vol:.2f} ml rejected: seen in one phase only")
        return False
    contrast = max(abs(float(np.median(d[box][mask]))) for d in devs.values())
    if contrast < PARAMS["min_contrast_hu"]:
        notes.append(f"candidate of {vol:.2f} ml rejected: contrast {contrast:.1f} HU")
        return False
    return True
