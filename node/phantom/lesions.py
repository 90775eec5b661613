"""NET-like liver metastases: shape, enhancement pattern, exact volume, placement.

A lesion is a mildly irregular ellipsoid: in its local normalised frame ``q = R^T (p - c) / axes``
the surface is ``|q| = m(q/|q|)`` with ``m(d) = 1 + sum_k a_k cos(w_k . d + phi_k)``. Its volume
is therefore exactly ``a b c / 3 * integral(m(d)^3 dOmega)``, computed by quadrature (not by
counting voxels). The attenuation follows the clinical protocol's size pattern: < 2 cm
homogeneous; 2-3 cm heterogeneous with a weaker centre (ring-like in the arterial phase);
> 3 cm with small, non-central, non-enhancing necrotic areas (20-30 HU in every phase).
Lipiodol deposits (after TACE) are dense in every phase. Necrosis and lipiodol are part of the
lesion; they are confined to it because the lesion's own occupancy masks them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy.spatial import ConvexHull

from node.phantom.attenuation import HU_RANGES, LIPIODOL_HU, PHASES
from node.phantom.shapes import Vec3, rotation_matrix, vec3

Array = np.ndarray


@dataclass(frozen=True)
class Spot:
    """A blob inside a lesion, in the lesion's normalised frame (radius in units of |q|)."""

    center_q: Vec3
    radius_q: float
    hu: float


@dataclass(frozen=True)
class Lesion:
    """Parameters of one metastasis (anatomy frame, mm); JSON-serialisable via :meth:`to_dict`."""

    truth_id: str
    center: Vec3
    axes: Vec3
    angles: Vec3
    wave_w: tuple[Vec3, ...]
    wave_a: tuple[float, ...]
    wave_phi: tuple[float, ...]
    tex_w: tuple[Vec3, ...]
    tex_phi: tuple[float, ...]
    deltas: dict[str, float]  # phase -> HU relative to liver
    centre_weight: float  # how much weaker the centre enhances (0 = homogeneous)
    texture: float  # relative amplitude of patchy heterogeneity
    necrosis: tuple[Spot, ...] = ()
    lipiodol: tuple[Spot, ...] = ()
    enhancement: float = 1.0  # 1 = untreated; lower after effective treatment
    status: str = "present"
    rot: Array = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rot", rotation_matrix(*self.angles))

    # --- geometry -------------------------------------------------------------------------
    def _local(self, x: Array, y: Array, z: Array) -> tuple[Array, Array, Array, Array]:
        r = self.rot
        dx, dy, dz = x - self.center[0], y - self.center[1], z - self.center[2]
        a, b, c = self.axes
        qa = (r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz) / a
        qb = (r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz) / b
        qc = (r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz) / c
        rho = np.sqrt(qa * qa + qb * qb + qc * qc)
        return qa, qb, qc, rho

    def radial(self, da: Array, db: Array, dc: Array) -> Array:
        """The radial function ``m(d)`` for unit directions (in the normalised frame)."""
        m: Array = np.ones(
            np.broadcast_shapes(np.shape(da), np.shape(db), np.shape(dc)), np.float32
        )
        for w, amp, phi in zip(self.wave_w, self.wave_a, self.wave_phi, strict=True):
            m = m + np.float32(amp) * np.cos(w[0] * da + w[1] * db + w[2] * dc + phi)
        return m

    def _rm(self, qa: Array, qb: Array, qc: Array, rho: Array) -> tuple[Array, Array]:
        safe = np.maximum(rho, 1e-6)
        da, db, dc = qa / safe, qb / safe, qc / safe
        da = np.where(rho > 1e-6, da, 1.0)
        m = self.radial(da, db, dc)
        a, b, c = self.axes
        r_dir = np.sqrt((a * da) ** 2 + (b * db) ** 2 + (c * dc) ** 2)
        return m, r_dir

    def sd(self, x: Array, y: Array, z: Array) -> Array:
        """Approximate signed distance (radial, mm)."""
        qa, qb, qc, rho = self._local(x, y, z)
        m, r_dir = self._rm(qa, qb, qc, rho)
        return ((rho - m) * r_dir).astype(np.float32, copy=False)

    @property
    def extent(self) -> float:
        """Radius (mm) of a sphere around the centre that contains the lesion."""
        return float(max(self.axes) * (1.0 + np.abs(self.wave_a).sum()))

    @property
    def lo(self) -> Array:
        return np.asarray(self.center) - self.extent

    @property
    def hi(self) -> Array:
        return np.asarray(self.center) + self.extent

    def volume_ml(self) -> float:
        """Exact continuous volume (ml) by quadrature over the unit sphere."""
        d = fibonacci_sphere(6000)
        m = self.radial(d[:, 0], d[:, 1], d[:, 2]).astype(float)
        return float(np.prod(self.axes) * 4.0 * np.pi / 3.0 * np.mean(m**3) / 1000.0)

    def diameter_mm(self) -> float:
        """Equivalent-sphere diameter (mm)."""
        return float((6.0 * self.volume_ml() * 1000.0 / np.pi) ** (1.0 / 3.0))

    def surface_points(self, n: int = 400, scale: float = 1.0) -> Array:
        """(n, 3) points on the surface (optionally of the lesion grown by ``scale``)."""
        d = fibonacci_sphere(n)
        m = self.radial(d[:, 0], d[:, 1], d[:, 2])[:, None]
        local = d * m * np.asarray(self.axes) * scale
        return local @ self.rot.T + np.asarray(self.center)

    def scaled(self, volume_factor: float) -> Lesion:
        """The same lesion with its volume multiplied by ``volume_factor`` (> 0)."""
        if volume_factor <= 0:
            raise ValueError(f"volume_factor must be > 0, got {volume_factor}")
        s = volume_factor ** (1.0 / 3.0)
        return replace(self, axes=vec3(np.asarray(self.axes) * s))

    # --- attenuation ----------------------------------------------------------------------
    def hu_field(
        self,
        x: Array,
        y: Array,
        z: Array,
        phase: str,
        table: dict[str, dict[str, float]],
        ramp_mm: float,
    ) -> Array:
        """HU inside the lesion for one phase (meaningful where the lesion occupies space)."""
        qa, qb, qc, rho = self._local(x, y, z)
        m, _ = self._rm(qa, qb, qc, rho)
        native = table["liver"]["native"] + self.deltas["native"]
        tex: Array = np.zeros_like(rho, dtype=np.float32)
        for w, phi in zip(self.tex_w, self.tex_phi, strict=True):
            tex = tex + np.cos(w[0] * qa + w[1] * qb + w[2] * qc + phi)
        tex = tex / max(len(self.tex_w), 1)
        if phase == "native":
            val = native + 4.0 * tex
        else:
            enh = table["liver"][phase] + self.deltas[phase] - native
            phase_w = {"arterial": 1.0, "portal_venous": 0.3, "delayed": 0.5}[phase]
            core = np.clip(1.0 - (rho / m) ** 2, 0.0, 1.0)
            weight = 1.0 - self.centre_weight * phase_w * core + self.texture * tex
            val = native + self.enhancement * enh * weight
        val = np.asarray(val, dtype=np.float32)
        for spot in (*self.necrosis, *self.lipiodol):
            dist = np.sqrt(
                (qa - spot.center_q[0]) ** 2
                + (qb - spot.center_q[1]) ** 2
                + (qc - spot.center_q[2]) ** 2
            )
            sd = (dist - spot.radius_q) * float(np.mean(self.axes))
            f = np.clip(0.5 - sd / ramp_mm, 0.0, 1.0)
            val = val + f * (spot.hu - val)
        return val

    # --- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("rot", None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Lesion:
        d = dict(d)
        d.pop("rot", None)
        d["necrosis"] = tuple(
            Spot(vec3(s["center_q"]), s["radius_q"], s["hu"]) for s in d.get("necrosis", ())
        )
        d["lipiodol"] = tuple(
            Spot(vec3(s["center_q"]), s["radius_q"], s["hu"]) for s in d.get("lipiodol", ())
        )
        for key in ("center", "axes", "angles"):
            d[key] = vec3(d[key])
        for key in ("wave_a", "wave_phi", "tex_phi"):
            d[key] = tuple(float(v) for v in d[key])
        d["wave_w"] = tuple(vec3(w) for w in d["wave_w"])
        d["tex_w"] = tuple(vec3(w) for w in d["tex_w"])
        return cls(**d)


def fibonacci_sphere(n: int) -> Array:
    """``n`` nearly uniform unit vectors (equal-area quadrature points)."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1.0 - 2.0 * i / n)
    theta = np.pi * (1.0 + 5.0**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], 1)


def longest_axial_diameter_mm(lesion: Lesion) -> float:
    """Longest in-plane (axial) diameter over all axial planes through the lesion (mm)."""
    ext = lesion.extent
    step = max(min(ext / 32.0, 0.5), 0.1)
    ax = np.arange(-ext, ext + step, step)
    cx, cy, cz = lesion.center
    x = (cx + ax)[None, None, :]
    y = (cy + ax)[None, :, None]
    z = (cz + ax)[:, None, None]
    inside = lesion.sd(x, y, z) < 0
    best = 0.0
    for k in np.flatnonzero(inside.any(axis=(1, 2))):
        ii, jj = np.nonzero(inside[k])
        pts = np.stack([ax[jj], ax[ii]], 1)
        if len(pts) >= 3:
            try:
                pts = pts[ConvexHull(pts).vertices]
            except Exception:  # degenerate (collinear) cross-section: use all points
                pass
        diff = pts[:, None, :] - pts[None, :, :]
        best = max(best, float(np.sqrt((diff**2).sum(-1)).max()))
    return best + step  # pixel centres underestimate the extent by about one step


def make_lesion(
    rng: np.random.Generator, truth_id: str, center: Array, diameter_mm: float
) -> Lesion:
    """A random lesion of the given equivalent-sphere diameter at ``center``."""
    r = diameter_mm / 2.0
    k1, k2 = rng.uniform(0.8, 1.25, 2)
    axes = (r * k1, r * k2, r / (k1 * k2))
    n_w = 4
    dirs = rng.normal(size=(n_w, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    wave_w = dirs * rng.uniform(1.5, 3.5, (n_w, 1))
    wave_a = rng.uniform(0.01, 0.03, n_w) * (1.0 if diameter_mm > 15 else 0.6)
    tex_dirs = rng.normal(size=(3, 3))
    tex_w = tex_dirs / np.linalg.norm(tex_dirs, axis=1, keepdims=True) * rng.uniform(4, 8, (3, 1))
    deltas = {p: float(rng.uniform(*HU_RANGES["lesion_delta"][p])) for p in PHASES}
    if diameter_mm < 20:
        centre_w, texture = 0.0, 0.03
    elif diameter_mm < 30:
        centre_w, texture = float(rng.uniform(0.35, 0.55)), 0.12
    else:
        centre_w, texture = float(rng.uniform(0.2, 0.35)), 0.15
    lesion = Lesion(
        truth_id=truth_id,
        center=vec3(center),
        axes=axes,
        angles=vec3(rng.uniform(-np.pi, np.pi, 3)),
        wave_w=tuple(vec3(w) for w in wave_w),
        wave_a=tuple(float(a) for a in wave_a),
        wave_phi=tuple(float(p) for p in rng.uniform(0, 2 * np.pi, n_w)),
        tex_w=tuple(vec3(w) for w in tex_w),
        tex_phi=tuple(float(p) for p in rng.uniform(0, 2 * np.pi, 3)),
        deltas=deltas,
        centre_weight=centre_w,
        texture=texture,
        necrosis=_necrosis(rng) if diameter_mm > 30 else (),
    )
    # Normalise so the exact volume equals that of the requested sphere.
    target = np.pi / 6.0 * diameter_mm**3 / 1000.0
    return lesion.scaled(target / lesion.volume_ml())


def _off_centre_spots(
    rng: np.random.Generator,
    n: int,
    radius: tuple[float, float],
    dist: tuple[float, float],
    hu: tuple[float, float],
) -> tuple[Spot, ...]:
    spots = []
    for _ in range(n):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        c = d * rng.uniform(*dist)
        spots.append(Spot(vec3(c), float(rng.uniform(*radius)), float(rng.uniform(*hu))))
    return tuple(spots)


def _necrosis(rng: np.random.Generator) -> tuple[Spot, ...]:
    """Small non-central necrotic / cystic areas of a > 3 cm lesion."""
    return _off_centre_spots(
        rng, int(rng.integers(1, 3)), (0.15, 0.25), (0.45, 0.6), HU_RANGES["necrosis"]["native"]
    )


def lipiodol_spots(rng: np.random.Generator) -> tuple[Spot, ...]:
    """Lipiodol deposits left by TACE inside a treated lesion."""
    return _off_centre_spots(rng, int(rng.integers(1, 4)), (0.3, 0.5), (0.0, 0.4), LIPIODOL_HU)
