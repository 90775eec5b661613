"""Align the other phases to the reference volume and resample them onto its grid.

First the patient-coordinate geometry maps every phase onto the reference grid (PS3.3
C.7.6.2: same Frame of Reference), whatever the slice thickness or field of view of each phase;
then a rigid transform (translation, optionally with rotation), estimated by Mattes mutual
information (contrast differs between phases, so intensities are not comparable), absorbs
breathing and patient motion between acquisitions (typically up to 1-2 cm). Optionally a
constrained B-spline step inside the liver region follows (breathing deforms the liver; the
displacement is capped at :data:`MAX_DEFORMATION_MM`). The residual misalignment is measured
afterwards by re-registering the aligned volume (a translation that should be ~0).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from node.study.model import Geometry

logger = logging.getLogger(__name__)

#: HU window for registration: outside it (air, dense bone/contrast) values are clipped.
REGISTRATION_WINDOW_HU = (-200.0, 300.0)
#: Translations beyond this (mm) are treated as a failed registration.
MAX_SHIFT_MM = 40.0
#: Share of the fixed image's voxels sampled by the metric, and the sampler's fixed seed.
SAMPLING_FRACTION = 0.1
SAMPLING_SEED = 20240301
#: In-plane pixel size (mm) the registration works at.
REGISTRATION_PIXEL_MM = 1.5
#: Multi-resolution levels of the registration (image shrink factors).
SHRINK_FACTORS = (4, 2)
#: Pad value outside the moving volume (air).
OUTSIDE_HU = -1000.0


#: B-spline control point spacing (mm) and the largest displacement (mm) it may add.
BSPLINE_GRID_MM = 60.0
MAX_DEFORMATION_MM = 10.0
BSPLINE_ITERATIONS = 30


@dataclass(frozen=True)
class Alignment:
    """Result of aligning one phase: the resampled array and the transform found.

    ``residual_mm`` is the translation still found between the aligned volume and the
    reference (None when not measured); ``deformation_mm`` the largest displacement the
    deformable step added inside the region (0 without one).
    """

    array: np.ndarray  # float32 HU on the reference grid
    shift_mm: tuple[float, float, float]  # patient-space translation reference -> moving
    metric: float
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    residual_mm: float | None = None
    deformation_mm: float = 0.0
    notes: tuple[str, ...] = ()


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image with the volume's physical geometry (index order x=j, y=i, z=k)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    dz, dy, dx = geometry.spacing
    img.SetSpacing((dx, dy, dz))
    img.SetOrigin(geometry.origin)
    d = np.column_stack([geometry.row_cosine, geometry.column_cosine, geometry.slice_normal])
    img.SetDirection(tuple(float(v) for v in d.ravel()))
    return img


def resample(moving: sitk.Image, reference: sitk.Image,
             transform: sitk.Transform | None = None) -> np.ndarray:
    """Resample ``moving`` onto the reference grid (linear), as a float32 array."""
    out = sitk.Resample(moving, reference, transform or sitk.Transform(), sitk.sitkLinear,
                        OUTSIDE_HU, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


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
        Re-register the result to report the residual misalignment (costs one translation
        registration).

    Returns
    -------
    Alignment
        The moving volume on the reference grid and the transform applied.
    """
    ref_img = to_sitk(reference, reference_geometry)
    mov_img = to_sitk(moving, moving_geometry)
    if not estimate_shift:
        return Alignment(resample(mov_img, ref_img), (0.0, 0.0, 0.0), 0.0)
    fixed_img, mov_small, mask_img = _registration_inputs(ref_img, mov_img, fixed_mask,
                                                          reference_geometry)
    transform, metric = _register_rigid(fixed_img, mov_small, mask_img, rotation)
    shift, angles = _translation_and_angles(transform)
    notes: list[str] = []
    if float(np.linalg.norm(shift)) > MAX_SHIFT_MM:
        logger.warning("registration shift %s mm too large; geometry only", shift)
        notes.append(f"shift {np.linalg.norm(shift):.0f} mm > {MAX_SHIFT_MM:g} mm rejected")
        transform, shift, angles, metric = sitk.Euler3DTransform(), (0.0,) * 3, (0.0,) * 3, 0.0
    final: sitk.Transform = transform
    deformation = 0.0
    if deformable and mask_img is not None:
        final, deformation, note = _deformable_step(fixed_img, mov_small, mask_img, transform)
        notes.append(note)
    array = resample(mov_img, ref_img, final)
    residual = None
    if measure_residual:
        aligned_small = _registration_inputs(ref_img, to_sitk(array, reference_geometry),
                                             fixed_mask, reference_geometry)[1]
        rest, _ = _register_rigid(fixed_img, aligned_small, mask_img, False)
        residual = float(np.linalg.norm(_translation_and_angles(rest)[0]))
        notes.append(f"residual misalignment {residual:.1f} mm")
    return Alignment(array, shift, metric, angles, residual, deformation,  # type: ignore[arg-type]
                     tuple(notes))


def _registration_inputs(ref_img: sitk.Image, mov_img: sitk.Image,
                         fixed_mask: np.ndarray | None, reference_geometry: Geometry
                         ) -> tuple[sitk.Image, sitk.Image, sitk.Image | None]:
    """Fixed image cropped to the mask's box, both binned to ~REGISTRATION_PIXEL_MM."""
    mask_img = None
    fixed_img = ref_img
    if fixed_mask is not None and fixed_mask.any():
        # Registering only the mask's bounding box is much faster than the whole image.
        box = ndimage.find_objects(fixed_mask.astype(np.int8))[0]
        lo = [int(s.start) for s in reversed(box)]  # SimpleITK index order (x, y, z)
        size = [int(s.stop - s.start) for s in reversed(box)]
        fixed_img = sitk.RegionOfInterest(ref_img, size, lo)
        mask_img = sitk.RegionOfInterest(
            sitk.Cast(to_sitk(fixed_mask.astype(np.uint8), reference_geometry),
                      sitk.sitkUInt8), size, lo)
    # Rigid motion needs no fine pixels: register at about REGISTRATION_PIXEL_MM in-plane.
    f = max(1, int(round(REGISTRATION_PIXEL_MM / min(reference_geometry.spacing[1:]))))
    if f == 1:
        return fixed_img, mov_img, mask_img
    fixed_img = sitk.BinShrink(fixed_img, [f, f, 1])
    if mask_img is not None:
        mask_img = sitk.Cast(sitk.BinShrink(mask_img, [f, f, 1]) > 0, sitk.sitkUInt8)
    return fixed_img, sitk.BinShrink(mov_img, [f, f, 1]), mask_img


def _translation_and_angles(tx: sitk.Transform) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(translation mm, rotation angles deg) of a translation or Euler transform."""
    if isinstance(tx, sitk.Euler3DTransform) or tx.GetName() == "Euler3DTransform":
        e = sitk.Euler3DTransform(tx)
        return (tuple(float(v) for v in e.GetTranslation()),
                (float(np.degrees(e.GetAngleX())), float(np.degrees(e.GetAngleY())),
                 float(np.degrees(e.GetAngleZ()))))
    return tuple(float(v) for v in tx.GetParameters()), (0.0, 0.0, 0.0)


def _new_method(fixed_mask: sitk.Image | None) -> sitk.ImageRegistrationMethod:
    """Mattes MI, deterministic regular sampling, optional fixed mask."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    # Regular sampling with a fixed seed (ITK jitters the regular grid with a clock-seeded
    # generator otherwise) keeps the result deterministic.
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    reg.SetMetricSamplingPercentage(SAMPLING_FRACTION, SAMPLING_SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    return reg


def _register_rigid(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None,
                    rotation: bool) -> tuple[sitk.Transform, float]:
    """Multi-resolution rigid registration (translation, or Euler with rotation)."""
    lo, hi = REGISTRATION_WINDOW_HU
    f = sitk.Clamp(fixed, sitk.sitkFloat32, lo, hi)
    m = sitk.Clamp(moving, sitk.sitkFloat32, lo, hi)
    reg = _new_method(fixed_mask)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=4.0, minStep=0.05, numberOfIterations=150, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    # Full resolution adds little to a rigid estimate but costs most of the time.
    reg.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    reg.SetSmoothingSigmasPerLevel([float(s) / 2 for s in SHRINK_FACTORS])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    if rotation:
        centre = fixed.TransformContinuousIndexToPhysicalPoint(
            [(n - 1) / 2.0 for n in fixed.GetSize()])
        initial: sitk.Transform = sitk.Euler3DTransform(centre, 0.0, 0.0, 0.0, (0.0,) * 3)
    else:
        initial = sitk.TranslationTransform(3)
    reg.SetInitialTransform(initial, inPlace=False)
    out = reg.Execute(f, m)
    if rotation:
        result: sitk.Transform = sitk.Euler3DTransform(centre, 0.0, 0.0, 0.0, (0.0,) * 3)
        result.SetParameters(out.GetParameters())
    else:
        result = sitk.TranslationTransform(3, out.GetParameters())
    return result, float(reg.GetMetricValue())


def _deformable_step(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image,
                     rigid: sitk.Transform) -> tuple[sitk.Transform, float, str]:
    """A coarse B-spline on top of ``rigid`` inside the mask; refused beyond the cap."""
    lo, hi = REGISTRATION_WINDOW_HU
    f = sitk.Clamp(fixed, sitk.sitkFloat32, lo, hi)
    m = sitk.Clamp(moving, sitk.sitkFloat32, lo, hi)
    extent = [sz * sp for sz, sp in zip(f.GetSize(), f.GetSpacing(), strict=True)]
    mesh = [max(1, int(round(e / BSPLINE_GRID_MM))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(f, mesh, order=3)
    reg = _new_method(fixed_mask)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5,
                             numberOfIterations=BSPLINE_ITERATIONS)
    reg.SetShrinkFactorsPerLevel([2])
    reg.SetSmoothingSigmasPerLevel([1.0])
    reg.SetMovingInitialTransform(rigid)
    reg.SetInitialTransform(bspline, inPlace=True)
    try:
        reg.Execute(f, m)
    except RuntimeError as exc:
        return rigid, 0.0, f"deformable step failed ({exc}); rigid only"
    field = sitk.TransformToDisplacementField(
        bspline, sitk.sitkVectorFloat64, f.GetSize(), f.GetOrigin(), f.GetSpacing(),
        f.GetDirection())
    disp = np.linalg.norm(sitk.GetArrayFromImage(field), axis=-1)
    inside = sitk.GetArrayFromImage(fixed_mask) > 0
    largest = float(disp[inside].max()) if inside.any() else 0.0
    if largest > MAX_DEFORMATION_MM:
        return rigid, 0.0, (f"deformable step refused: {largest:.1f} mm > "
                            f"{MAX_DEFORMATION_MM:g} mm; rigid only")
    composite = sitk.CompositeTransform(rigid)
    composite.AddTransform(bspline)
    return composite, largest, f"deformable step: up to {largest:.1f} mm in the liver region"
