"""Align the other phases to the reference volume and resample them onto its grid.

First the patient-coordinate geometry maps every phase onto the reference grid (PS3.3
C.7.6.2: same Frame of Reference); then a rigid translation, estimated by Mattes mutual
information (contrast differs between phases, so intensities are not comparable), absorbs
breathing and patient motion between acquisitions (typically up to 1-2 cm).
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


@dataclass(frozen=True)
class Alignment:
    """Result of aligning one phase: the resampled array and the translation found."""

    array: np.ndarray  # float32 HU on the reference grid
    shift_mm: tuple[float, float, float]  # patient-space translation reference -> moving
    metric: float


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
) -> Alignment:
    """Rigidly translate ``moving`` onto ``reference`` and resample it onto the reference grid.

    Parameters
    ----------
    moving, moving_geometry:
        HU volume of the phase to align and its geometry.
    reference, reference_geometry:
        HU volume and geometry of the reference (portal venous) phase.
    estimate_shift:
        False: only resample by geometry (same scanner position assumed).
    fixed_mask:
        Optional boolean mask on the reference grid (e.g. the dilated liver) to which the
        similarity metric is restricted, so that the liver, not the body wall, is aligned.

    Returns
    -------
    Alignment
        The moving volume on the reference grid and the translation applied.
    """
    ref_img = to_sitk(reference, reference_geometry)
    mov_img = to_sitk(moving, moving_geometry)
    if not estimate_shift:
        return Alignment(resample(mov_img, ref_img), (0.0, 0.0, 0.0), 0.0)
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
    # Translation needs no fine pixels: register at about REGISTRATION_PIXEL_MM in-plane.
    f = max(1, int(round(REGISTRATION_PIXEL_MM / min(reference_geometry.spacing[1:]))))
    if f > 1:
        fixed_img = sitk.BinShrink(fixed_img, [f, f, 1])
        mov_small = sitk.BinShrink(mov_img, [f, f, 1])
        if mask_img is not None:
            mask_img = sitk.Cast(sitk.BinShrink(mask_img, [f, f, 1]) > 0, sitk.sitkUInt8)
    else:
        mov_small = mov_img
    transform, metric = _register_translation(fixed_img, mov_small, mask_img)
    shift = tuple(float(v) for v in transform.GetOffset())
    if float(np.linalg.norm(shift)) > MAX_SHIFT_MM:
        logger.warning("registration shift %s mm too large; geometry only", shift)
        transform, shift, metric = sitk.TranslationTransform(3), (0.0, 0.0, 0.0), 0.0
    return Alignment(resample(mov_img, ref_img, transform), shift, metric)  # type: ignore[arg-type]


def _register_translation(
    fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None
) -> tuple[sitk.TranslationTransform, float]:
    """Multi-resolution translation registration with Mattes mutual information."""
    lo, hi = REGISTRATION_WINDOW_HU
    f = sitk.Clamp(fixed, sitk.sitkFloat32, lo, hi)
    m = sitk.Clamp(moving, sitk.sitkFloat32, lo, hi)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    # Regular sampling with a fixed seed (ITK jitters the regular grid with a clock-seeded
    # generator otherwise) keeps the result deterministic.
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    reg.SetMetricSamplingPercentage(SAMPLING_FRACTION, SAMPLING_SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=4.0, minStep=0.05, numberOfIterations=150, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    # Full resolution adds little to a translation estimate but costs most of the time.
    reg.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    reg.SetSmoothingSigmasPerLevel([float(f) / 2 for f in SHRINK_FACTORS])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(sitk.TranslationTransform(3), inPlace=False)
    out = reg.Execute(f, m)
    tx = sitk.TranslationTransform(3, out.GetParameters())
    return tx, float(reg.GetMetricValue())
