"""Measurements of one lesion on the reference grid: volume, key slice, axes, outline, HU.

In-plane coordinates returned here are DICOM SCOORD pixel coordinates (PS3.3 C.18.6.1.1):
(column, row) with (0.0, 0.0) the top-left CORNER of the top-left pixel, so the centre of pixel
(row i, column j) is (j + 0.5, i + 0.5).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from node.analysis.results import LesionMeasurement
from node.study.model import Geometry

#: At most this many points in an outline polygon (the closing point included).
MAX_OUTLINE_POINTS = 100
#: Step (mm) of the perpendicular-chord search for the short axis.
CHORD_STEP_MM = 0.25

Point = tuple[float, float]


def measure_lesion(
    mask: np.ndarray,
    geometry: Geometry,
    label: int,
    phase_arrays: Mapping[str, np.ndarray] | None = None,
    volume_ml: float | None = None,
) -> LesionMeasurement:
    """Measure one lesion given as a boolean mask on the reference grid.

    Parameters
    ----------
    mask:
        Boolean (slices, rows, columns) mask of this lesion only.
    geometry:
        Geometry of the reference grid.
    label:
        The lesion's label value in the label map.
    phase_arrays:
        Phase value -> HU array on the reference grid, for the mean HU per phase.
    volume_ml:
        A better volume estimate (partial-volume aware) if the caller has one; default is
        voxel count x voxel volume.

    Returns
    -------
    LesionMeasurement
        Tracking fields are left empty; :mod:`node.analysis.tracking` fills them.
    """
    if not mask.any():
        raise ValueError(f"mask of lesion {label} is empty")
    dz, dy, dx = geometry.spacing
    areas = mask.sum(axis=(1, 2))
    key = int(np.argmax(areas))
    plane = largest_component_2d(mask[key])
    outline = trace_outline(plane)
    long_axis, short_axis = axes_from_outline(outline, (dx, dy))
    kij = np.argwhere(mask).mean(axis=0)
    centroid = geometry.index_to_patient(kij)[0]
    mean_hu = {
        name: float(arr[mask].mean()) for name, arr in sorted((phase_arrays or {}).items())
    }
    return LesionMeasurement(
        label=label,
        tracking_id="",
        tracking_uid="",
        volume_ml=(float(mask.sum()) * geometry.voxel_volume_ml if volume_ml is None
                   else float(volume_ml)),
        longest_diameter_mm=_length(long_axis, (dx, dy)),
        short_axis_mm=_length(short_axis, (dx, dy)),
        key_slice=key,
        long_axis_ij=long_axis,
        short_axis_ij=short_axis,
        outline_ij=simplify_outline(outline, MAX_OUTLINE_POINTS),
        area_mm2=float(areas[key]) * dy * dx,
        centroid_xyz=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        mean_hu=mean_hu,
    )


def largest_component_2d(plane: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a 2D mask, holes filled (so it has one outline)."""
    labels, n = ndimage.label(plane)
    if n > 1:
        sizes = ndimage.sum_labels(plane, labels, index=np.arange(1, n + 1))
        plane = labels == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(plane)


def trace_outline(plane: np.ndarray) -> np.ndarray:
    """Closed outline of a hole-free 4-connected 2D region, as (column, row) SCOORD points.

    The pixel-edge ("crack") boundary is followed and the midpoints of its edges are
    returned, which cuts the pixel corners like marching squares at the 0.5 level.
    The result is closed: first point == last point.
    """
    p = np.pad(plane.astype(bool), 1)
    inside = p[1:-1, 1:-1]
    rows, cols = np.nonzero(inside)
    nxt: dict[tuple[int, int], tuple[int, int]] = {}
    # Each boundary edge as (start vertex, end vertex) in (column, row) corner coordinates,
    # oriented clockwise on screen; without saddles every vertex has one outgoing edge.
    sides = (
        (~p[:-2, 1:-1], (0, 0), (1, 0)),  # top
        (~p[1:-1, 2:], (1, 0), (1, 1)),  # right
        (~p[2:, 1:-1], (1, 1), (0, 1)),  # bottom
        (~p[1:-1, :-2], (0, 1), (0, 0)),  # left
    )
    for outside, (sc, sr), (ec, er) in sides:
        sel = outside[rows, cols]
        for r, c in zip(rows[sel].tolist(), cols[sel].tolist(), strict=True):
            nxt[(c + sc, r + sr)] = (c + ec, r + er)
    if not nxt:
        raise ValueError("empty region has no outline")
    start = min(nxt)
    verts = [start]
    cur = nxt[start]
    while cur != start and len(verts) <= len(nxt):
        verts.append(cur)
        cur = nxt[cur]
    v = np.asarray(verts + [start], dtype=float)
    mids = (v[:-1] + v[1:]) / 2.0
    return np.vstack([mids, mids[:1]])


def simplify_outline(outline: np.ndarray, max_points: int) -> list[Point]:
    """Subsample a closed outline to at most ``max_points`` points, keeping it closed."""
    ring = outline[:-1]
    if len(ring) + 1 > max_points:
        idx = np.linspace(0, len(ring), max_points - 1, endpoint=False).astype(int)
        ring = ring[idx]
    pts = [(float(c), float(r)) for c, r in ring]
    return pts + [pts[0]]


def axes_from_outline(
    outline: np.ndarray, pixel_mm: tuple[float, float]
) -> tuple[tuple[Point, Point], tuple[Point, Point]]:
    """Longest diameter and the longest chord perpendicular to it.

    Parameters
    ----------
    outline:
        Closed (column, row) polygon.
    pixel_mm:
        (column spacing, row spacing) in mm.

    Returns
    -------
    tuple
        (long axis end points, short axis end points), each in (column, row) coordinates.
    """
    scale = np.asarray(pixel_mm, dtype=float)
    pts = outline[:-1] * scale
    try:
        hull = pts[ConvexHull(pts).vertices] if len(pts) >= 3 else pts
    except QhullError:  # collinear points (a one-pixel-wide region)
        hull = pts
    d = np.linalg.norm(hull[:, None, :] - hull[None, :, :], axis=-1)
    a, b = np.unravel_index(int(np.argmax(d)), d.shape)
    p0, p1 = hull[a], hull[b]
    length = float(d[a, b])
    if length == 0:
        pt = tuple(float(v) for v in outline[0])
        return (pt, pt), (pt, pt)  # type: ignore[return-value]
    u = (p1 - p0) / length
    w = np.array([-u[1], u[0]])
    q0, q1 = _longest_perpendicular_chord(outline * scale, p0, u, w, length)
    to_px = 1.0 / scale
    long_axis = (_pt(p0 * to_px), _pt(p1 * to_px))
    short_axis = (_pt(q0 * to_px), _pt(q1 * to_px))
    return long_axis, short_axis


def _longest_perpendicular_chord(
    poly: np.ndarray, p0: np.ndarray, u: np.ndarray, w: np.ndarray, length: float
) -> tuple[np.ndarray, np.ndarray]:
    """Scan lines perpendicular to ``u``; return the end points of the longest inside chord."""
    t_pts = (poly - p0) @ u
    s_pts = (poly - p0) @ w
    best = (0.0, p0, p0)
    for t in np.arange(CHORD_STEP_MM / 2, length, CHORD_STEP_MM):
        t0, t1 = t_pts[:-1], t_pts[1:]
        cross = (t0 - t) * (t1 - t) < 0
        if cross.sum() < 2:
            continue
        f = (t - t0[cross]) / (t1[cross] - t0[cross])
        s = np.sort(s_pts[:-1][cross] + f * (s_pts[1:][cross] - s_pts[:-1][cross]))
        # Consecutive pairs of crossings bound the inside segments of a simple polygon.
        seg = s[1::2] - s[0::2][: len(s[1::2])]
        i = int(np.argmax(seg))
        if seg[i] > best[0]:
            base = p0 + t * u
            best = (float(seg[i]), base + s[2 * i] * w, base + s[2 * i + 1] * w)
    return best[1], best[2]


def _pt(v: np.ndarray) -> Point:
    return (float(v[0]), float(v[1]))


def _length(seg: tuple[Point, Point], pixel_mm: tuple[float, float]) -> float:
    (c0, r0), (c1, r1) = seg
    return float(np.hypot((c1 - c0) * pixel_mm[0], (r1 - r0) * pixel_mm[1]))


def liver_summary(liver: np.ndarray, geometry: Geometry) -> tuple[float, tuple[float, float,
                                                                           float]]:
    """Liver volume (ml) and centroid (patient mm); centroid (0, 0, 0) for an empty mask."""
    n = int(liver.sum())
    if n == 0:
        return 0.0, (0.0, 0.0, 0.0)
    c = geometry.index_to_patient(np.argwhere(liver).mean(axis=0))[0]
    return n * geometry.voxel_volume_ml, (float(c[0]), float(c[1]), float(c[2]))
