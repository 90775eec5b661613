"""Align the other phases to the reference volume and resample them onto its grid.

First the patient-coordinate geometry maps every phase onto the reference grid (PS3.3
C.7.6.2: same Frame of Reference), whatever the slice thickness or field of view of each phase;
then a rigid transform (translation, optionally with rotation), estimated by Mattes mutual
information (contrast differs between phases, so intensities are not comparable), absorbs
breathing and patient motion between acquisitions (typically up to 1-2 cm). Optionally a
constrained B-spline step inside the liver region follows: breathing deforms the liver, and
the optimiser's bounds keep every displacement within :data:`MAX_DEFORMATION_MM`.

The residual misalignment is measured after the transform: the aligned volume is registered
again (translation only, from identity) in the whole liver region and in each of its eight
octants (:data:`RESIDUAL_SPLITS`); the largest translation found is the residual. A rigid
transform cannot absorb a deformation, so the octants see what the whole region averages out.

Policy (``deform_above_mm``; the analysis' switches are in ``node.analysis.run``): rigid
with rotation always; the deformable step only when the residual after the rigid step exceeds
one pixel of the registration grid (:data:`REGISTRATION_PIXEL_MM`), and kept only when it
lowers the residual. Always deforming would cost ~2 s more per phase and, on rigidly moved
phantoms, only fits noise (1-2 mm of displacement for 0.1-0.2 mm less residual). The
analysis does not run it for now (``run.DEFORMABLE_STEP``): on the real HCC_007 studies it
is triggered and lowers the residual, but the lesion detection then leaks along the liver
border (the older B-spline step did the same). Everything runs on the liver region's box
binned to ~1.5 mm in-plane and thin slices to ~2.5 mm (:func:`registration_bins`; only that
box of the reference is converted for ITK), with capped metric samples
(:data:`RESIDUAL_MAX_SAMPLES`, :data:`BSPLINE_MAX_SAMPLES`), without precomputed gradient
images (ITK's default recursive-Gaussian gradient images cost 3x the optimisation here), and
the B-spline is tabulated as a 5 mm displacement field for the full-resolution resampling.

Measured cost per phase (CPU s of one process; the 2-core machine was shared with other
jobs, so wall times varied up to 2x):

=========================================  ===========================  ===================
volume                                     this module                  before (old module)
=========================================  ===========================  ===================
phantom 512 x 512 x 35, 5 mm               0.9-1.1 rigid + residual     2.0-2.2 translation
                                           (policy: no deformable       only; 9-12 with
                                           step, residual 0.3-0.6 mm)   everything on
same, deformable step forced               3.0-3.7                      9-12
HCC_007 512 x 512 x 75, 2.5 mm             3.2-4.4 rigid + residual     2.7-5.5 translation
                                           (1.6-2.6 mm); ~9.5 with the  only; 24-37 with
                                           policy (the step runs:       everything on
                                           residual -> 0.6-1.0 mm)
phantom 512 x 512 x 140, 1.25 mm           2.6-3.5 (binned to 2.5 mm;   3.7-5.3 unbinned, the
                                           1.1-1.5 of it resampling     whole reference
                                           the whole volume)            converted
=========================================  ===========================  ===================

Deterministic: the metric samples a regular grid with a fixed seed (ITK otherwise jitters it
with a clock-seeded generator) and runs single-threaded (:data:`REGISTRATION_THREADS`): with
two threads ITK's metric sums differ from run to run in the last bits, and so did the
resampled volumes. Resampling itself is multi-threaded (each voxel on its own: no sums).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from node.study.model import Geometry

logger = logging.getLogger(__name__)

#: HU window for registration: outside it (air, dense bone/contrast) values are clipped.
REGISTRATION_WINDOW_HU = (-200.0, 300.0)
#: Translations beyond this (mm) are treated as a failed registration.
MAX_SHIFT_MM = 40.0
#: Rotations beyond this (degrees, any axis): the rotation is dropped, translation only.
MAX_ROTATION_DEG = 10.0
#: Share of the fixed image's voxels sampled by the metric, and the sampler's fixed seed.
SAMPLING_FRACTION = 0.1
SAMPLING_SEED = 20240301
#: Threads of every registration: 1, as threaded ITK metric sums vary from run to run.
REGISTRATION_THREADS = 1
#: In-plane pixel size (mm) the registration works at, and the least slice thickness (mm).
REGISTRATION_PIXEL_MM = 1.5
REGISTRATION_SLICE_MM = 2.5
#: Multi-resolution levels of the registration (image shrink factors).
SHRINK_FACTORS = (4, 2)
#: Margin (mm) beyond the largest accepted shift kept around the region in the moving image.
MOVING_MARGIN_MM = 10.0
#: Pad value outside the moving volume (air).
OUTSIDE_HU = -1000.0

#: Residual: blocks per axis of the region's box, a block's least share inside the mask,
#: and the fewest voxels along an axis for it to be split.
RESIDUAL_SPLITS = (2, 2, 2)
RESIDUAL_MIN_MASK_SHARE = 0.2
RESIDUAL_MIN_BLOCK_VOXELS = 8
#: Most metric sample points of one residual registration (3 parameters need few).
RESIDUAL_MAX_SAMPLES = 10_000

#: B-spline control point spacing (mm) and the largest displacement (mm) it may add.
BSPLINE_GRID_MM = 60.0
MAX_DEFORMATION_MM = 10.0
#: L-BFGS-B iterations and cost function evaluations of the deformable step (its cost).
BSPLINE_ITERATIONS = 20
BSPLINE_EVALUATIONS = 20
#: Most metric sample points of the deformable step: its cost is proportional to them.
BSPLINE_MAX_SAMPLES = 6_000
#: Spacing (mm) at which the B-spline is tabulated for resampling the full volume.
FIELD_SPACING_MM = 5.0


@dataclass(frozen=True)
class Alignment:
    """Result of aligning one phase: the resampled array and the transform found.

    ``residual_mm`` is the largest translation still found between the aligned volume and the
    reference in the region or one of its octants (None when not measured);
    ``rigid_residual_mm`` the same after the rigid step alone; ``deformation_mm`` the largest
    displacement the deformable step added inside the region (0 without one). ``method`` is
    "geometry", "translation", "rigid" or "rigid+deformable" (what the array went through).
    """

    array: np.ndarray  # float32 HU on the reference grid
    shift_mm: tuple[float, float, float]  # patient-space translation reference -> moving
    metric: float
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    residual_mm: float | None = None
    deformation_mm: float = 0.0
    notes: tuple[str, ...] = ()
    rigid_residual_mm: float | None = None
    method: str = "geometry"


def to_sitk(array: np.ndarray, geometry: Geometry, dtype: type = np.float32) -> sitk.Image:
    """A SimpleITK image with the volume's physical geometry (index order x=j, y=i, z=k)."""
    return _with_geometry(sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=dtype)),
                          geometry)


def _with_geometry(img: sitk.Image, geometry: Geometry) -> sitk.Image:
    """``img`` given the spacing, origin and direction of ``geometry`` (ITK's x, y, z order)."""
    dz, dy, dx = geometry.spacing
    img.SetSpacing((dx, dy, dz))
    img.SetOrigin(geometry.origin)
    d = np.column_stack([geometry.row_cosine, geometry.column_cosine, geometry.slice_normal])
    img.SetDirection(tuple(float(v) for v in d.ravel()))
    return img


def resample(moving: sitk.Image, reference: Geometry,
             transform: sitk.Transform | None = None) -> np.ndarray:
    """Resample ``moving`` onto the reference grid (linear), as a float32 array.

    The grid is given by its geometry: the reference volume itself is never converted.
    """
    grid = _with_geometry(sitk.Image([1, 1, 1], sitk.sitkUInt8), reference)
    nz, ny, nx = reference.shape
    out = sitk.Resample(moving, [nx, ny, nz], transform or sitk.Transform(), sitk.sitkLinear,
                        grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection(), OUTSIDE_HU,
                        sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _sub_geometry(geometry: Geometry, box: tuple[slice, ...]) -> Geometry:
    """The geometry of ``array[box]``: its origin as ITK computes it for a region."""
    grid = _with_geometry(sitk.Image([1, 1, 1], sitk.sitkUInt8), geometry)
    k, i, j = (int(b.start) for b in box)
    origin = grid.TransformIndexToPhysicalPoint((j, i, k))
    return replace(geometry, origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
                   shape=tuple(int(b.stop - b.start) for b in box))  # type: ignore[arg-type]


def align_to_reference(
    moving: np.ndarray,
    moving_geometry: Geometry,
    reference: np.ndarray,
    reference_geometry: Geometry,
    estimate_shift: bool = True,
    fixed_mask: np.ndarray | None = None,
    *,
    rotation: bool = False,
    deformable: bool = False,
    measure_residual: bool = False,
    deform_above_mm: float | None = None,
) -> Alignment:
    """Align ``moving`` onto ``reference`` and resample it onto the reference grid.

    Parameters
    ----------
    moving, moving_geometry:
        HU volume of the phase to align and its geometry (any slice thickness / FOV).
    reference, reference_geometry:
        HU volume and geometry of the reference (portal venous) phase.
    estimate_shift:
        False: only resample by geometry (same scanner position assumed).
    fixed_mask:
        Optional boolean mask on the reference grid (e.g. the dilated liver) to which the
        similarity metric is restricted, so that the liver, not the body wall, is aligned.
    rotation:
        Estimate a rigid transform with rotation (Euler) instead of a pure translation.
    deformable:
        Follow with a constrained B-spline step inside ``fixed_mask`` (required for it).
    measure_residual:
        Report the residual misalignment (a few small translation registrations). With
        ``deformable`` the deformable step is then kept only when it lowers the residual.
    deform_above_mm:
        With ``deformable``: run the deformable step only when the residual after the rigid
        step exceeds this (mm; never less than one pixel of the registration grid), which
        implies measuring it. None: always run it.

    Returns
    -------
    Alignment
        The moving volume on the reference grid and the transform applied.
    """
    mov_img = to_sitk(moving, moving_geometry)
    if not estimate_shift:
        return Alignment(resample(mov_img, reference_geometry), (0.0, 0.0, 0.0), 0.0)
    fixed, mov_small, mask = _registration_inputs(reference, reference_geometry, mov_img,
                                                  fixed_mask)
    transform, metric, notes = _rigid_with_limits(fixed, mov_small, mask, rotation)
    shift, angles = _translation_and_angles(transform)
    # What was kept: an implausible rotation falls back to a translation.
    method = "rigid" if transform.GetName() == "Euler3DTransform" else "translation"
    residual = None
    if measure_residual or (deformable and deform_above_mm is not None):
        residual = _local_residual(fixed, mov_small, mask, transform)
    rigid_residual = residual
    final: sitk.Transform = transform
    deformation = 0.0
    if deformable and mask is None:
        notes.append("deformable step needs a region; rigid only")
    elif deformable and deform_above_mm is not None and residual is not None and (
            residual <= max(deform_above_mm, *fixed.GetSpacing()[:2])):
        notes.append(f"deformable step not needed (rigid residual {residual:.1f} mm)")
    elif deformable and mask is not None:
        final, deformation, residual, note = _deform_if_it_helps(fixed, mov_small, mask,
                                                                 transform, residual)
        notes.append(note)
        method = "rigid+deformable" if deformation > 0.0 else method
    if residual is not None:
        notes.append(f"residual misalignment {residual:.1f} mm")
    array = resample(mov_img, reference_geometry, final)
    return Alignment(array, shift, metric, angles, residual, deformation,  # type: ignore[arg-type]
                     tuple(notes), rigid_residual, method)


def _registration_inputs(reference: np.ndarray, reference_geometry: Geometry,
                         mov_img: sitk.Image, fixed_mask: np.ndarray | None
                         ) -> tuple[sitk.Image, sitk.Image, sitk.Image | None]:
    """Fixed image cropped to the mask's box, both binned to the registration grid
    (:func:`registration_bins`), clamped to :data:`REGISTRATION_WINDOW_HU`.

    Only the box of the reference is converted (the whole volume is never needed).
    """
    mask_img = None
    box: tuple[slice, ...] = tuple(slice(0, n) for n in reference.shape)
    if fixed_mask is not None and fixed_mask.any():
        # Registering only the mask's bounding box is much faster than the whole image.
        box = ndimage.find_objects(fixed_mask.astype(bool, copy=False).view(np.uint8))[0]
        mask_img = to_sitk(fixed_mask[box], _sub_geometry(reference_geometry, box), np.uint8)
    fixed_img = to_sitk(reference[box], _sub_geometry(reference_geometry, box))
    mov_img = _crop_around(mov_img, fixed_img, MAX_SHIFT_MM + MOVING_MARGIN_MM)
    bins = list(registration_bins(reference_geometry.spacing))
    if max(bins) > 1:
        fixed_img = sitk.BinShrink(fixed_img, bins)
        mov_img = sitk.BinShrink(mov_img, bins)
        if mask_img is not None:
            mask_img = sitk.Cast(sitk.BinShrink(mask_img, bins) > 0, sitk.sitkUInt8)
    lo_hu, hi_hu = REGISTRATION_WINDOW_HU
    return (sitk.Clamp(fixed_img, sitk.sitkFloat32, lo_hu, hi_hu),
            sitk.Clamp(mov_img, sitk.sitkFloat32, lo_hu, hi_hu), mask_img)


def registration_bins(spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    """Voxels binned per registration voxel, (x, y, z), for a (dz, dy, dx) ``spacing``.

    Rigid motion needs no fine pixels: in-plane about :data:`REGISTRATION_PIXEL_MM`, and
    slices thinner than :data:`REGISTRATION_SLICE_MM` are averaged to about that thickness
    (thin slices add no information to a rigid fit, but every voxel of them costs in the
    pyramid, the metric and the residual).
    """
    dz, dy, dx = spacing
    f = max(1, int(round(REGISTRATION_PIXEL_MM / min(dy, dx))))
    return f, f, max(1, int(REGISTRATION_SLICE_MM / dz + 1e-6))


def _crop_around(image: sitk.Image, region: sitk.Image, margin_mm: float) -> sitk.Image:
    """``image`` cropped to the physical box of ``region`` plus ``margin_mm`` (smoothing and
    shrinking the whole moving volume at every level would cost more than the metric)."""
    last = np.array(region.GetSize()) - 1
    corners = np.array([region.TransformIndexToPhysicalPoint([int(v) for v in np.array(c) * last])
                        for c in np.ndindex(2, 2, 2)])
    lo_pt, hi_pt = corners.min(axis=0) - margin_mm, corners.max(axis=0) + margin_mm
    box = np.array([image.TransformPhysicalPointToContinuousIndex(
        [float(v) for v in np.where(np.array(c) > 0, hi_pt, lo_pt)]) for c in np.ndindex(2, 2, 2)])
    lo = np.maximum(np.floor(box.min(axis=0)), 0).astype(int)
    hi = np.minimum(np.ceil(box.max(axis=0)), np.array(image.GetSize()) - 1).astype(int)
    if np.any(hi < lo):  # no overlap: the registration will say so
        return image
    return sitk.RegionOfInterest(image, [int(v) for v in hi - lo + 1], [int(v) for v in lo])


def _translation_and_angles(tx: sitk.Transform) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(translation mm, rotation angles deg) of a translation or Euler transform."""
    if isinstance(tx, sitk.Euler3DTransform) or tx.GetName() == "Euler3DTransform":
        e = sitk.Euler3DTransform(tx)
        return (tuple(float(v) for v in e.GetTranslation()),
                (float(np.degrees(e.GetAngleX())), float(np.degrees(e.GetAngleY())),
                 float(np.degrees(e.GetAngleZ()))))
    return tuple(float(v) for v in tx.GetParameters()), (0.0, 0.0, 0.0)


def _new_method(fixed_mask: sitk.Image | None) -> sitk.ImageRegistrationMethod:
    """Mattes MI, deterministic regular sampling, fixed threading, optional fixed mask."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    # Regular sampling with a fixed seed (ITK jitters the regular grid with a clock-seeded
    # generator otherwise) keeps the result deterministic.
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    reg.SetMetricSamplingPercentage(SAMPLING_FRACTION, SAMPLING_SEED)
    # Gradients by central differences at the sample points: the default precomputed
    # (recursive Gaussian) gradient images of both volumes cost more than the optimisation.
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetNumberOfThreads(REGISTRATION_THREADS)
    reg.SetNumberOfWorkUnits(REGISTRATION_THREADS)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    return reg


def _limit_samples(reg: sitk.ImageRegistrationMethod, fixed: sitk.Image,
                   fixed_mask: sitk.Image | None, shrink: int, max_samples: int) -> None:
    """Sample SAMPLING_FRACTION of the (shrunk, masked) fixed voxels, but at most
    ``max_samples``: on thin-slice studies the region holds many times the points needed."""
    if fixed_mask is None:
        inside = float(np.prod(fixed.GetSize()))
    else:
        inside = float(np.count_nonzero(sitk.GetArrayViewFromImage(fixed_mask)))
    points = max(inside / shrink**3, 1.0)
    reg.SetMetricSamplingPercentage(min(SAMPLING_FRACTION, max_samples / points),
                                    SAMPLING_SEED)


def _rigid_with_limits(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image | None,
                       rotation: bool) -> tuple[sitk.Transform, float, list[str]]:
    """Rigid registration; implausible rotations fall back to a translation, implausible
    shifts to the geometry alone."""
    notes: list[str] = []
    transform, metric = _register_rigid(fixed, moving, mask, rotation)
    shift, angles = _translation_and_angles(transform)
    if max(abs(a) for a in angles) > MAX_ROTATION_DEG:
        logger.warning("registration rotation %s deg too large; translation only", angles)
        notes.append(f"rotation {max(abs(a) for a in angles):.0f} deg > "
                     f"{MAX_ROTATION_DEG:g} deg rejected; translation only")
        transform, metric = _register_rigid(fixed, moving, mask, False)
        shift, _ = _translation_and_angles(transform)
    if float(np.linalg.norm(shift)) > MAX_SHIFT_MM:
        logger.warning("registration shift %s mm too large; geometry only", shift)
        notes.append(f"shift {np.linalg.norm(shift):.0f} mm > {MAX_SHIFT_MM:g} mm rejected")
        transform, metric = sitk.TranslationTransform(3), 0.0
    return transform, metric, notes


def _register_rigid(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None,
                    rotation: bool) -> tuple[sitk.Transform, float]:
    """Multi-resolution rigid registration (translation, or Euler with rotation)."""
    reg = _new_method(fixed_mask)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=4.0, minStep=0.05, numberOfIterations=150, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    # Full resolution adds little to a rigid estimate but costs most of the time.
    reg.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    reg.SetSmoothingSigmasPerLevel([float(s) / 2 for s in SHRINK_FACTORS])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    initial: sitk.Transform
    if rotation:
        centre = fixed.TransformContinuousIndexToPhysicalPoint(
            [(n - 1) / 2.0 for n in fixed.GetSize()])
        initial = sitk.Euler3DTransform(centre, 0.0, 0.0, 0.0, (0.0,) * 3)
    else:
        initial = sitk.TranslationTransform(3)
    reg.SetInitialTransform(initial, inPlace=True)
    reg.Execute(fixed, moving)
    return initial, float(reg.GetMetricValue())


def _blocks(size: tuple[int, ...]) -> Iterator[tuple[list[int], list[int]]]:
    """(index, size) of the whole box, then of its blocks (:data:`RESIDUAL_SPLITS`)."""
    yield [0, 0, 0], list(size)
    splits = [n if s >= n * RESIDUAL_MIN_BLOCK_VOXELS else 1
              for n, s in zip(RESIDUAL_SPLITS, size, strict=True)]
    for b in np.ndindex(*splits):
        lo = [b[d] * size[d] // splits[d] for d in range(3)]
        hi = [(b[d] + 1) * size[d] // splits[d] for d in range(3)]
        yield lo, [h - low for h, low in zip(hi, lo, strict=True)]


def _local_residual(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image | None,
                    transform: sitk.Transform) -> float:
    """Largest translation (mm) still found between the aligned moving image and the fixed
    one, over the whole box and its blocks that lie mostly in the mask."""
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear,
                           REGISTRATION_WINDOW_HU[0], sitk.sitkFloat32)
    largest = 0.0
    for lo, size in _blocks(fixed.GetSize()):
        block_mask = None if mask is None else sitk.RegionOfInterest(mask, size, lo)
        if block_mask is not None and (
                sitk.GetArrayViewFromImage(block_mask).mean() < RESIDUAL_MIN_MASK_SHARE):
            continue
        block = sitk.RegionOfInterest(fixed, size, lo)
        reg = _new_method(block_mask)
        _limit_samples(reg, block, block_mask, 1, RESIDUAL_MAX_SAMPLES)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=1.0, minStep=0.05, numberOfIterations=60, relaxationFactor=0.6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([1])
        reg.SetSmoothingSigmasPerLevel([0.0])
        tx = sitk.TranslationTransform(3)
        reg.SetInitialTransform(tx, inPlace=True)
        try:
            reg.Execute(block, warped)
        except RuntimeError as exc:  # too few samples inside both images: no estimate
            logger.debug("residual of block %s+%s not measured: %s", lo, size, exc)
            continue
        largest = max(largest, float(np.linalg.norm(tx.GetParameters())))
    return largest


def _deform_if_it_helps(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image,
                        rigid: sitk.Transform, before: float | None
                        ) -> tuple[sitk.Transform, float, float | None, str]:
    """The deformable step, kept only if it lowers the residual (when that is measured).

    Returns the transform, the largest displacement added, the residual and a note.
    """
    final, deformation, note = _deformable_step(fixed, moving, mask, rigid)
    if final is rigid or before is None:
        return final, deformation, before, note
    after = _local_residual(fixed, moving, mask, final)
    if after >= before:
        return rigid, 0.0, before, (f"deformable step discarded: residual {before:.1f} -> "
                                    f"{after:.1f} mm; rigid only")
    return final, deformation, after, f"{note}; residual {before:.1f} -> {after:.1f} mm"


def _deformable_step(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image,
                     rigid: sitk.Transform) -> tuple[sitk.Transform, float, str]:
    """A coarse B-spline on top of ``rigid`` inside the mask, displacements bounded.

    The coefficients are bounded by MAX_DEFORMATION_MM / sqrt(3) per axis; cubic B-spline
    weights are non-negative and sum to 1, so no displacement exceeds the cap.
    """
    extent = [sz * sp for sz, sp in zip(fixed.GetSize(), fixed.GetSpacing(), strict=True)]
    mesh = [max(1, int(round(e / BSPLINE_GRID_MM))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    bound = MAX_DEFORMATION_MM / np.sqrt(3.0)
    reg = _new_method(fixed_mask)
    _limit_samples(reg, fixed, fixed_mask, 2, BSPLINE_MAX_SAMPLES)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5,
                             numberOfIterations=BSPLINE_ITERATIONS,
                             maximumNumberOfFunctionEvaluations=BSPLINE_EVALUATIONS,
                             lowerBound=-bound, upperBound=bound)
    reg.SetShrinkFactorsPerLevel([2])
    reg.SetSmoothingSigmasPerLevel([0.0])
    reg.SetMovingInitialTransform(rigid)
    reg.SetInitialTransform(bspline, inPlace=True)
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as exc:
        return rigid, 0.0, f"deformable step failed ({exc}); rigid only"
    field, largest = _tabulate(bspline, fixed, fixed_mask)
    if largest > MAX_DEFORMATION_MM:  # the bounds make this unreachable; kept as a guard
        return rigid, 0.0, (f"deformable step refused: {largest:.1f} mm > "
                            f"{MAX_DEFORMATION_MM:g} mm; rigid only")
    composite = sitk.CompositeTransform(rigid)
    composite.AddTransform(field)
    return composite, largest, f"deformable step: up to {largest:.1f} mm in the liver region"


def _tabulate(bspline: sitk.Transform, fixed: sitk.Image, fixed_mask: sitk.Image
              ) -> tuple[sitk.DisplacementFieldTransform, float]:
    """The B-spline as a displacement field every ~FIELD_SPACING_MM, and its largest
    displacement (mm) inside the mask.

    A cubic B-spline costs ~5x a linearly interpolated field at each of the millions of
    voxels of the full-resolution resampling; with 60 mm control spacing the interpolation
    error at 5 mm is far below 0.1 mm. The field reaches one cell beyond the region's box,
    where it is 0: the transform stays continuous at the box instead of stepping.
    """
    step = [max(1, int(round(FIELD_SPACING_MM / s))) for s in fixed.GetSpacing()]
    size = [int(np.ceil((n - 1) / k)) + 3 for n, k in zip(fixed.GetSize(), step, strict=True)]
    field = sitk.TransformToDisplacementField(
        bspline, sitk.sitkVectorFloat64, size,
        fixed.TransformContinuousIndexToPhysicalPoint([-float(k) for k in step]),
        [s * k for s, k in zip(fixed.GetSpacing(), step, strict=True)], fixed.GetDirection())
    values = sitk.GetArrayFromImage(field)
    values[[0, -1]] = 0.0
    values[:, [0, -1]] = 0.0
    values[:, :, [0, -1]] = 0.0
    inside = sitk.GetArrayFromImage(sitk.Resample(fixed_mask, field, sitk.Transform(),
                                                  sitk.sitkNearestNeighbor, 0)) > 0
    largest = float(np.linalg.norm(values[inside], axis=-1).max()) if inside.any() else 0.0
    table = sitk.GetImageFromArray(values, isVector=True)
    table.CopyInformation(field)
    return sitk.DisplacementFieldTransform(table), largest
