"""Read a prior time point back from a TID 1500 SR and its SEG.

Works on the node's own SRs and on any TID 1500 Measurement Report whose lesions have
Tracking UIDs and a Volume (PS3.16 TID 1500 / 1411 / 4108): measurement groups are merged by
Tracking Unique Identifier (as viewers do), a lesion is a merged set that holds a Volume and
whose Finding is not the liver. Centroids come from the SEG: the pixel centroid of each segment,
mapped to patient coordinates with each frame's Plane Position / Orientation and Pixel
Measures (PS3.3 C.7.6.16.2.3, C.7.6.2.1.1), matched to the lesion by the segment's Tracking UID
or, failing that, by the group's Referenced Segment number.

:func:`read_findings` reads back everything the node writes per lesion and for the liver
(the characterisation of ``LesionMeasurement`` and the per-patient totals), for the node's own
SRs: per-phase values are recognised by their Contrast phase modifier or phase-specific concept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pydicom
from highdicom.sr import CodedConcept

from node.analysis.results import PriorLesion, PriorStudy, VolumetricResponse
from node.dicom import codes

#: Volume units (UCUM code value) -> factor to millilitres.
_VOLUME_TO_ML = {"ml": 1.0, "mL": 1.0, "cm3": 1.0, "mm3": 1e-3, "l": 1e3, "L": 1e3}
#: Length units -> factor to millimetres.
_LENGTH_TO_MM = {"mm": 1.0, "cm": 10.0, "m": 1e3, "um": 1e-3}


@dataclass
class _Group:
    """What the reader keeps of the measurement groups sharing one Tracking UID."""

    tracking_uid: str
    tracking_id: str = ""
    volume_ml: float | None = None
    long_axis_mm: float | None = None
    segment_number: int | None = None
    is_liver: bool = False
    extra: dict[str, float] = field(default_factory=dict)


def _is(item: pydicom.Dataset, concept: CodedConcept) -> bool:
    """Whether a content item's Concept Name is ``concept`` (code value + scheme)."""
    name = getattr(item, "ConceptNameCodeSequence", None)
    if not name:
        return False
    return bool(
        name[0].CodeValue == concept.value
        and name[0].CodingSchemeDesignator == concept.scheme_designator
    )


def _children(item: pydicom.Dataset) -> list[pydicom.Dataset]:
    return list(getattr(item, "ContentSequence", []) or [])


def _measurement_groups(sr: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    """The Measurement Group containers of the Imaging Measurements container (TID 1500)."""
    for item in _children(sr):
        if _is(item, codes.IMAGING_MEASUREMENTS):
            for group in _children(item):
                if group.ValueType == "CONTAINER" and _is(group, codes.MEASUREMENT_GROUP):
                    yield group


def _num(item: pydicom.Dataset) -> tuple[float, str]:
    """(value, UCUM unit code value) of a NUM content item (PS3.3 C.18.1)."""
    mv = item.MeasuredValueSequence[0]
    return float(mv.NumericValue), str(mv.MeasurementUnitsCodeSequence[0].CodeValue)


def _tracked_groups(sr: pydicom.Dataset) -> Iterator[tuple[str, list[pydicom.Dataset]]]:
    """(Tracking UID, content items) of every measurement group of a TID 1500 SR that has a
    Tracking UID, in document order; groups without one cannot be tracked and are skipped.

    Raises
    ------
    ValueError
        If ``sr`` is not a TID 1500 Measurement Report.
    """
    template = getattr(sr, "ContentTemplateSequence", None)
    if not template or str(template[0].TemplateIdentifier) != "1500":
        raise ValueError("sr is not a TID 1500 Measurement Report")
    for group in _measurement_groups(sr):
        items = _children(group)
        uid = next((str(i.UID) for i in items if _is(i, codes.TRACKING_UID)), None)
        if uid is not None:
            yield uid, items


def _read_group(uid: str, items: list[pydicom.Dataset], merged: dict[str, _Group]) -> None:
    """Fold one measurement group's items into ``merged`` (keyed by Tracking UID)."""
    entry = merged.setdefault(uid, _Group(tracking_uid=uid))
    for item in items:
        if _is(item, codes.TRACKING_IDENTIFIER) and not entry.tracking_id:
            entry.tracking_id = str(item.TextValue)
        elif _is(item, codes.FINDING) and item.ValueType == "CODE":
            entry.is_liver |= item.ConceptCodeSequence[0].CodeValue == codes.LIVER.value
        elif _is(item, codes.REFERENCED_SEGMENT) and item.ValueType == "IMAGE":
            ref = item.ReferencedSOPSequence[0]
            if "ReferencedSegmentNumber" in ref:
                entry.segment_number = int(ref.ReferencedSegmentNumber)
        elif item.ValueType == "NUM" and getattr(item, "MeasuredValueSequence", None):
            value, unit = _num(item)
            if _is(item, codes.VOLUME) and unit in _VOLUME_TO_ML and entry.volume_ml is None:
                entry.volume_ml = value * _VOLUME_TO_ML[unit]
            elif _is(item, codes.LONG_AXIS) and unit in _LENGTH_TO_MM:
                entry.long_axis_mm = value * _LENGTH_TO_MM[unit]
            elif _is(item, codes.DIAMETER) and unit in _LENGTH_TO_MM:
                entry.extra["diameter_mm"] = value * _LENGTH_TO_MM[unit]


@dataclass
class ReportedFinding:
    """What a node SR says about one tracked finding (a lesion, or the liver).

    Keys of the per-phase dicts are ``Phase.value``; ``necrotic_fraction`` is 0..1 (the SR
    holds %). The liver's finding also carries the per-patient values.
    """

    tracking_uid: str
    tracking_id: str = ""
    is_liver: bool = False
    volume_ml: float | None = None
    largest_diameter_3d_mm: float | None = None
    mean_hu: dict[str, float] = field(default_factory=dict)
    sd_hu: dict[str, float] = field(default_factory=dict)
    median_hu: dict[str, float] = field(default_factory=dict)
    enhancement_vs_native_hu: dict[str, float] = field(default_factory=dict)
    enhancement_vs_liver_hu: dict[str, float] = field(default_factory=dict)
    enhancing_volume_ml: float | None = None
    necrotic_volume_ml: float | None = None
    necrotic_fraction: float | None = None
    lipiodol_volume_ml: float | None = None
    size_pattern: str | None = None
    phase_behaviour: dict[str, str] = field(default_factory=dict)
    total_tumour_volume_ml: float | None = None
    tumour_burden_percent: float | None = None


def _key(concept: CodedConcept | pydicom.Dataset) -> tuple[str, str]:
    if isinstance(concept, CodedConcept):
        return concept.value, concept.scheme_designator
    return str(concept.CodeValue), str(concept.CodingSchemeDesignator)


#: Single-valued NUM concepts -> (attribute, unit table, factor after conversion).
_SCALARS: dict[tuple[str, str], tuple[str, dict[str, float], float]] = {
    _key(codes.VOLUME): ("volume_ml", _VOLUME_TO_ML, 1.0),
    _key(codes.MAXIMUM_3D_DIAMETER): ("largest_diameter_3d_mm", _LENGTH_TO_MM, 1.0),
    _key(codes.VIABLE_VOLUME): ("enhancing_volume_ml", _VOLUME_TO_ML, 1.0),
    _key(codes.NECROTIC_VOLUME): ("necrotic_volume_ml", _VOLUME_TO_ML, 1.0),
    _key(codes.NECROTIC_FRACTION): ("necrotic_fraction", {"%": 1.0}, 0.01),
    _key(codes.LIPIODOL_VOLUME): ("lipiodol_volume_ml", _VOLUME_TO_ML, 1.0),
    _key(codes.TOTAL_TUMOUR_VOLUME): ("total_tumour_volume_ml", _VOLUME_TO_ML, 1.0),
    _key(codes.TUMOUR_BURDEN): ("tumour_burden_percent", {"%": 1.0}, 1.0),
}
#: Per-phase HU NUM concepts (name, derivation or None) -> dict attribute.
_PER_PHASE: dict[tuple[tuple[str, str], tuple[str, str] | None], str] = {
    (_key(codes.ATTENUATION), _key(codes.MEAN)): "mean_hu",
    (_key(codes.ATTENUATION), _key(codes.STANDARD_DEVIATION)): "sd_hu",
    (_key(codes.ATTENUATION), _key(codes.MEDIAN)): "median_hu",
    (_key(codes.ENHANCEMENT_VS_NATIVE), None): "enhancement_vs_native_hu",
    (_key(codes.ENHANCEMENT_VS_LIVER), None): "enhancement_vs_liver_hu",
}
_PHASES = {_key(c): phase for phase, c in codes.PHASE_CODES.items()}
_BEHAVIOUR_PHASES = {_key(c): phase for phase, c in codes.PHASE_BEHAVIOUR.items()}
_BEHAVIOURS = {_key(c): name for name, c in codes.BEHAVIOUR_CODES.items()}
_SIZE_PATTERNS = {_key(c): name for name, c in codes.SIZE_PATTERN_CODES.items()}


def _modifier(item: pydicom.Dataset, concept: CodedConcept) -> tuple[str, str] | None:
    """The coded value of a HAS CONCEPT MOD child named ``concept``, or None."""
    for child in _children(item):
        if child.ValueType == "CODE" and _is(child, concept):
            return _key(child.ConceptCodeSequence[0])
    return None


def _fold_num(entry: ReportedFinding, item: pydicom.Dataset) -> None:
    value, unit = _num(item)
    name = _key(item.ConceptNameCodeSequence[0])
    if name in _SCALARS:
        attr, units, factor = _SCALARS[name]
        if unit in units and getattr(entry, attr) is None:  # the first one counts
            setattr(entry, attr, value * units[unit] * factor)
        return
    phase = _PHASES.get(_modifier(item, codes.CONTRAST_PHASE) or ("", ""))
    attr_name = _PER_PHASE.get((name, _modifier(item, codes.DERIVATION)))
    if attr_name is not None and phase is not None and unit == codes.UNIT_HU.value:
        getattr(entry, attr_name).setdefault(phase, value)


def _fold_code(entry: ReportedFinding, item: pydicom.Dataset) -> None:
    name, value = _key(item.ConceptNameCodeSequence[0]), _key(item.ConceptCodeSequence[0])
    if name == _key(codes.FINDING):
        entry.is_liver |= value == _key(codes.LIVER)
    elif name == _key(codes.SIZE_PATTERN) and value in _SIZE_PATTERNS:
        entry.size_pattern = _SIZE_PATTERNS[value]
    elif name in _BEHAVIOUR_PHASES and value in _BEHAVIOURS:
        entry.phase_behaviour[_BEHAVIOUR_PHASES[name]] = _BEHAVIOURS[value]


def read_findings(sr: pydicom.Dataset) -> dict[str, ReportedFinding]:
    """Everything a node TID 1500 SR reports per tracked finding, keyed by Tracking UID.

    Groups sharing a Tracking UID (the planar and volumetric group of a lesion) are merged,
    in document order; values the SR does not hold stay None / absent. Unknown concepts are
    ignored, so any TID 1500 SR can be read (its Volumes and standard HU values included).

    Raises
    ------
    ValueError
        If ``sr`` is not a TID 1500 Measurement Report.
    """
    found: dict[str, ReportedFinding] = {}
    for uid, items in _tracked_groups(sr):
        entry = found.setdefault(uid, ReportedFinding(tracking_uid=uid))
        for item in items:
            if _is(item, codes.TRACKING_IDENTIFIER) and not entry.tracking_id:
                entry.tracking_id = str(item.TextValue)
            elif item.ValueType == "NUM" and getattr(item, "MeasuredValueSequence", None):
                _fold_num(entry, item)
            elif item.ValueType == "CODE" and getattr(item, "ConceptCodeSequence", None):
                _fold_code(entry, item)
    return found


def _frame_attr(frame: pydicom.Dataset, shared: pydicom.Dataset, name: str) -> pydicom.Dataset:
    """A functional group macro from the per-frame item, else from the shared item."""
    if name in frame:
        return frame[name].value[0]
    return shared[name].value[0]


def segment_centroids(seg: pydicom.Dataset) -> dict[int, tuple[float, float, float]]:
    """Patient-coordinate centroid (LPS, mm) of every non-empty segment of a SEG.

    Each frame's pixels are mapped with IPP + j * dx * row_cosine + i * dy * column_cosine
    (PS3.3 C.7.6.2.1.1); pixel centres are at integer (row, column) indices.
    """
    frames = seg.pixel_array
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    shared = seg.SharedFunctionalGroupsSequence[0]
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        segment = int(_frame_attr(frame, shared, "SegmentIdentificationSequence")
                      .ReferencedSegmentNumber)
        rows, cols = np.nonzero(frames[n])
        if rows.size == 0:
            continue
        ipp = np.asarray(_frame_attr(frame, shared, "PlanePositionSequence")
                         .ImagePositionPatient, dtype=float)
        iop = np.asarray(_frame_attr(frame, shared, "PlaneOrientationSequence")
                         .ImageOrientationPatient, dtype=float)
        spacing = _frame_attr(frame, shared, "PixelMeasuresSequence").PixelSpacing
        dy, dx = float(spacing[0]), float(spacing[1])
        xyz = ipp + np.outer(cols * dx, iop[:3]) + np.outer(rows * dy, iop[3:])
        sums[segment] = sums.get(segment, np.zeros(3)) + xyz.sum(axis=0)
        counts[segment] = counts.get(segment, 0) + rows.size
    return {
        s: (float(v[0]), float(v[1]), float(v[2]))
        for s, v in ((s, sums[s] / counts[s]) for s in sums)
    }


def _seg_segments(seg: pydicom.Dataset) -> tuple[dict[str, int], int | None]:
    """(Tracking UID -> segment number, number of the liver segment or None)."""
    by_uid: dict[str, int] = {}
    liver = None
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        if "TrackingUID" in item:
            by_uid[str(item.TrackingUID)] = number
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        if prop.CodeValue == codes.LIVER.value and prop.CodingSchemeDesignator == "SCT":
            liver = number
    return by_uid, liver


def read_prior(sr: pydicom.Dataset, seg: pydicom.Dataset | None) -> PriorStudy:
    """Parse a TID 1500 SR (and optionally its SEG) into a :class:`PriorStudy`.

    Parameters
    ----------
    sr:
        A TID 1500 Measurement Report (any SR storage class).
    seg:
        The SEG referenced by the SR's volumetric groups, or None (then no centroids).

    Returns
    -------
    PriorStudy
        One :class:`PriorLesion` per tracked lesion that has a Volume (converted to ml),
        ordered as in the SR; the study UID and date come from the SR.

    Raises
    ------
    ValueError
        If ``sr`` is not a TID 1500 Measurement Report.
    """
    merged: dict[str, _Group] = {}
    for uid, items in _tracked_groups(sr):
        _read_group(uid, items, merged)
    centroids: dict[int, tuple[float, float, float]] = {}
    by_uid: dict[str, int] = {}
    liver_segment = None
    if seg is not None:
        centroids = segment_centroids(seg)
        by_uid, liver_segment = _seg_segments(seg)
    lesions = []
    for entry in merged.values():
        liver_uid = liver_segment is not None and by_uid.get(entry.tracking_uid) == liver_segment
        if entry.volume_ml is None or entry.is_liver or liver_uid:
            continue
        number = by_uid.get(entry.tracking_uid, entry.segment_number)
        lesions.append(
            PriorLesion(
                tracking_id=entry.tracking_id or entry.tracking_uid,
                tracking_uid=entry.tracking_uid,
                volume_ml=entry.volume_ml,
                longest_diameter_mm=entry.long_axis_mm or entry.extra.get("diameter_mm"),
                centroid_xyz=centroids.get(number) if number is not None else None,
            )
        )
    return PriorStudy(
        study_instance_uid=str(sr.StudyInstanceUID),
        study_date=str(getattr(sr, "StudyDate", "") or ""),
        lesions=lesions,
        liver_centroid_xyz=centroids.get(liver_segment) if liver_segment is not None else None,
        sr_sop_instance_uid=str(sr.SOPInstanceUID),
    )


def read_response(sr: pydicom.Dataset) -> VolumetricResponse | None:
    """The volumetric response category of a node SR, or None (baseline, or not a node SR).

    Reads the Current Response CODE item of the report's Qualitative Evaluations container
    (see :func:`node.dicom.sr.qualitative_evaluations`).
    """
    by_code = {(c.value, c.scheme_designator): r for r, c in codes.RESPONSE_CODES.items()}
    for container in _children(sr):
        if not _is(container, codes.QUALITATIVE_EVALUATIONS):
            continue
        for item in _children(container):
            if item.ValueType == "CODE" and _is(item, codes.CURRENT_RESPONSE):
                code = item.ConceptCodeSequence[0]
                return by_code.get((str(code.CodeValue), str(code.CodingSchemeDesignator)))
    return None
