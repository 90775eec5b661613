"""The node's TID 1500 Measurement Report as a Comprehensive 3D SR.

Tree (PS3.16 TID 1500; see ``sr_templates/README.md``)::

    Imaging Measurement Report (TID 1500)
      Language, Observation Context (TID 1001: device observer = the algorithm)
      Procedure Reported = CT of abdomen
      Imaging Measurements
        per lesion:  TID 1410 planar group      (2D closed POLYLINE on the key slice,
                                                 Area, Long axis, Short axis)
                     TID 1411 volumetric group  (Referenced Segment -> SEG, Volume, mean HU of
                                                 the reference phase, then the characterisation:
                                                 3D diameter, viable / necrotic / lipiodol parts,
                                                 per-phase HU, size pattern, phase behaviour)
                     both with the SAME Tracking Identifier + Tracking UID (TID 4108)
        liver:       the same 1410 + 1411 pair, Tracking UID = the SEG liver segment's; its
                     volumetric group adds liver median HU per phase, total tumour volume and
                     tumour burden
      Qualitative Evaluations (TID 1500 row 10): disclaimer + algorithm, liver volume,
                     response category (private code), prior/current volume, change (TEXT)

Every volumetric group has a planar partner: OHIF merges groups by Tracking UID and crashes on
a merged set without a 2D SCOORD (toolchain notes). OHIF's text box shows the first 5 NUMs of
the merged set, in document order: the planar group comes first, so they stay Area, Long axis,
Short axis, Volume and the reference phase's mean HU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import highdicom as hd
import numpy as np
from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    ContentSequence,
    RelationshipTypeValues,
    TextContentItem,
)
from pydicom.dataset import Dataset

from node import ALGORITHM_NAME, ALGORITHM_VERSION, MANUFACTURER, RESEARCH_DISCLAIMER
from node.analysis.results import AnalysisResult, LesionMeasurement, PhaseAlignment
from node.dicom import codes
from node.dicom.seg import (
    contributing_equipment,
    frame_number,
    liver_tracking_uid,
    source_image,
    source_key,
)
from node.dicom.uids import derive_uid
from node.study.model import Phase, Study, Volume

#: (Finding, Finding Category) of a lesion group and of the liver's groups.
_LESION = (codes.FINDING_LESION, codes.FINDING_CATEGORY_LESION)
_LIVER = (codes.LIVER, codes.FINDING_CATEGORY_ANATOMY)

#: Series Description of every node SR (LO, <= 64 characters).
SR_SERIES_DESCRIPTION = "liver-node SR (research use)"


def sr_uids(study_instance_uid: str, input_key: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the SR derived from the inputs."""
    return (
        derive_uid(study_instance_uid, "sr", "series", input_key),
        derive_uid(study_instance_uid, "sr", input_key),
    )


def observation_context() -> hd.sr.ObservationContext:
    """TID 1001 Observation Context with the algorithm as device observer (TID 1004)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derive_uid("device-observer", ALGORITHM_NAME),
        name=ALGORITHM_NAME,
        manufacturer_name=MANUFACTURER,
        model_name=f"{ALGORITHM_NAME} {ALGORITHM_VERSION}",
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.OBSERVER_DEVICE, observer_identifying_attributes=device
        )
    )


def _algorithm_id() -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification of every measurement group."""
    return hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=ALGORITHM_VERSION)


def _time_point(time_point: str) -> hd.sr.TimePointContext:
    """TID 1502 Time Point Context: Subject Time Point Identifier (126070, DCM) is TEXT."""
    return hd.sr.TimePointContext(time_point=time_point, subject_time_point_identifier=time_point)


def _tracking(lesion: LesionMeasurement) -> hd.sr.TrackingIdentifier:
    """TID 4108 Tracking Identifier + Tracking UID; a fresh item set for every group."""
    return hd.sr.TrackingIdentifier(uid=lesion.tracking_uid, identifier=lesion.tracking_id)


def _mm(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=round(float(value), 4), unit=unit)


def _known(value: float | None) -> bool:
    """Whether a measured value is present (None and NaN are omitted from the report)."""
    return value is not None and math.isfinite(value)


def _phase_mod(item: Dataset, phase: str) -> None:
    """Qualify a NUM content item with its contrast phase.

    A HAS CONCEPT MOD CODE child, extending TID 300 (the Comprehensive 3D SR relationship
    constraints, PS3.3 A.35.13, allow NUM -> CODE; dciodvfy and dcmqi accept it).
    """
    mod = CodeContentItem(codes.CONTRAST_PHASE, codes.PHASE_CODES[phase],
                          RelationshipTypeValues.HAS_CONCEPT_MOD)
    if "ContentSequence" in item:
        item.ContentSequence.append(mod)
    else:
        item.ContentSequence = ContentSequence([mod])


def _hu(name: hd.sr.CodedConcept, value: float, phase: str,
        derivation: hd.sr.CodedConcept | None = None) -> hd.sr.Measurement:
    """An HU value of one contrast phase (TID 300 + Derivation + phase modifier)."""
    m = hd.sr.Measurement(name=name, value=round(float(value), 2), unit=codes.UNIT_HU,
                          derivation=derivation)
    _phase_mod(m[0], phase)
    return m


def _phases(*per_phase: Mapping[str, float | str]) -> list[str]:
    """The coded phases present in any of the per-phase dicts, in protocol order."""
    return [p.value for p in Phase if p.value in codes.PHASE_CODES
            and any(p.value in d for d in per_phase)]


def characterisation(lesion: LesionMeasurement, reference_phase: str) -> list[hd.sr.Measurement]:
    """TID 300 measurements of a lesion after Volume: mean HU of the reference phase first.

    Then the largest 3D diameter, the viable / necrotic / lipiodol volumes and the necrotic
    share, and per phase the mean and SD attenuation, the enhancement over the plain scan and
    the difference to the liver. Missing values (None, NaN, absent phase) are omitted.
    """
    out: list[hd.sr.Measurement] = []
    ref_mean = lesion.mean_hu.get(reference_phase)
    if _known(ref_mean) and reference_phase in codes.PHASE_CODES:
        out.append(_hu(codes.ATTENUATION, lesion.mean_hu[reference_phase], reference_phase,
                       codes.MEAN))
    scalars = [
        (codes.MAXIMUM_3D_DIAMETER, lesion.largest_diameter_3d_mm, 1.0, codes.UNIT_MM),
        (codes.VIABLE_VOLUME, lesion.enhancing_volume_ml, 1.0, codes.UNIT_ML),
        (codes.NECROTIC_VOLUME, lesion.necrotic_volume_ml, 1.0, codes.UNIT_ML),
        (codes.NECROTIC_FRACTION, lesion.necrotic_fraction, 100.0, codes.UNIT_PERCENT),
        (codes.LIPIODOL_VOLUME, lesion.lipiodol_volume_ml, 1.0, codes.UNIT_ML),
    ]
    out += [_mm(name, value * factor, unit) for name, value, factor, unit in scalars
            if value is not None and _known(value)]
    others = {k: v for k, v in lesion.mean_hu.items() if k != reference_phase}
    per_phase = [
        (codes.ATTENUATION, codes.MEAN, others),
        (codes.ATTENUATION, codes.STANDARD_DEVIATION, lesion.sd_hu),
        (codes.ENHANCEMENT_VS_NATIVE, None, lesion.enhancement_vs_native_hu),
        (codes.ENHANCEMENT_VS_LIVER, None, lesion.enhancement_vs_liver_hu),
    ]
    for phase in _phases(*(values for _, _, values in per_phase)):
        out += [_hu(name, values[phase], phase, derivation)
                for name, derivation, values in per_phase if _known(values.get(phase))]
    return out


def qualitative(lesion: LesionMeasurement) -> list[hd.sr.QualitativeEvaluation]:
    """Coded size pattern and per-phase behaviour of a lesion (TID 1411 qualitative evaluations).

    The phase is part of the behaviour's concept name, not a modifier: dcmqi drops modifiers
    of CODE items. Unknown strings are omitted like missing values.
    """
    out = []
    if lesion.size_pattern in codes.SIZE_PATTERN_CODES:
        out.append(hd.sr.QualitativeEvaluation(
            codes.SIZE_PATTERN, codes.SIZE_PATTERN_CODES[lesion.size_pattern]))
    for phase in _phases(lesion.phase_behaviour):
        value = codes.BEHAVIOUR_CODES.get(lesion.phase_behaviour[phase])
        if value is not None:
            out.append(hd.sr.QualitativeEvaluation(codes.PHASE_BEHAVIOUR[phase], value))
    return out


def volumetric_group(
    lesion: LesionMeasurement,
    seg: hd.seg.Segmentation,
    reference: Volume,
    time_point: str,
    finding: tuple[hd.sr.CodedConcept, hd.sr.CodedConcept] | None = None,
    extra: Sequence[hd.sr.Measurement] = (),
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group of one lesion: Referenced Segment -> its SEG segment, Volume in ml.

    The Referenced Segment's source images are the reference slices that hold the lesion
    (PS3.16 TID 1411 row 8). Volume comes first, then :func:`characterisation` (the mean HU
    of the reference phase first), then ``extra``; :func:`qualitative` gives the CODE items.
    """
    slices = _segment_slices(seg, lesion.label, reference)
    segment = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=lesion.label,
        source_images=[
            hd.sr.SourceImageForSegmentation.from_source_image(image, frames)
            for image, frames in _images([reference.datasets[k] for k in slices])
        ],
    )
    measurements = [_mm(codes.VOLUME, lesion.volume_ml, codes.UNIT_ML),
                    *characterisation(lesion, reference.phase.value), *extra]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(lesion),
        referenced_segment=segment,
        time_point_context=_time_point(time_point),
        finding_type=(finding or _LESION)[0],
        finding_category=(finding or _LESION)[1],
        algorithm_id=_algorithm_id(),
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.LIVER)],
        measurements=measurements,
        qualitative_evaluations=qualitative(lesion) or None,
    )


def _images(datasets: Sequence[Dataset]) -> list[tuple[Dataset, list[int] | None]]:
    """The distinct instances of some reference slices, each with its frame numbers.

    A single-frame image stands for itself, without frame numbers; frames of a multi-frame
    image become one reference to that image listing its Referenced Frame Numbers
    (Image Reference Macro, PS3.3 C.18: the frames of a multi-frame image are listed by number).
    """
    out: list[tuple[Dataset, list[int] | None]] = []
    frames: dict[str, list[int]] = {}
    for ds in datasets:
        number = frame_number(ds)
        if number is None:
            out.append((ds, None))
            continue
        uid = str(ds.SOPInstanceUID)
        if uid not in frames:
            frames[uid] = []
            out.append((source_image(ds), frames[uid]))
        frames[uid].append(number)
    for numbers in frames.values():
        numbers.sort()
    return out


def _segment_slices(
    seg: hd.seg.Segmentation, segment_number: int, reference: Volume
) -> list[int]:
    """Sorted slice indices of the reference volume whose SEG frames hold ``segment_number``.

    A SEG frame's source is (Referenced SOP Instance UID, Referenced Frame Number), the
    frame number present only for a multi-frame source image (:func:`source_key`).
    """
    key_to_index = {source_key(ds): k for k, ds in enumerate(reference.datasets)}
    shared = seg.SharedFunctionalGroupsSequence[0]
    slices = []
    for frame in seg.PerFrameFunctionalGroupsSequence:
        seg_id = frame.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        if int(seg_id[0].ReferencedSegmentNumber) != segment_number:
            continue
        for derivation in frame.DerivationImageSequence:
            for source in derivation.SourceImageSequence:
                number = source.get("ReferencedFrameNumber")
                key = (str(source.ReferencedSOPInstanceUID),
                       None if number is None else int(number))
                slices.append(key_to_index[key])
    if not slices:
        raise ValueError(f"segment {segment_number} has no frames in the SEG")
    return sorted(set(slices))


def planar_group(
    lesion: LesionMeasurement,
    reference: Volume,
    time_point: str,
    finding: tuple[hd.sr.CodedConcept, hd.sr.CodedConcept] | None = None,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of one lesion: closed 2D POLYLINE on the key slice, Area and axes.

    ``outline_ij`` is (column, row) image coordinates as a 2D SCOORD holds them (PS3.3
    C.18.6.1.1); its first point equals its last (closed POLYLINE, PS3.3 C.18.6.1.2). The
    SCOORD is SELECTED FROM the key slice's image, with its Referenced Frame Number when that
    is a frame of a multi-frame image.
    """
    outline = np.asarray(lesion.outline_ij, dtype=float)
    if outline.ndim != 2 or outline.shape[0] < 4 or not np.allclose(outline[0], outline[-1]):
        raise ValueError(f"{lesion.tracking_id}: outline_ij must be a closed polyline")
    [(image, frames)] = _images([reference.datasets[lesion.key_slice]])
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline,
        source_image=hd.sr.SourceImageForRegion.from_source_image(image, frames),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(lesion),
        referenced_region=region,
        time_point_context=_time_point(time_point),
        finding_type=(finding or _LESION)[0],
        finding_category=(finding or _LESION)[1],
        algorithm_id=_algorithm_id(),
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.LIVER)],
        measurements=[
            _mm(codes.AREA, lesion.area_mm2, codes.UNIT_MM2),
            _mm(codes.LONG_AXIS, lesion.longest_diameter_mm, codes.UNIT_MM),
            _mm(codes.SHORT_AXIS, lesion.short_axis_mm, codes.UNIT_MM),
        ],
    )


def liver_groups(
    study: Study, result: AnalysisResult, seg: hd.seg.Segmentation, *, input_key: str,
    time_point: str,
) -> list[
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
]:
    """The liver as a TID 1410 group + TID 1411 partner (-> SEG liver segment, Volume).

    Both carry the SEG liver segment's Tracking UID. A volumetric group without a planar
    partner crashes OHIF (toolchain notes), so the liver, like every lesion, gets its outline
    on its largest axial slice. It also makes the report valid with no lesion: TID 1500 needs
    at least one group in highdicom 0.28.2. The per-patient values sit in the liver's
    volumetric group: the parenchyma's median HU per phase (the reference of the lesions'
    "difference to liver"), the total tumour volume and the tumour burden.
    """
    if result.liver is None:
        raise ValueError("result.liver (the liver's planar measurement) is required")
    liver = replace(
        result.liver,
        label=len(result.lesions) + 1,  # the SEG's liver segment number
        tracking_id="Liver",
        tracking_uid=liver_tracking_uid(study.study_instance_uid, input_key),
        volume_ml=result.liver_volume_ml,
    )
    extra = [_hu(codes.ATTENUATION, result.liver_median_hu[p], p, codes.MEDIAN)
             for p in _phases(result.liver_median_hu) if _known(result.liver_median_hu[p])]
    extra.append(_mm(codes.TOTAL_TUMOUR_VOLUME, result.total_volume_ml, codes.UNIT_ML))
    burden = result.tumour_burden_percent
    if burden is not None and _known(burden):
        extra.append(_mm(codes.TUMOUR_BURDEN, burden, codes.UNIT_PERCENT))
    reference = study.reference
    return [
        planar_group(liver, reference, time_point, _LIVER),
        volumetric_group(liver, seg, reference, time_point, _LIVER, extra),
    ]


def _text(name: hd.sr.CodedConcept, value: str) -> TextContentItem:
    return TextContentItem(
        name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS
    )


def alignment_text(a: PhaseAlignment) -> str:
    """One line on how a phase was aligned, e.g. ``arterial: rigid, shift 1.7/0.2/4.5 mm,
    rotation 0.0/0.0/0.1 deg, residual 0.3 mm``."""
    if a.method == "failed":
        return f"{a.phase}: registration failed, phase not used"
    text = (f"{a.phase}: {a.method}, shift {'/'.join(f'{v:.1f}' for v in a.shift_mm)} mm, "
            f"rotation {'/'.join(f'{v:.1f}' for v in a.rotation_deg)} deg")
    if a.deformation_mm:
        text += f", deformation up to {a.deformation_mm:.1f} mm"
    if a.residual_mm is not None:
        text += f", residual {a.residual_mm:.1f} mm"
    return text


def qualitative_evaluations(result: AnalysisResult) -> ContainerContentItem:
    """TID 1500 row 10 "Qualitative Evaluations" container (CODE / TEXT children only).

    Holds the research-use disclaimer with the algorithm name and version, the liver volume,
    how each phase was aligned and the residual misalignment, and, at follow-up, the
    volumetric response: the category as a private code, the rule as the method, prior /
    current total volume, change, prior study UID, new / vanished lesions.
    """
    items: list[TextContentItem | CodeContentItem] = [
        _text(codes.COMMENT, f"{RESEARCH_DISCLAIMER}. {ALGORITHM_NAME} {ALGORITHM_VERSION}"),
        _text(codes.LIVER_VOLUME_TEXT, f"{result.liver_volume_ml:.2f} ml"),
        *(_text(codes.PHASE_ALIGNMENT, alignment_text(a)) for a in result.alignments),
    ]
    resp = result.response
    if resp is not None:
        contains = RelationshipTypeValues.CONTAINS
        items += [
            CodeContentItem(codes.CURRENT_RESPONSE, codes.RESPONSE_CODES[resp.category], contains),
            CodeContentItem(codes.RESPONSE_METHOD, codes.VOLUMETRIC_RULE, contains),
            _text(codes.PRIOR_TOTAL_VOLUME, f"{resp.prior_total_volume_ml:.2f} ml"),
            _text(codes.CURRENT_TOTAL_VOLUME, f"{resp.current_total_volume_ml:.2f} ml"),
            _text(codes.VOLUME_CHANGE, f"{resp.change_fraction * 100.0:+.1f} %"),
            _text(codes.PRIOR_STUDY_UID, resp.prior_study_instance_uid),
            _text(codes.NEW_LESIONS, str(resp.new_lesions)),
        ]
        if resp.vanished_lesions:
            items.append(_text(codes.VANISHED_LESIONS, ", ".join(resp.vanished_lesions)))
    container = ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = ContentSequence(items)
    return container


def build_sr(
    study: Study,
    result: AnalysisResult,
    seg: hd.seg.Segmentation,
    *,
    input_key: str,
    time_point: str,
    series_number: int = 902,
    previous_versions: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Measurement Report (PS3.16 TID 1500; PS3.3 A.35.13 Comprehensive 3D SR).

    Parameters
    ----------
    study, result:
        The analysed study and its result (lesion ``k`` is SEG segment ``k``).
    seg:
        The SEG from :func:`node.dicom.seg.build_seg` of the same inputs; referenced by the
        volumetric groups and listed in the evidence.
    input_key:
        Key of the input instances; with the study UID it determines the SR's UIDs.
    time_point:
        Subject Time Point Identifier (TID 1502), e.g. "baseline" or "follow-up 1".
    series_number:
        Series Number of the SR series.
    previous_versions:
        Earlier node SRs of the same study (made before a late series arrived): listed in
        the Predecessor Documents Sequence (PS3.3 C.17.2.3) so readers know this one
        supersedes them.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The SR, instance number 1, declaring the private coding scheme.
    """
    if not time_point:
        raise ValueError("time_point must not be empty")
    reference = study.reference
    groups: list = []
    for lesion in sorted(result.lesions, key=lambda les: les.label):
        # Planar first: OHIF's text box shows the first 5 NUMs of the merged groups.
        groups.append(planar_group(lesion, reference, time_point))
        groups.append(volumetric_group(lesion, seg, reference, time_point))
    groups += liver_groups(study, result, seg, input_key=input_key, time_point=time_point)
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(),
        procedure_reported=[codes.PROCEDURE_CT_ABDOMEN],
        imaging_measurements=groups,
        title=codes.REPORT_TITLE,
    )
    report[0].ContentSequence.append(qualitative_evaluations(result))
    series_uid, sop_uid = sr_uids(study.study_instance_uid, input_key)
    return hd.sr.Comprehensive3DSR(
        # a multi-frame image's header, not its frames: the evidence lists instances
        evidence=[*(source_image(ds) for ds in reference.datasets), seg],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=SR_SERIES_DESCRIPTION,
        coding_schemes=[codes.private_coding_scheme()],
        contributing_equipment=[contributing_equipment()],
        previous_versions=list(previous_versions) or None,
    )
