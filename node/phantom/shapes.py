"""Implicit shapes for the phantom: approximate signed distances in patient millimetres.

Every shape answers :meth:`Shape.sd` for broadcastable coordinate arrays ``x, y, z`` (mm, in
the phantom's anatomy frame, DICOM LPS axes) with an approximate signed distance: negative
inside, positive outside, close to the Euclidean distance near the surface. The renderer turns
it into a partial-volume occupancy with a one-voxel ramp, so only the region within about a
voxel of the surface must be accurate. ``lo`` and ``hi`` bound the shape (mm, x/y/z).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

Array = np.ndarray
Vec3 = tuple[float, float, float]


def vec3(values: object) -> Vec3:
    """Three floats from any length-3 sequence or array."""
    a, b, c = (float(v) for v in np.asarray(values, dtype=float).ravel())
    return a, b, c


class Solid(Protocol):
    """Anything the renderer can paint: a bounding box and a signed distance."""

    @property
    def lo(self) -> Array: ...

    @property
    def hi(self) -> Array: ...

    def sd(self, x: Array, y: Array, z: Array) -> Array: ...


def _rot_apply(rot: Array | None, x: Array, y: Array, z: Array) -> tuple[Array, Array, Array]:
    """Rotate broadcastable coordinates into a local frame: ``u = rot.T @ p``."""
    if rot is None:
        return x, y, z
    r = rot
    return (
        r[0, 0] * x + r[1, 0] * y + r[2, 0] * z,
        r[0, 1] * x + r[1, 1] * y + r[2, 1] * z,
        r[0, 2] * x + r[1, 2] * y + r[2, 2] * z,
    )


def rotation_matrix(yaw: float, pitch: float, roll: float) -> Array:
    """Rotation matrix from three angles in radians (z, y, x axes, applied in that order)."""
    cz, sz = np.cos(yaw), np.sin(yaw)
    cy, sy = np.cos(pitch), np.sin(pitch)
    cx, sx = np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


class Shape:
    """Base class: a bounded implicit solid."""

    lo: Array
    hi: Array

    def sd(self, x: Array, y: Array, z: Array) -> Array:
        """Approximate signed distance (mm) at the given broadcastable coordinates."""
        raise NotImplementedError


@dataclass
class Ellipsoid(Shape):
    """Ellipsoid with semi-axes ``axes`` (mm) along the columns of ``rot`` (default: x, y, z)."""

    center: tuple[float, float, float]
    axes: tuple[float, float, float]
    rot: Array | None = None
    lo: Array = field(init=False)
    hi: Array = field(init=False)

    def __post_init__(self) -> None:
        if min(self.axes) <= 0:
            raise ValueError(f"axes must be positive, got {self.axes}")
        r = max(self.axes) if self.rot is not None else None
        half = np.full(3, r) if r is not None else np.asarray(self.axes, float)
        self.lo = np.asarray(self.center, float) - half
        self.hi = np.asarray(self.center, float) + half

    def sd(self, x: Array, y: Array, z: Array) -> Array:
        cx, cy, cz = self.center
        u, v, w = _rot_apply(self.rot, x - cx, y - cy, z - cz)
        a, b, c = self.axes
        qa, qb, qc = u / a, v / b, w / c
        f = np.sqrt(qa * qa + qb * qb + qc * qc)
        g = np.sqrt((qa / a) ** 2 + (qb / b) ** 2 + (qc / c) ** 2)
        # f / |grad f| is the local radius, between the smallest and the largest semi-axis.
        r_loc = np.where(g > 1e-9, f / np.maximum(g, 1e-9), min(self.axes))
        return ((f - 1.0) * r_loc).astype(np.float32, copy=False)


@dataclass
class EllipticCylinder(Shape):
    """Axial elliptic cylinder between ``z0`` and ``z1`` (flat caps)."""

    cx: float
    cy: float
    ax: float
    ay: float
    z0: float
    z1: float
    lo: Array = field(init=False)
    hi: Array = field(init=False)

    def __post_init__(self) -> None:
        self.lo = np.array([self.cx - self.ax, self.cy - self.ay, self.z0])
        self.hi = np.array([self.cx + self.ax, self.cy + self.ay, self.z1])

    def sd(self, x: Array, y: Array, z: Array) -> Array:
        qa, qb = (x - self.cx) / self.ax, (y - self.cy) / self.ay
        f = np.sqrt(qa * qa + qb * qb)
        g = np.sqrt((qa / self.ax) ** 2 + (qb / self.ay) ** 2)
        r_loc = np.where(g > 1e-9, f / np.maximum(g, 1e-9), min(self.ax, self.ay))
        radial = (f - 1.0) * r_loc
        cap = np.maximum(self.z0 - z, z - self.z1)
        return np.maximum(radial, cap).astype(np.float32, copy=False)


@dataclass
class Tube(Shape):
    """Tapered tube along a polyline ``points`` (N, 3) with radii ``radii`` (N,), round ends."""

    points: Array
    radii: Array
    lo: Array = field(init=False)
    hi: Array = field(init=False)

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, float)
        self.radii = np.asarray(self.radii, float)
        if self.points.ndim != 2 or self.points.shape[1] != 3 or len(self.points) < 2:
            raise ValueError("points must be an (N>=2, 3) array")
        if self.radii.shape != (len(self.points),):
            raise ValueError("radii must have one value per point")
        rmax = float(self.radii.max())
        self.lo = self.points.min(axis=0) - rmax
        self.hi = self.points.max(axis=0) + rmax

    def sd(self, x: Array, y: Array, z: Array) -> Array:
        out: Array | None = None
        for k in range(len(self.points) - 1):
            p0, p1 = self.points[k], self.points[k + 1]
            r0, r1 = self.radii[k], self.radii[k + 1]
            lo = np.minimum(p0, p1) - max(r0, r1)
            hi = np.maximum(p0, p1) + max(r0, r1)
            d = p1 - p0
            ll = float(d @ d)
            dx, dy, dz = x - p0[0], y - p0[1], z - p0[2]
            t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / ll, 0.0, 1.0)
            ex, ey, ez = dx - t * d[0], dy - t * d[1], dz - t * d[2]
            seg = np.sqrt(ex * ex + ey * ey + ez * ez) - (r0 + t * (r1 - r0))
            # Far from this segment's box the value only needs to stay positive.
            box = np.maximum(
                np.maximum(np.maximum(lo[0] - x, x - hi[0]), np.maximum(lo[1] - y, y - hi[1])),
                np.maximum(lo[2] - z, z - hi[2]),
            )
            seg = np.where(box > 0, np.maximum(seg, box), seg)
            out = seg if out is None else np.minimum(out, seg)
        assert out is not None
        return out.astype(np.float32, copy=False)


def smooth_min(a: Array, b: Array, k: float) -> Array:
    """Polynomial smooth minimum (blend radius ``k`` mm) of two distance fields."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * k * 0.25


@dataclass
class SmoothUnion(Shape):
    """Smooth union of several shapes, blended over ``k`` mm."""

    parts: list[Shape]
    k: float = 10.0
    lo: Array = field(init=False)
    hi: Array = field(init=False)

    def __post_init__(self) -> None:
        self.lo = np.min([p.lo for p in self.parts], axis=0) - self.k
        self.hi = np.max([p.hi for p in self.parts], axis=0) + self.k

    def sd(self, x: Array, y: Array, z: Array) -> Array:
        out = self.parts[0].sd(x, y, z)
        for p in self.parts[1:]:
            out = smooth_min(out, p.sd(x, y, z), self.k)
        return out


@dataclass
class Carved(Shape):
    """``base`` intersected with ``keep_inside`` shapes and minus ``cut`` shapes (with margins).

    ``cut`` entries are ``(shape, margin_mm)``: the solid loses everything closer than the
    margin to that shape, so neighbouring organs touch without overlapping.
    """

    base: Shape
    keep_inside: list[Shape] = field(default_factory=list)
    cut: list[tuple[Shape, float]] = field(default_factory=list)
    lo: Array = field(init=False)
    hi: Array = field(init=False)

    def __post_init__(self) -> None:
        self.lo = np.max([self.base.lo, *[s.lo for s in self.keep_inside]], axis=0)
        self.hi = np.min([self.base.hi, *[s.hi for s in self.keep_inside]], axis=0)

    def sd(self, x: Array, y: Array, z: Array) -> Array:
        out = self.base.sd(x, y, z)
        for s in self.keep_inside:
            out = np.maximum(out, s.sd(x, y, z))
        for s, margin in self.cut:
            out = np.maximum(out, margin - s.sd(x, y, z))
        return out


@dataclass
class Wavy(Shape):
    """``base`` with a smooth random surface displacement (sum of plane waves, mm)."""

    base: Shape
    amplitude: Array  # (K,) mm
    wavevector: Array  # (K, 3) rad/mm
    phase: Array  # (K,)
    lo: Array = field(init=False)
    hi: Array = field(init=False)

    def __post_init__(self) -> None:
        pad = float(np.abs(self.amplitude).sum())
        self.lo = self.base.lo - pad
        self.hi = self.base.hi + pad

    def sd(self, x: Array, y: Array, z: Array) -> Array:
        out = self.base.sd(x, y, z)
        for a, kv, ph in zip(self.amplitude, self.wavevector, self.phase, strict=True):
            out = out + np.float32(a) * np.cos(kv[0] * x + kv[1] * y + kv[2] * z + ph)
        return out


def random_waves(
    rng: np.random.Generator, n: int, amplitude_mm: float, wavelength_mm: tuple[float, float]
) -> tuple[Array, Array, Array]:
    """Random plane waves for :class:`Wavy`: (amplitudes, wavevectors, phases)."""
    amp = rng.uniform(0.4, 1.0, n) * amplitude_mm / np.sqrt(n)
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    wl = rng.uniform(*wavelength_mm, n)
    return amp, direction * (2 * np.pi / wl)[:, None], rng.uniform(0, 2 * np.pi, n)
