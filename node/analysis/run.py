"""The analysis of one study, step by step: liver, alignment, lesions, measurements, tracking.

reference (portal venous) volume -> liver segmentation -> rigid alignment of the other phases
onto the reference grid -> multi-phase lesion detection -> per-lesion measurements ->
tracking against the prior time point (if any) -> volumetric response.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from scipy import ndimage

from node.analysis.enhancement import characterise, phase_context
from node.analysis.liver import (
    LiverSegmentation,
    blood_pool,
    body_mask,
    smooth_inplane,
    with_reach,
)
from node.analysis.liver_dense import include_deposits
from node.analysis.measure import liver_summary, measure_lesion
from node.analysis.register import REGISTRATION_PIXEL_MM, align_to_reference
from node.analysis.response import assess_response
from node.analysis.results import (
    AnalysisResult,
    LesionMeasurement,
    PhaseAlignment,
    PriorStudy,
)
from node.analysis.segment import DEFAULT_BACKEND, SegmentationBackend
from node.analysis.tracking import assign_baseline, id_number, track
from node.errors import AnalysisError
from node.study.model import Geometry, Phase, Study

logger = logging.getLogger(__name__)

#: Margin (mm) around the liver to which the registration metric is restricted.
REGISTRATION_MARGIN_MM = 20.0
#: Alignment of every other phase: rigid with rotation, residual misalignment measured. The
#: constrained deformable step is wired but off: on HCC_007 it lowered the residual (1.6-7.1
#: -> 0.6-4.2 mm), but the lesion detection then grew the baseline tumour from 321 to 507 ml
#: along the liver border into perihepatic fat (liver 2411 -> 2541 ml) and the follow-up liver
#: from 1788 to 2018 ml. Costs and reasons: node.analysis.register.
DEFORMABLE_STEP = False
#: When on, the deformable step runs only where the residual after the rigid step exceeds
#: this (one pixel of the registration grid), and is kept only if it lowers the residual.
DEFORM_ABOVE_MM = REGISTRATION_PIXEL_MM
#: Share of the first liver mask that must be arterial blood pool to segment again without it.
BLOOD_POOL_SHARE = 0.02
#: Soft tissue (HU, smoothed reference) into which a lesion may extend beyond the liver mask.
SOFT_TISSUE_HU = -30.0


def analyze(study: Study, prior: PriorStudy | None = None,
            backend: SegmentationBackend | None = None) -> AnalysisResult:
    """Analyse one assembled study.

    Parameters
    ----------
    study:
        The assembled study; measurements are made on :attr:`Study.reference`.
    prior:
        The patient's previous time point, for tracking and response (None: baseline).
    backend:
        Segmentation backend (default: the classical one, :data:`DEFAULT_BACKEND`).

    Returns
    -------
    AnalysisResult
        Liver mask and lesion label map on the reference grid, measurements, response.

    Raises
    ------
    AnalysisError
        If the liver cannot be segmented.
    """
    t0 = time.perf_counter()
    seg = backend or DEFAULT_BACKEND
    ref = study.reference
    geom = ref.geometry
    notes: list[str] = [f"reference: {ref.phase.value} series {ref.series_instance_uid}",
                        f"segmentation: {seg.name} {seg.version}"]
    try:
        liver = seg.segment_liver(ref.array, geom)
    except ValueError as exc:
        raise AnalysisError(f"liver segmentation failed: {exc}") from exc
    alignments: list[PhaseAlignment] = []
    phases = align_phases(study, liver, notes, alignments)
    liver = exclude_blood_pool(seg, ref.array, geom, liver, phases, notes)
    liver = with_deposits(liver, ref.array, geom, phases, notes)
    notes.append(f"liver {liver.median_hu:.0f} HU (SD {liver.sd_hu:.1f})")
    soft = body_mask(ref.array) & (smooth_inplane(ref.array, geom, 1.5) > SOFT_TISSUE_HU)
    maps = seg.detect_lesions(phases, liver.mask, soft, geom)
    notes.extend(maps.notes)
    envelope = liver.mask if liver.envelope is None else liver.envelope
    liver_mask = envelope | (maps.labels > 0)
    arrays = {p.value: a for p, a in phases.items()}
    lesions = [measure_lesion(maps.labels == lab, geom, lab, arrays,
                              volume_ml=maps.volumes_ml.get(lab))
               for lab in range(1, int(maps.labels.max()) + 1) if (maps.labels == lab).any()]
    ctx = phase_context(arrays, liver.mask & (maps.labels == 0), geom, maps.labels > 0)
    for les in lesions:
        characterise(les, maps.labels == les.label, ctx, geom)
    liver_ml, liver_c = liver_summary(liver_mask, geom)
    response = None
    if prior is None:
        assign_baseline(lesions, study.study_instance_uid)
    else:
        outcome = track(lesions, prior, study.study_instance_uid, liver_c)
        notes.append(f"tracking: {len(outcome.matched)} matched, "
                     f"{len(outcome.vanished)} vanished")
    labels, lesions = relabel(maps.labels, lesions)
    if prior is not None:
        response = assess_response(prior, lesions)
    liver_measurement = measure_lesion(liver_mask, geom, len(lesions) + 1, arrays,
                                       volume_ml=liver_ml)
    liver_measurement.tracking_id = "Liver"
    notes.append(f"analysis {time.perf_counter() - t0:.1f} s")
    return AnalysisResult(
        study_instance_uid=study.study_instance_uid,
        liver_mask=liver_mask,
        lesion_labels=labels,
        lesions=lesions,
        liver_volume_ml=liver_ml,
        liver_centroid_xyz=liver_c,
        response=response,
        notes=notes,
        liver=liver_measurement,
        liver_median_hu=dict(ctx.liver_median),
        alignments=alignments,
    )


def align_phases(study: Study, liver: LiverSegmentation, notes: list[str],
                 alignments: list[PhaseAlignment] | None = None) -> dict[Phase, np.ndarray]:
    """Every phase on the reference grid, the others aligned to the reference.

    Rigid (with rotation) inside the dilated liver and the residual misalignment measured;
    if :data:`DEFORMABLE_STEP`, the constrained deformable step where the residual exceeds
    :data:`DEFORM_ABOVE_MM`. One :class:`PhaseAlignment` per non-reference phase is appended
    to ``alignments`` (failed registrations included).
    """
    ref = study.reference
    region = _dilate_mm(liver.mask, ref.geometry, REGISTRATION_MARGIN_MM)
    out: dict[Phase, np.ndarray] = {ref.phase: ref.array}
    records = alignments if alignments is not None else []
    for phase, vol in sorted(study.volumes.items(), key=lambda kv: kv[0].value):
        if vol is ref:
            continue
        try:
            al = align_to_reference(vol.array, vol.geometry, ref.array, ref.geometry,
                                    fixed_mask=region, rotation=True,
                                    deformable=DEFORMABLE_STEP,
                                    measure_residual=True, deform_above_mm=DEFORM_ABOVE_MM)
        except RuntimeError as exc:  # SimpleITK reports registration failures so
            logger.warning("registration of %s failed: %s", phase.value, exc)
            notes.append(f"{phase.value}: registration failed, phase not used")
            records.append(PhaseAlignment(phase.value, "failed", notes=[str(exc)]))
            continue
        notes.append(f"{phase.value}: shift "
                     + ", ".join(f"{v:.1f}" for v in al.shift_mm) + " mm")
        notes.append(f"{phase.value}: {al.method}, rotation "
                     + ", ".join(f"{v:.1f}" for v in al.rotation_deg) + " deg"
                     + ("" if al.residual_mm is None else f", residual {al.residual_mm:.1f} mm")
                     + (f", deformation up to {al.deformation_mm:.1f} mm"
                        if al.deformation_mm > 0 else ""))
        records.append(PhaseAlignment(
            phase=phase.value, method=al.method, shift_mm=al.shift_mm,
            rotation_deg=al.rotation_deg, residual_mm=al.residual_mm,
            rigid_residual_mm=al.rigid_residual_mm, deformation_mm=al.deformation_mm,
            notes=list(al.notes)))
        out[phase] = al.array
    return out


def exclude_blood_pool(seg: SegmentationBackend, array: np.ndarray, geometry: Geometry,
                       liver: LiverSegmentation, phases: dict[Phase, np.ndarray],
                       notes: list[str]) -> LiverSegmentation:
    """Segment the liver again without the blood pool seen in the aligned arterial phase.

    In the portal venous phase the heart and IVC can be iso-dense to the liver and join it;
    in the arterial phase they are not (much brighter, or not yet enhanced). When enough of
    the first mask is such blood pool, the liver is segmented again with it excluded.
    """
    arterial = phases.get(Phase.ARTERIAL)
    if arterial is None or arterial is array or not liver.mask.any():
        return liver
    # The share needs the liver's box only; the whole volume only when segmenting again.
    box = ndimage.find_objects(liver.mask.view(np.uint8))[0]
    blood = blood_pool(arterial, liver.mask, geometry, box)
    share = float((blood & liver.mask[box]).sum()) / float(liver.mask.sum())
    if share < BLOOD_POOL_SHARE:
        return liver
    blood = blood_pool(arterial, liver.mask, geometry)
    try:
        again = seg.segment_liver(array, geometry, exclude=blood)
    except ValueError:
        return liver
    vox = geometry.voxel_volume_ml
    notes.append(f"blood pool excluded ({100 * share:.0f} % of the first mask): liver "
                 f"{liver.mask.sum() * vox:.0f} -> {again.mask.sum() * vox:.0f} ml")
    return again


def with_deposits(liver: LiverSegmentation, array: np.ndarray, geometry: Geometry,
                  phases: dict[Phase, np.ndarray], notes: list[str]) -> LiverSegmentation:
    """The liver with the dense deposits (lipiodol) it encloses or touches.

    Whatever the backend, a deposit outside the liver mask could never be counted in its
    tumour. The aligned native phase tells deposits from enhancement
    (:mod:`node.analysis.liver_dense`).
    """
    out = include_deposits(liver, array, phases.get(Phase.NATIVE), geometry)
    if out is not liver:
        vox = geometry.voxel_volume_ml
        notes.append(f"dense deposits included: liver {liver.mask.sum() * vox:.0f} -> "
                     f"{out.mask.sum() * vox:.0f} ml")
    return out


def relabel(labels: np.ndarray, lesions: list[LesionMeasurement]
            ) -> tuple[np.ndarray, list[LesionMeasurement]]:
    """Renumber the label map so that label n is the n-th lesion in tracking-id order."""
    ordered = sorted(lesions, key=lambda les: (id_number(les.tracking_id), les.tracking_id))
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    for n, les in enumerate(ordered, start=1):
        lut[les.label] = n
        les.label = n
    return lut[labels], ordered


def _dilate_mm(mask: np.ndarray, geometry: Geometry, margin_mm: float) -> np.ndarray:
    """Dilate by a margin in mm (anisotropic voxels) using a distance transform.

    Exact, but the distance transform runs only on the mask's bounding box grown by the
    margin (beyond it every voxel is farther than ``margin_mm`` from the mask): on a large
    field of view and thin slices the whole volume would cost ~10 s more.
    """
    if not mask.any():
        return np.ones_like(mask)
    box = ndimage.find_objects(mask.astype(np.int8))[0]
    reach = [int(np.ceil(margin_mm / s)) + 1 for s in geometry.spacing]
    grown, _ = with_reach(box, reach, mask.shape)
    out = np.zeros_like(mask)
    out[grown] = ndimage.distance_transform_edt(~mask[grown],
                                                sampling=geometry.spacing) <= margin_mm
    return out
