"""Rendering: implicit anatomy -> one phase's HU volume with partial volume and noise.

Partial volume: every output slice is the mean of ``sub`` thin sub-slices; in each sub-slice an
item's occupancy is ``clip(0.5 - sd / ramp, 0, 1)`` with a ramp of about one voxel, so edges are
smooth in plane and along z. Items are composited in order: ``v <- v + f * (hu - v)``. The work
is done slab by slab and, per item, only inside its bounding box (float32 throughout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from node.phantom.anatomy import Item

Array = np.ndarray

#: Stored values are HU + 1024, 12 bits (PS3.3 C.7.6.3 / C.8.2.1: Rescale Intercept -1024).
RESCALE_INTERCEPT = -1024
MAX_STORED = 4095


@dataclass(frozen=True)
class Grid:
    """An axial image grid (LPS, orientation 1\\0\\0\\0\\1\\0).

    ``origin`` is the patient position (mm) of the centre of voxel (k=0, i=0, j=0), slice 0 the
    most inferior slice; ``shape`` is (slices, rows, columns).
    """

    origin: tuple[float, float, float]
    pixel_mm: float
    slice_mm: float
    shape: tuple[int, int, int]

    def axis(self, dim: str) -> Array:
        """Coordinates (mm) of the voxel centres along ``"x"``, ``"y"`` or ``"z"``."""
        n = {"z": self.shape[0], "y": self.shape[1], "x": self.shape[2]}[dim]
        o = {"x": self.origin[0], "y": self.origin[1], "z": self.origin[2]}[dim]
        step = self.slice_mm if dim == "z" else self.pixel_mm
        return o + step * np.arange(n)

    @property
    def voxel_ml(self) -> float:
        return self.pixel_mm**2 * self.slice_mm / 1000.0


@dataclass
class Rendered:
    """One rendered phase: HU (float32) and, when asked for, the truth channels."""

    hu: Array
    liver_fraction: Array | None = None  # float32, per output voxel
    lesion_labels: Array | None = None  # uint8, label where lesion occupancy >= 0.5
    liver_volume_ml: float = 0.0


class SdCache:
    """Signed distances of the non-lesion items, sampled once on a regular anatomy-frame grid.

    Every phase then only interpolates (trilinear, separable) instead of re-evaluating the
    implicit functions: the shapes are smooth at the sampling step, so the error is far below
    a voxel. Lesions are always evaluated exactly.
    """

    def __init__(self, lo: Array, hi: Array, step: float = 2.0) -> None:
        self.lo, self.hi, self.step = np.asarray(lo, float), np.asarray(hi, float), step
        self._grids: dict[int, tuple[Array, Array]] = {}

    def _sample(self, item: Item) -> tuple[Array, Array]:
        key = id(item)
        if key not in self._grids:
            lo = np.maximum(item.shape.lo - 2 * self.step, self.lo)
            hi = np.minimum(item.shape.hi + 2 * self.step, self.hi)
            n = np.maximum(np.ceil((hi - lo) / self.step).astype(int) + 1, 2)
            ax = [lo[d] + self.step * np.arange(n[d]) for d in range(3)]
            vals = item.shape.sd(
                ax[0][None, None, :].astype(np.float32),
                ax[1][None, :, None].astype(np.float32),
                ax[2][:, None, None].astype(np.float32),
            )
            vals = np.broadcast_to(vals, (n[2], n[1], n[0])).astype(np.float32)
            self._grids[key] = (lo, vals)
        return self._grids[key]

    def sd(self, item: Item, x: Array, y: Array, z: Array) -> Array:
        """Interpolated signed distance on the separable grid ``x`` (nx,), ``y``, ``z``."""
        lo, vals = self._sample(item)
        out = vals
        for axis, coords, origin in ((0, z, lo[2]), (1, y, lo[1]), (2, x, lo[0])):
            n = out.shape[axis]
            t = (np.asarray(coords, float) - origin) / self.step
            i0 = np.clip(np.floor(t).astype(int), 0, n - 2)
            w = np.clip(t - i0, 0.0, 1.0).astype(np.float32)
            shape = [1, 1, 1]
            shape[axis] = len(coords)
            w = w.reshape(shape)
            a = np.take(out, i0, axis=axis)
            b = np.take(out, i0 + 1, axis=axis)
            out = a + w * (b - a)
        return out


def _index_range(
    lo: float, hi: float, start: float, step: float, n: int, pad: float
) -> tuple[int, int]:
    a = int(np.floor((lo - pad - start) / step))
    b = int(np.ceil((hi + pad - start) / step)) + 1
    return max(a, 0), min(b, n)


def _paint(buf: Array, f: Array, hu: Array | float) -> None:
    """Composite in place: ``buf <- buf + f * (hu - buf)``."""
    buf += f * (np.asarray(hu, dtype=np.float32) - buf)


def _item_box(
    item: Item, grid: Grid, offset: Array, zs: Array, ramp: float
) -> tuple[slice, slice, slice] | None:
    """Index box of an item (within the given z sample positions), or None if outside."""
    lo = item.shape.lo + offset
    hi = item.shape.hi + offset
    x0 = grid.origin[0]
    y0 = grid.origin[1]
    ja, jb = _index_range(lo[0], hi[0], x0, grid.pixel_mm, grid.shape[2], ramp)
    ia, ib = _index_range(lo[1], hi[1], y0, grid.pixel_mm, grid.shape[1], ramp)
    ka = int(np.searchsorted(zs, lo[2] - ramp))
    kb = int(np.searchsorted(zs, hi[2] + ramp))
    if ja >= jb or ia >= ib or ka >= kb:
        return None
    return slice(ka, kb), slice(ia, ib), slice(ja, jb)


def _paint_items(
    items: list[Item],
    buf: Array,
    zs: Array,
    grid: Grid,
    offset: Array,
    phase: str,
    table: dict[str, dict[str, float]],
    ramp: float,
    channels: dict[str, Array] | None,
    cache: SdCache | None,
) -> None:
    """Composite ``items`` into ``buf`` whose slices sit at patient z positions ``zs``."""
    xs, ys = grid.axis("x"), grid.axis("y")
    for item in items:
        box = _item_box(item, grid, offset, zs, ramp)
        if box is None:
            continue
        ks, is_, js = box
        x = (xs[js] - offset[0]).astype(np.float32)[None, None, :]
        y = (ys[is_] - offset[1]).astype(np.float32)[None, :, None]
        z = (zs[ks] - offset[2]).astype(np.float32)[:, None, None]
        if cache is not None and not item.lesion_label:
            sd = cache.sd(item, x.ravel(), y.ravel(), z.ravel())
        else:
            sd = item.shape.sd(x, y, z)
        f = np.clip(np.float32(0.5) - sd / np.float32(ramp), 0.0, 1.0).astype(np.float32)
        if not f.any():
            continue
        if item.hu_field is not None:
            hu: Array | float = item.hu_field(x, y, z, phase, table, ramp)
        else:
            hu = table[item.tissue][phase]
        _paint(buf[box], f, hu)
        if channels is None:
            continue
        if item.liver is not None:
            _paint(channels["liver"][box], f, item.liver)
        if item.lesion_label:
            occ = channels["lesion_f"][box]
            np.maximum(occ, f, out=occ)
            lab = channels["lesion_id"][box]
            lab[f > 0] = item.lesion_label


def render_phase(
    items: list[Item],
    grid: Grid,
    offset: Array,
    phase: str,
    table: dict[str, dict[str, float]],
    *,
    sub: int = 4,
    truth: bool = False,
    slab: int = 4,
    cache: SdCache | None = None,
) -> Rendered:
    """Render one phase on ``grid``; anatomy is displaced by ``offset`` (mm, x/y/z).

    With ``truth`` the liver occupancy, the lesion label map and the liver volume (integral of
    the occupancy on the sub-slice grid, ml) are returned as well. With a ``cache`` the
    non-lesion shapes are interpolated from it (reuse one cache for all phases of a study).
    """
    nz, ny, nx = grid.shape
    ramp = max(grid.pixel_mm, grid.slice_mm / sub)
    coarse = [it for it in items if it.coarse]
    fine = [it for it in items if not it.coarse]
    out = np.empty(grid.shape, np.float32)
    res = Rendered(hu=out)
    if truth:
        res.liver_fraction = np.zeros(grid.shape, np.float32)
        res.lesion_labels = np.zeros(grid.shape, np.uint8)
    sub_off = (np.arange(sub) + 0.5) / sub - 0.5
    z_all = grid.axis("z")
    liver_sum = 0.0
    for k0 in range(0, nz, slab):
        k1 = min(k0 + slab, nz)
        zc = z_all[k0:k1]
        cbuf = np.full((k1 - k0, ny, nx), -1000.0, np.float32)
        _paint_items(coarse, cbuf, zc, grid, offset, phase, table, ramp, None, None)
        zf = (zc[:, None] + sub_off[None, :] * grid.slice_mm).ravel()
        fbuf = np.repeat(cbuf, sub, axis=0)
        ch: dict[str, Array] | None = None
        if truth:
            ch = {
                "liver": np.zeros_like(fbuf),
                "lesion_f": np.zeros_like(fbuf),
                "lesion_id": np.zeros(fbuf.shape, np.uint8),
            }
        _paint_items(fine, fbuf, zf, grid, offset, phase, table, ramp, ch, cache)
        out[k0:k1] = fbuf.reshape(k1 - k0, sub, ny, nx).mean(axis=1)
        if ch is not None and res.liver_fraction is not None and res.lesion_labels is not None:
            liver_sum += float(ch["liver"].sum(dtype=np.float64))
            res.liver_fraction[k0:k1] = ch["liver"].reshape(k1 - k0, sub, ny, nx).mean(axis=1)
            occ = ch["lesion_f"].reshape(k1 - k0, sub, ny, nx).mean(axis=1)
            ids = ch["lesion_id"].reshape(k1 - k0, sub, ny, nx).max(axis=1)
            res.lesion_labels[k0:k1] = np.where(occ >= 0.5, ids, 0)
    res.liver_volume_ml = liver_sum * grid.voxel_ml / sub
    return res


def add_noise(hu: Array, rng: np.random.Generator, noise_hu: float) -> Array:
    """Add slightly spatially correlated Gaussian noise with standard deviation ``noise_hu``."""
    if noise_hu <= 0:
        return hu
    white = rng.standard_normal(hu.shape, dtype=np.float32)
    corr = gaussian_filter(white, sigma=(0.0, 0.6, 0.6))
    corr *= np.float32(noise_hu / max(float(corr.std()), 1e-6))
    return hu + corr


def to_stored(hu: Array) -> Array:
    """HU -> 12-bit stored values (uint16), i.e. ``round(HU - RescaleIntercept)`` clipped."""
    return np.clip(np.rint(hu - RESCALE_INTERCEPT), 0, MAX_STORED).astype(np.uint16)
