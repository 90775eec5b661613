"""The phantom's abdomen: organs and vessels as implicit shapes, randomised mildly by seed.

Anatomy frame: DICOM LPS millimetres (x to the patient's left, y posterior, z to the head),
midline at x = 0, body centre at y = 0. Items are painted in list order (later items overwrite
earlier ones, weighted by their partial-volume occupancy); ``coarse`` items vary slowly along z
and are evaluated once per output slice. ``liver`` is the value an item paints into the liver
truth channel (1 inside the liver envelope: parenchyma, intrahepatic vessels and lesions; 0 for
the IVC and the extrahepatic portal vein; ``None`` leaves the channel alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from node.phantom.shapes import (
    Carved,
    Ellipsoid,
    EllipticCylinder,
    Shape,
    SmoothUnion,
    Solid,
    Tube,
    Wavy,
    random_waves,
    rotation_matrix,
    vec3,
)

Array = np.ndarray
HuField = Callable[[Array, Array, Array, str, dict[str, dict[str, float]], float], Array]


@dataclass
class Item:
    """One painted structure: a shape and its attenuation (a tissue name or a field)."""

    name: str
    shape: Solid
    tissue: str = ""
    hu_field: HuField | None = None
    liver: float | None = None
    lesion_label: int = 0
    coarse: bool = False


@dataclass
class Anatomy:
    """The static anatomy of one patient (lesions are added by the generator)."""

    items: list[Item]
    liver: Shape
    vessels_to_avoid: list[Shape]
    liver_z: tuple[float, float]  # inferior tip, dome (mm)
    body_axes: tuple[float, float]
    extras: dict[str, float] = field(default_factory=dict)

    def liver_interior_sd(self, pts: Array) -> Array:
        """Signed distance-like value to the lesion-admissible liver (N, 3) -> (N,)."""
        x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
        sd = self.liver.sd(x, y, z).astype(float)
        for v in self.vessels_to_avoid:
            sd = np.maximum(sd, 4.0 - v.sd(x, y, z))
        return sd


class _HalfSpaceY(Shape):
    """Everything anterior of ``y0`` (y < y0): used to put gas on top of a supine stomach."""

    def __init__(self, y0: float) -> None:
        self.y0 = y0
        self.lo = np.array([-1e4, -1e4, -1e4])
        self.hi = np.array([1e4, y0, 1e4])

    def sd(self, x: Array, y: Array, z: Array) -> Array:
        return np.broadcast_to(y - self.y0, np.broadcast_shapes(x.shape, y.shape, z.shape))


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _body(rng: np.random.Generator) -> tuple[list[Item], EllipticCylinder, dict[str, float]]:
    """Body wall layers and spine (coarse items) and the abdominal cavity."""
    big = 2000.0
    a, b = _u(rng, 150, 168), _u(rng, 108, 122)
    fat, wall = _u(rng, 12, 24), _u(rng, 8, 13)
    cav = EllipticCylinder(0, 0, a - fat - wall, b - fat - wall, -big, big)
    yv = b - _u(rng, 72, 80)  # vertebral body centre
    items = [
        Item("subcutaneous fat", EllipticCylinder(0, 0, a, b, -big, big), "fat", coarse=True),
        Item(
            "abdominal wall",
            EllipticCylinder(0, 0, a - fat, b - fat, -big, big),
            "muscle",
            coarse=True,
        ),
        Item("cavity", cav, "visceral_fat", coarse=True),
    ]
    for side in (-1, 1):
        items.append(
            Item(
                "paraspinal muscle",
                Ellipsoid((side * 32.0, yv + 45, 0.0), (22.0, 24.0, big)),
                "muscle",
                coarse=True,
            )
        )
    items += [
        Item(
            "vertebral arch",
            EllipticCylinder(0, yv + 30, 16, 14, -big, big),
            "bone_cortical",
            coarse=True,
        ),
        Item(
            "spinous process",
            EllipticCylinder(0, yv + 50, 5, 13, -big, big),
            "bone_cancellous",
            coarse=True,
        ),
        Item("spinal canal", EllipticCylinder(0, yv + 29, 9, 8, -big, big), "csf", coarse=True),
        Item(
            "vertebral cortex",
            EllipticCylinder(0, yv, 23, 18, -big, big),
            "bone_cortical",
            coarse=True,
        ),
        Item(
            "vertebral body",
            EllipticCylinder(0, yv, 20.5, 15.5, -big, big),
            "bone_cancellous",
            coarse=True,
        ),
    ]
    return items, cav, {"yv": yv, "a": a, "b": b}


def _discs(yv: float, z_lo: float, z_hi: float, z_phase: float) -> list[Item]:
    """Intervertebral discs every 36 mm (28 mm vertebra + 8 mm disc)."""
    out = []
    z = z_lo - (z_lo - z_phase) % 36.0
    while z < z_hi:
        out.append(
            Item("disc", EllipticCylinder(0, yv, 23.5, 18.5, z, z + 8.0), "disc", coarse=True)
        )
        z += 36.0
    return out


def _liver(
    rng: np.random.Generator,
    zc: float,
    scale: float,
    cav: Shape,
    cuts: list[tuple[Shape, float]],
    waves: tuple[Array, Array, Array],
) -> Shape:
    ref = np.array([-45.0, -15.0, zc])

    def ell(
        c: tuple[float, float, float], ax: tuple[float, float, float], rot: Array | None = None
    ) -> Ellipsoid:
        cc = ref + (np.asarray(c) - ref) * scale
        return Ellipsoid(vec3(cc), vec3(np.asarray(ax) * scale), rot)

    right = ell((-68.0, -8.0, zc), (82.0, 82.0, 74.0))
    left = ell((18.0, -45.0, zc + 28.0), (66.0, 30.0, 42.0), rotation_matrix(0.25, 0.0, 0.1))
    caudate = ell((-12.0, 12.0, zc + 18.0), (20.0, 18.0, 32.0))
    union = SmoothUnion([right, left, caudate], k=22.0)
    return Carved(Wavy(union, *waves), keep_inside=[cav], cut=cuts)


def _liver_volume_ml(shape: Shape, step: float = 3.0) -> float:
    """Quick volume estimate of a shape on a coarse grid (ml)."""
    ax = [np.arange(lo, hi + step, step) for lo, hi in zip(shape.lo, shape.hi, strict=True)]
    x, y, z = ax[0][None, None, :], ax[1][None, :, None], ax[2][:, None, None]
    return float((shape.sd(x, y, z) < 0).sum() * step**3 / 1000.0)


def build_anatomy(rng: np.random.Generator) -> Anatomy:
    """Build one patient's anatomy (without lesions) from ``rng``."""
    items, cav, geo = _body(rng)
    yv, zc = geo["yv"], _u(rng, -170, -130)
    items += _discs(yv, zc - 260, zc + 260, _u(rng, 0, 36))
    zlo, zhi = zc - 400, zc + 400
    xa, xi = _u(rng, 14, 20), _u(rng, -30, -23)
    aorta = Tube(
        np.array([[xa, yv - 31, zlo], [xa, yv - 31, zc + 60], [xa - 5, yv - 45, zhi]]),
        np.array([11.0, 11.5, 13.0]),
    )
    ivc_top = np.array([xi + 2, yv - 32, zc + 66])
    ivc = Tube(
        np.array(
            [[xi, yv - 28, zlo], [xi, yv - 28, zc - 20], ivc_top, [xi + 8, yv - 45, zc + 110]]
        ),
        np.array([10.0, 10.5, 12.0, 14.0]),
    )
    kid_r = Ellipsoid(
        (-72, yv + 14, zc - 72 + _u(rng, -8, 8)), (27, 21, 50), rotation_matrix(-0.3, 0.2, 0.15)
    )
    kid_l = Ellipsoid(
        (74, yv + 14, zc - 52 + _u(rng, -8, 8)), (27, 21, 50), rotation_matrix(0.3, -0.2, 0.15)
    )
    stomach = Ellipsoid(
        (62 + _u(rng, -6, 6), -32, zc + 22), (44, 34, 55), rotation_matrix(0.4, 0.3, 0.0)
    )
    spleen = Carved(
        Ellipsoid(
            (88, 52, zc + 18), (28 * _u(rng, 0.9, 1.1), 55, 50), rotation_matrix(-0.7, 0.0, 0.0)
        ),
        keep_inside=[cav],
    )
    retro = EllipticCylinder(0, yv, 45, 35, zlo, zhi)
    cuts: list[tuple[Shape, float]] = [
        (retro, 0.0),
        (aorta, 5.0),
        (kid_r, 3.0),
        (stomach, 1.5),
        (spleen, 2.0),
    ]
    waves = random_waves(rng, 6, 5.0, (60.0, 140.0))
    target, scale = _u(rng, 1400, 1800), 1.0
    for step in (5.0, 4.0, 3.0):
        liver = _liver(rng, zc, scale, cav, cuts, waves)
        scale *= (target / _liver_volume_ml(liver, step)) ** (1.0 / 3.0)
    liver = _liver(rng, zc, scale, cav, cuts, waves)
    items += _chest_and_bowel(rng, cav, zc, liver)
    items += _retroperitoneum(kid_r, kid_l, spleen, stomach, aorta, cav)
    items.append(Item("liver", liver, "liver", liver=1.0))
    trunk, branches, hvs = _liver_vessels(xa, yv, zc, ivc_top, liver)
    items.append(Item("portal vein", trunk, "portal_vein", liver=0.0))
    items += [Item("portal branch", b, "portal_vein", liver=1.0) for b in branches]
    items += [Item("hepatic vein", h, "hepatic_vein", liver=1.0) for h in hvs]
    items.append(Item("ivc", ivc, "ivc", liver=0.0))
    z_ax = np.arange(liver.lo[2], liver.hi[2], 2.0)
    x_ax = np.arange(liver.lo[0], liver.hi[0], 2.0)
    y_ax = np.arange(liver.lo[1], liver.hi[1], 2.0)
    occ = liver.sd(x_ax[None, None, :], y_ax[None, :, None], z_ax[:, None, None]) < 0
    zs = z_ax[occ.any(axis=(1, 2))]
    return Anatomy(
        items=items,
        liver=liver,
        vessels_to_avoid=[ivc, trunk],
        liver_z=(float(zs.min()), float(zs.max())),
        body_axes=(geo["a"], geo["b"]),
        extras={"liver_scale": scale, "liver_ml": target},
    )


def _retroperitoneum(
    kid_r: Ellipsoid, kid_l: Ellipsoid, spleen: Shape, stomach: Ellipsoid, aorta: Tube, cav: Shape
) -> list[Item]:
    items = []
    for kid in (kid_r, kid_l):
        items.append(Item("kidney", Carved(kid, keep_inside=[cav]), "kidney"))
        c = np.asarray(kid.center) + np.array([np.sign(-kid.center[0]) * 12.0, -4.0, 0.0])
        items.append(
            Item("renal sinus", Ellipsoid(vec3(c), (9.0, 9.0, 24.0), kid.rot), "visceral_fat")
        )
    items.append(Item("spleen", spleen, "spleen"))
    inner = Ellipsoid(stomach.center, vec3(np.asarray(stomach.axes) - 4.0), stomach.rot)
    gas_level = stomach.center[1] - 0.6 * stomach.axes[1]
    items += [
        Item("stomach wall", Carved(stomach, keep_inside=[cav]), "stomach_wall"),
        Item("stomach content", inner, "stomach_content"),
        Item("stomach gas", Carved(inner, keep_inside=[_HalfSpaceY(gas_level)]), "gas"),
        Item("aorta", aorta, "aorta"),
    ]
    return items


def _chest_and_bowel(rng: np.random.Generator, cav: Shape, zc: float, liver: Shape) -> list[Item]:
    heart = Ellipsoid((25, -35, zc + 128), (68, 55, 52))
    lungs = [
        Carved(Ellipsoid((-78, 25, zc + 150), (72, 80, 118)), keep_inside=[cav], cut=[(heart, 2)]),
        Carved(Ellipsoid((82, 25, zc + 145), (66, 80, 110)), keep_inside=[cav], cut=[(heart, 2)]),
    ]
    colon_pts = np.array(
        [
            [-88, 5, zc - 300],
            [-88, -5, zc - 120],
            [-78, -35, zc - 85],
            [-35, -75, zc - 92],
            [35, -72, zc - 80],
            [85, -15, zc - 45],
            [90, 15, zc - 120],
            [90, 15, zc - 300],
        ],
        float,
    )
    colon_pts[:, :2] += rng.uniform(-5, 5, (len(colon_pts), 2))
    colon = Carved(
        Tube(colon_pts, np.full(len(colon_pts), 21.0)), keep_inside=[cav], cut=[(liver, 1.5)]
    )
    lumen = Tube(colon_pts, np.full(len(colon_pts), 17.0))
    items = [Item("lung", lung, "lung") for lung in lungs]
    items += [
        Item("heart", heart, "heart"),
        Item("colon", colon, "bowel"),
        Item("colon gas", Carved(lumen, keep_inside=[colon]), "gas"),
    ]
    for _ in range(5):
        c = (_u(rng, -50, 50), _u(rng, -70, -20), zc - _u(rng, 90, 160))
        loop = Carved(
            Ellipsoid(c, (_u(rng, 14, 22), _u(rng, 12, 18), _u(rng, 20, 35))),
            keep_inside=[cav],
            cut=[(liver, 1.5)],
        )
        items.append(Item("small bowel", loop, "bowel"))
    return items


def _liver_vessels(
    xa: float, yv: float, zc: float, ivc_top: Array, liver: Shape
) -> tuple[Shape, list[Shape], list[Shape]]:
    """Portal vein trunk (extrahepatic), its intrahepatic branches, and the hepatic veins."""
    hilum = np.array([-32.0, -8.0, zc - 12.0])
    trunk = Tube(
        np.array([[xa - 20, yv - 60, zc - 60], [-10, -12, zc - 35], hilum]),
        np.array([7.0, 7.0, 6.5]),
    )
    rp = np.array([-68.0, -4.0, zc - 4.0])
    lp = np.array([2.0, -32.0, zc + 6.0])
    branch_tubes = [
        Tube(np.array([hilum, rp, [-98, -28, zc + 22]]), np.array([6.0, 5.0, 3.0])),
        Tube(np.array([rp, [-98, 28, zc - 28]]), np.array([4.5, 3.0])),
        Tube(np.array([hilum, lp, [34, -52, zc + 22]]), np.array([5.5, 4.5, 3.0])),
        Tube(np.array([lp, [-8, -62, zc - 10]]), np.array([3.5, 2.5])),
    ]
    top = ivc_top - np.array([0.0, 0.0, 4.0])
    hv_tubes = [
        Tube(np.array([[-108, 8, zc - 15], [-70, 12, zc + 30], top]), np.array([2.5, 4.0, 5.5])),
        Tube(np.array([[-45, -58, zc - 18], [-30, -25, zc + 30], top]), np.array([2.5, 4.0, 5.0])),
        Tube(np.array([[30, -48, zc + 12], [0, -20, zc + 45], top]), np.array([2.5, 3.5, 5.0])),
    ]
    branches: list[Shape] = [Carved(t, keep_inside=[liver]) for t in branch_tubes]
    hvs: list[Shape] = [Carved(t, keep_inside=[liver]) for t in hv_tubes]
    return trunk, branches, hvs
