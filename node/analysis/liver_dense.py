"""Dense deposits (lipiodol after TACE) enclosed by or attached to the liver are liver.

The liver's intensity window (:func:`node.analysis.liver.segment_liver`) stops well below
iodised oil (300-3000 HU), so a deposit in a tumour at the liver's edge is left out, and the
lesion detection, which looks only inside the liver mask, can never count it. Ribs, spine,
contrast-filled bowel, the blood pool and calcifications are dense too; what tells them apart:

* lipiodol is dense WITHOUT contrast (the native phase); the blood pool, kidney and enhanced
  vessels are not. Without a native phase nothing is added (one contrast phase cannot tell
  a deposit from enhancement);
* a deposit lies inside the liver's convex envelope (per axial slice), while bone and bowel
  run along its convex surface or far beyond it: at least half of a dense structure must
  lie inside the envelope;
* bone is one long connected structure (the skeleton) that a deposit may touch only across a
  thin contact; such contacts are cut before the structures are told apart;
* a deposit touches the liver (within ``attach_mm``): calcifications elsewhere do not.

Accepted deposits join the mask, whose holes and notches are then filled and closed again, so
that the tumour tissue between a deposit and the liver is inside too.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from node.analysis.liver import (
    PARAMS,
    LiverSegmentation,
    body_mask,
    edt_slices,
    fill_and_close,
    smooth_inplane,
    with_reach,
)
from node.study.model import Geometry

#: Rules and sizes of the deposit step (data, not code).
DEPOSIT: dict[str, float] = {
    "dense_hu": 70.0,  # denser than the liver by this much, with and without contrast (HU)
    "native_reach_mm": 5.0,  # the native phase is thick and aligned only to a few mm
    "bridge_mm": 1.5,  # contacts thinner than twice this (in plane) are cut
    "inside_share": 0.5,  # share of a structure inside the liver's convex envelope
    "attach_mm": 5.0,  # a deposit comes this close to the liver
    "margin_mm": 30.0,  # structures are judged within the liver's box grown by this
}


def include_deposits(liver: LiverSegmentation, array: np.ndarray, native: np.ndarray | None,
                     geometry: Geometry) -> LiverSegmentation:
    """``liver`` with the dense deposits enclosed by or attached to it (module docstring).

    ``array`` is the reference (contrast) volume, ``native`` the native phase aligned to it
    (None: no native phase, ``liver`` is returned unchanged).
    """
    if native is None or not liver.mask.any():
        return liver
    spacing = geometry.spacing
    reach = [int(np.ceil(DEPOSIT["margin_mm"] / s)) for s in spacing]
    box, _ = with_reach(ndimage.find_objects(liver.mask.view(np.uint8))[0], reach,
                         liver.mask.shape)
    mask = liver.mask[box]
    sigma = PARAMS["smooth_mm"]
    sm = smooth_inplane(array, geometry, sigma, box)
    sm_native = smooth_inplane(native, geometry, sigma, box)
    nat_liver = float(np.median(sm_native[mask]))
    r = DEPOSIT["native_reach_mm"]  # whole slices through, whole pixels in plane
    size = [2 * int(r / spacing[0]) + 1, *(2 * int(np.ceil(r / s)) + 1 for s in spacing[1:])]
    dense_native = ndimage.maximum_filter(sm_native, size=size) > nat_liver + DEPOSIT["dense_hu"]
    dense = (sm > liver.median_hu + DEPOSIT["dense_hu"]) & dense_native & ~mask
    if not dense.any():
        return liver
    labels, n = _split_at_thin_contacts(dense, geometry)
    voxels = np.bincount(labels.ravel(), minlength=n + 1)
    inside = np.bincount(labels[_inside_hull(mask, dense)], minlength=n + 1)
    near = np.unique(labels[_near(mask, geometry, DEPOSIT["attach_mm"]) & dense])
    keep = np.zeros(n + 1, dtype=bool)
    keep[near] = True
    keep &= inside >= DEPOSIT["inside_share"] * np.maximum(voxels, 1)
    keep[0] = False
    if not keep.any():
        return liver
    grown = liver.mask.copy()
    grown[box] |= keep[labels]
    body = np.zeros_like(grown)
    body[box] = body_mask(sm)
    grown = fill_and_close(grown, body, geometry)
    envelope = grown if liver.envelope is None else liver.envelope | grown
    return replace(liver, mask=grown, envelope=envelope)


def _split_at_thin_contacts(dense: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, int]:
    """Connected structures of ``dense``, cut where they touch across a thin contact.

    The part of each structure farther than ``bridge_mm`` (in plane, and at least one
    pixel) from its border is labelled and grown back over the rest; what no such part
    reaches (small spots, the contacts' remains) is labelled on its own.
    """
    _, dy, dx = geometry.spacing
    cut = max(DEPOSIT["bridge_mm"], dy, dx)  # at least the border pixel, on coarse grids
    labels, n = ndimage.label(edt_slices(dense, geometry) > cut)
    inplane = ndimage.generate_binary_structure(3, 1)
    inplane[[0, 2]] = False
    for _ in range(int(np.ceil(cut / min(dy, dx))) + 1):
        grown = ndimage.grey_dilation(labels, footprint=inplane)
        add = dense & (labels == 0) & (grown > 0)
        if not add.any():
            break
        labels[add] = grown[add]
    rest, m = ndimage.label(dense & (labels == 0))
    labels[rest > 0] = rest[rest > 0] + n
    return labels, n + m


def _inside_hull(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The ``points`` voxels inside the convex hull of ``mask`` in their own axial slice."""
    out = np.zeros_like(points)
    for k in np.nonzero(points.any(axis=(1, 2)) & mask.any(axis=(1, 2)))[0]:
        rows, cols = np.nonzero(mask[k] & ~ndimage.binary_erosion(mask[k]))
        # Pixel corners: the hull of a one-pixel-wide mask is not degenerate.
        corners = np.concatenate([np.stack([rows + a, cols + b], axis=1)
                                  for a in (-0.5, 0.5) for b in (-0.5, 0.5)])
        try:
            hull = ConvexHull(corners)
        except QhullError:  # too few points: nothing is inside
            continue
        pr, pc = np.nonzero(points[k])
        homogeneous = np.stack([pr, pc, np.ones(pr.size)], axis=1)
        within = np.all(homogeneous @ hull.equations.T <= 1e-9, axis=1)
        out[k, pr[within], pc[within]] = True
    return out


def _near(mask: np.ndarray, geometry: Geometry, r: float) -> np.ndarray:
    """Voxels within ``r`` mm of ``mask``: in plane, and in the slices within ``r``."""
    dz = geometry.spacing[0]
    occupied = np.asarray(mask.any(axis=(1, 2)))  # a slice without mask has no distances
    out = (edt_slices(~mask, geometry) <= r) & occupied[:, None, None]
    for d in range(1, int(r // dz) + 1):
        out[d:] |= mask[:-d]
        out[:-d] |= mask[d:]
    return out
