"""Multi-phase detection and delineation of liver metastases (classical, CPU).

Per phase, attenuation is expressed as the deviation from the liver's robust median, in units
of the liver's robust SD (both measured on this image, so no scanner/protocol constants). The
directions that indicate tumour are rules kept as data (:data:`DIRECTIONS`): NET metastases are
hyper-enhancing in the arterial phase and wash out (hypo) in the delayed phase; necrosis is hypo
in every phase; lipiodol after TACE is very dense in every phase, the plain scan included.
Bright in the portal venous phase (and not more so in the arterial one) means vessel, not tumour.

Detection: hysteresis on the combined score. Delineation: per lesion, each voxel's partial-volume
fraction is estimated by unmixing its deviation vector into the lesion's own signatures
(matched filter over phases); the lesion is where that fraction is >= 0.5, the half-contrast
level, and its voxel count is its volume. On 5 mm slices the half level samples a lesion's
cross-section at the slice centres (Cavalieri's estimator: unbiased), unless the analysis
moves the border itself. In-plane smoothing does: the half level of a Gaussian-smoothed image
lies sigma^2 * curvature / 2 inside the border, so each closed contour loses pi * sigma^2 of
area whatever its shape (5-15 % of a 10-20 mm lesion at the 1.5 mm detection smoothing). The
border is therefore placed on a less smoothed fraction map and the remaining loss given back
(:func:`_compensate_smoothing`). A partial-volume sum over a border band, blur-free in
principle, was less accurate on the phantoms: it also counts what else lies in the band
(vessel edges, a neighbour) and scales with the signature's error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

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
    "lipiodol_rim_voxels": 2,  # lipiodol's partial-volume rim, left out of tissue signatures
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
    "half_level": 0.5,  # partial-volume fraction at the lesion border
    "border_smooth_mm": 0.75,  # in-plane sigma of the fraction map that places the border
    "border_reach_sigmas": 2.0,  # ...within this many detection sigmas of the first border
    "core_percentile": 75.0,  # signature from the component's voxels above this percentile
    "min_group_share": 0.1,  # a signature group needs this share of the core voxels
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
        fine[phase] = (masked_smooth(arr, region, geometry, PARAMS["border_smooth_mm"])
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
    box = _grow_box(ndimage.find_objects(liver.astype(np.int8))[0], liver.shape, geometry,
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
    score, vessel, lipiodol = evidence_vector(devs, sds)
    score[~search] = 0.0
    # Blurred / misregistered vessel borders look like arterial enhancement: no seeds there.
    near_vessel = _inplane_distance(vessel, geometry, inside=False) <= (
        PARAMS["vessel_margin_sigmas"] * PARAMS["smooth_mm"])
    seeds = (score > PARAMS["seed_z"]) & core & ~near_vessel
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
        region = _delineate(labels, lab, sl, devs, fine, sds, lipiodol, search & ~vessel,
                            geometry)
        if region is None:
            continue
        box, mask, border, frac = region
        if not _accept(mask, liver[box], devs, sds, box, geometry, notes):
            rejected[box] |= mask
            continue
        free = search[box] & ~vessel[box] & (out[box] == 0)
        border = _compensate_smoothing(border, frac, free, geometry)
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


def _grow_box(sl: tuple[slice, ...], shape: tuple[int, ...], geometry: Geometry,
              margin_mm: float) -> tuple[slice, ...]:
    """Bounding box enlarged by ``margin_mm`` (at least one voxel) on every side."""
    out = []
    for s, n, sp in zip(sl, shape, geometry.spacing, strict=True):
        m = max(1, int(np.ceil(margin_mm / sp)))
        out.append(slice(max(0, s.start - m), min(n, s.stop + m)))
    return tuple(out)


def _delineate(
    labels: np.ndarray, lab: int, sl: tuple[slice, ...], devs: Mapping[Phase, np.ndarray],
    fine: Mapping[Phase, np.ndarray], sds: Mapping[Phase, float], lipiodol: np.ndarray,
    search: np.ndarray, geometry: Geometry,
) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray, np.ndarray] | None:
    """Half-contrast delineation of one candidate by matched filtering of its signatures.

    ``search`` excludes vessels, so an adjacent enhancing vessel is not absorbed. The
    candidate is delineated on ``devs`` (detection smoothing); its border is then placed
    again on ``fine`` (border smoothing), see :func:`_place_border`.

    Returns
    -------
    tuple or None
        (bounding box, mask at the detection smoothing, mask at the border smoothing,
        lesion fraction at the border smoothing), all in the box.
    """
    extent = max((s.stop - s.start) * sp for s, sp in zip(sl[1:], geometry.spacing[1:],
                                                          strict=True))
    box = _grow_box(sl, labels.shape, geometry, extent + 2 * PARAMS["smooth_mm"] + 3.0)
    comp = labels[box] == lab
    d = np.stack([devs[p][box] for p in devs])  # (phases, z, y, x)
    w = np.array([1.0 / sds[p] ** 2 for p in devs], dtype=np.float32)
    sigs = []
    for group in _signature_groups(comp, d, lipiodol[box], list(devs)):
        sig = np.median(d[:, group], axis=1)  # the group's plateau deviation per phase
        # A weak signature would turn noise into large fractions: it must be seed-strong.
        if float(np.sum(w * sig * sig)) >= PARAMS["seed_z"] ** 2:
            sigs.append(sig)
    if not sigs:
        return None
    sig_matrix = np.stack(sigs, axis=1)
    mask = _half_level_region(unmix_fraction(d, sig_matrix, w), comp, search[box])
    if mask is None:
        return None
    mask = _fill_holes(mask)
    frac = unmix_fraction(np.stack([fine[p][box] for p in devs]), sig_matrix, w)
    return box, mask, _place_border(frac, mask, search[box], geometry), frac


def unmix_fraction(d: np.ndarray, sigs: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Lesion fraction per voxel by non-negative linear unmixing of the lesion's signatures.

    Each voxel's deviation vector over the phases is modelled as a non-negative mix of the
    lesion's signatures (columns of ``sigs``, e.g. enhancing tissue, necrosis, lipiodol) plus
    liver (zero deviation); the lesion fraction is the sum of the mix weights. A voxel that is
    part tissue, part blurred lipiodol then counts fully, where projecting on either signature
    alone would leave it below the half level. Weighted least squares (weights ``w`` = 1 /
    liver variance per phase), the non-negative solution found over every subset of
    signatures (at most three, so at most seven small solves).
    """
    n_sig = sigs.shape[1]
    flat = d.reshape(d.shape[0], -1)
    best_res = np.full(flat.shape[1], np.inf, dtype=np.float32)
    best_sum = np.zeros(flat.shape[1], dtype=np.float32)
    for mask_bits in range(1, 2 ** n_sig):
        cols = [i for i in range(n_sig) if mask_bits >> i & 1]
        s = sigs[:, cols]
        gram = s.T @ (w[:, None] * s)
        if abs(np.linalg.det(gram)) < 1e-9:
            continue
        coef = np.linalg.solve(gram, (s.T * w) @ flat)  # (len(cols), voxels)
        res = np.sum(w[:, None] * (flat - s @ coef) ** 2, axis=0)
        ok = np.all(coef >= 0, axis=0) & (res < best_res)
        best_res[ok] = res[ok]
        best_sum[ok] = coef[:, ok].sum(axis=0)
    return best_sum.reshape(d.shape[1:])


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
                  geometry: Geometry) -> np.ndarray:
    """The half level of the less smoothed fraction ``frac`` near the border of ``mask``.

    Only voxels within reach of the detection smoothing (in plane, and one slice above and
    below, where a slice cut near the lesion's pole may pass the half level once less
    smoothed) can join; parts not touching ``mask`` are noise and are left out.
    """
    _, dy, dx = geometry.spacing
    reach = PARAMS["border_reach_sigmas"] * PARAMS["smooth_mm"]
    ry, rx = int(np.ceil(reach / dy)), int(np.ceil(reach / dx))
    yy, xx = np.mgrid[-ry:ry + 1, -rx:rx + 1]
    disk = (yy * dy) ** 2 + (xx * dx) ** 2 <= reach**2
    zone = ndimage.binary_dilation(mask, structure=disk[None])
    zone |= ndimage.binary_dilation(mask, structure=np.array([1, 1, 1], bool)[:, None, None])
    region = _half_level_region(frac, mask, search & zone)
    return mask if region is None else _fill_holes(region)


def _compensate_smoothing(mask: np.ndarray, frac: np.ndarray, free: np.ndarray,
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
    not the partial-volume border. Lipiodol and its blurred rim are set apart first: they
    would otherwise be the strongest quarter and give the tumour tissue a lipiodol signature
    under which it falls below the half level.
    """
    lip_all = comp & lipiodol
    rim = ndimage.binary_dilation(lipiodol, iterations=PARAMS["lipiodol_rim_voxels"])
    tissue = comp & ~rim
    if tissue.sum() < 5:
        tissue = comp & ~lipiodol
    core = lip_all.copy()
    if tissue.any():
        # Ranked on a 3x3x3 mean, not on the voxel: ranking noisy voxels by their own
        # magnitude selects positive noise and biases the signature (and the half level) up.
        mag = ndimage.uniform_filter(np.sqrt(np.sum(d ** 2, axis=0)), size=3)[tissue]
        core[tissue] = mag >= np.percentile(mag, PARAMS["core_percentile"])
    groups: list[np.ndarray] = []
    lip = core & lipiodol
    rest = core & ~lipiodol
    if Phase.ARTERIAL in phases:
        art = d[phases.index(Phase.ARTERIAL)]
        parts = [rest & (art > 0), rest & (art <= 0)]
    else:
        parts = [rest]
    n_core = int(core.sum())
    for g in [lip, *parts]:
        if g.sum() >= max(5, PARAMS["min_group_share"] * n_core):
            groups.append(g)
    if not groups:
        groups.append(comp)
    return groups


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


def _phase_support(mask: np.ndarray, devs: Mapping[Phase, np.ndarray],
                   sds: Mapping[Phase, float], box: tuple[slice, ...]) -> int:
    """Number of phases whose median deviation over the candidate points the tumour way."""
    n = 0
    for phase, d in devs.items():
        hyper, hypo = DIRECTIONS.get(phase, (False, True))
        z = float(np.median(d[box][mask])) / sds[phase]
        if (hyper and z > PARAMS["support_z"]) or (hypo and z < -PARAMS["support_z"]):
            n += 1
    return n


def _accept(mask: np.ndarray, liver: np.ndarray, devs: Mapping[Phase, np.ndarray],
            sds: Mapping[Phase, float], box: tuple[slice, ...], geometry: Geometry,
            notes: list[str]) -> bool:
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
            and _phase_support(mask, devs, sds, box) < PARAMS["small_min_phases"]):
        notes.append(f"candidate of {vol:.2f} ml rejected: seen in one phase only")
        return False
    contrast = max(abs(float(np.median(d[box][mask]))) for d in devs.values())
    if contrast < PARAMS["min_contrast_hu"]:
        notes.append(f"candidate of {vol:.2f} ml rejected: contrast {contrast:.1f} HU")
        return False
    return True
