"""The node's DICOM Segmentation: one segment per lesion plus one for the liver.

Segment ``k`` (1..n) is the lesion with label ``k`` of :attr:`AnalysisResult.lesion_labels`;
segment ``n + 1`` is the liver, so a SEG exists even when no lesion was found. The SEG is
BINARY (PS3.3 C.8.20.2), references every source image of the reference volume
(ReferencedSeriesSequence and per-frame Derivation Image / Source Image Sequence, which viewers
such as OHIF need) and omits empty frames.

A source image is identified by (SOP Instance UID, frame number): the frames of an Enhanced
CT image (:func:`node.study.enhanced.split_frames`) share one SOP instance, and the SEG then
derives from that single multi-frame image, each frame referencing its source frame by
Referenced Frame Number (PS3.3 C.7.6.16.2.6).
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from node import ALGORITHM_NAME, ALGORITHM_VERSION, MANUFACTURER, RESEARCH_DISCLAIMER
from node.analysis.results import AnalysisResult
from node.dicom import codes
from node.dicom.uids import derive_uid
from node.study.model import Study

#: Series Description of every node SEG (LO, <= 64 characters, PS3.5 6.2).
SEG_SERIES_DESCRIPTION = "liver-node SEG (research use)"
#: Content Label (CS, <= 16 characters, upper case) of the SEG (PS3.3 C.10.9).
SEG_CONTENT_LABEL = "LIVERNODE"
#: Label of the liver segment.
LIVER_SEGMENT_LABEL = "Liver"


def algorithm_identification() -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence of every segment (PS3.3 C.8.20.2, Table 10-19)."""
    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, version=ALGORITHM_VERSION, family=codes.ALGORITHM_FAMILY
    )


def contributing_equipment() -> hd.ContributingEquipment:
    """The node as Contributing Equipment (PS3.3 C.12.1, Contributing Equipment Sequence)."""
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=ALGORITHM_VERSION,
        contribution_description=RESEARCH_DISCLAIMER,
    )


def liver_tracking_uid(study_instance_uid: str, input_key: str) -> str:
    """Deterministic Tracking UID of the liver segment (and of the SR's liver group)."""
    return derive_uid(study_instance_uid, "liver", input_key)


def seg_uids(study_instance_uid: str, input_key: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the SEG derived from the inputs."""
    return (
        derive_uid(study_instance_uid, "seg", "series", input_key),
        derive_uid(study_instance_uid, "seg", input_key),
    )


def _segment_descriptions(
    result: AnalysisResult, liver_uid: str
) -> list[hd.seg.SegmentDescription]:
    """Segment Description items (PS3.3 C.8.20.4): lesions 1..n, then the liver."""
    descriptions = []
    for lesion in sorted(result.lesions, key=lambda les: les.label):
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=lesion.label,
                segment_label=lesion.tracking_id[:64],
                segmented_property_category=codes.CATEGORY_LESION,
                segmented_property_type=codes.TYPE_METASTASIS,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm_identification(),
                tracking_uid=lesion.tracking_uid,
                tracking_id=lesion.tracking_id[:64],
                anatomic_regions=[codes.LIVER],
                display_color=codes.lesion_color(lesion.label),
            )
        )
    descriptions.append(
        hd.seg.SegmentDescription(
            segment_number=len(result.lesions) + 1,
            segment_label=LIVER_SEGMENT_LABEL,
            segmented_property_category=codes.CATEGORY_ANATOMY,
            segmented_property_type=codes.LIVER,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_identification(),
            tracking_uid=liver_uid,
            tracking_id=LIVER_SEGMENT_LABEL,
            display_color=codes.LIVER_COLOR,
        )
    )
    return descriptions


def _check_inputs(study: Study, result: AnalysisResult) -> None:
    """Raise ValueError unless the result matches the reference grid and labels 1..n."""
    ref = study.reference
    shape = ref.geometry.shape
    if len(ref.datasets) != shape[0]:
        raise ValueError("study.reference.datasets must hold one dataset per slice")
    if result.liver_mask.shape != shape or result.lesion_labels.shape != shape:
        raise ValueError(f"result masks must have the reference shape {shape}")
    labels = sorted(les.label for les in result.lesions)
    if labels != list(range(1, len(labels) + 1)):
        raise ValueError(f"result.lesions labels must be 1..n, got {labels}")
    present = set(np.unique(result.lesion_labels).tolist()) - {0}
    if present != set(labels):
        raise ValueError(
            f"result.lesion_labels holds labels {sorted(present)}, lesions are {labels}"
        )
    if not result.liver_mask.any():
        raise ValueError("result.liver_mask is empty")


def segment_stack(result: AnalysisResult) -> np.ndarray:
    """Binary (slices, rows, columns, n + 1) array: lesions 1..n, then the liver."""
    n = len(result.lesions)
    stack = np.zeros((*result.liver_mask.shape, n + 1), dtype=bool)
    for k in range(1, n + 1):
        stack[..., k - 1] = result.lesion_labels == k
    stack[..., n] = result.liver_mask.astype(bool)
    return stack


def frame_number(ds: Dataset) -> int | None:
    """1-based frame of the multi-frame image a reference slice comes from; None if single-frame."""
    number = getattr(ds, "source_frame_number", None)
    return None if number is None else int(number)


def source_key(ds: Dataset) -> tuple[str, int | None]:
    """(SOP Instance UID, frame number) identifying the source image of a reference slice."""
    return str(ds.SOPInstanceUID), frame_number(ds)


def source_image(ds: Dataset) -> Dataset:
    """The instance a reference slice comes from: itself, or the header of its multi-frame.

    Raises
    ------
    ValueError
        If ``ds`` is a frame of a multi-frame image without the multi-frame's header.
    """
    if frame_number(ds) is None:
        return ds
    header: Dataset | None = getattr(ds, "source_dataset", None)
    if header is None:
        raise ValueError(f"frame {frame_number(ds)} of {ds.SOPInstanceUID} lacks its "
                         "multi-frame image (source_dataset, set by split_frames)")
    return header


def source_slices(study: Study) -> list[int]:
    """Slice indices of the reference grid to write, one per distinct source image.

    Normally every slice (``0..n-1``). Where assembly filled missing slices by interpolation,
    several grid slices share the nearest source image (:func:`source_key`); a SEG frame must
    sit on its source image's plane, so per source image only the grid slice nearest its
    position is written.
    """
    ref = study.reference
    keys = [source_key(ds) for ds in ref.datasets]
    if len(set(keys)) == len(keys):
        return list(range(len(keys)))
    best: dict[tuple[str, int | None], tuple[float, int]] = {}
    for k, ds in enumerate(ref.datasets):
        position = np.asarray(ds.ImagePositionPatient, dtype=float)
        distance = abs(float(ref.geometry.patient_to_index(position)[0, 0]) - k)
        if keys[k] not in best or distance < best[keys[k]][0]:
            best[keys[k]] = (distance, k)
    return sorted(k for _, k in best.values())


def _source_arguments(slices: list[Dataset]) -> dict[str, Any]:
    """highdicom's source arguments for the reference slices written, in grid order.

    Single-frame images are passed as they are (frame ``i`` lies on ``source_images[i]``).
    Frames of one Enhanced CT image are passed as that single multi-frame image, which
    highdicom requires, with each SEG frame's plane position: highdicom matches it to the
    source frame on that plane and references it by frame number, so grid order need not be
    frame order, and frames no grid slice was written for are simply not referenced.

    Raises
    ------
    ValueError
        If the slices mix images, or come from several multi-frame images (highdicom 0.28
        derives a SEG from one multi-frame image at most).
    """
    frames = [frame_number(ds) for ds in slices]
    if all(f is None for f in frames):
        return {"source_images": slices}
    uids = {str(ds.SOPInstanceUID) for ds in slices}
    if any(f is None for f in frames) or len(uids) != 1:
        raise ValueError("study.reference.datasets must be single-frame images or the frames "
                         f"of one multi-frame image, got frames of {len(uids)} instance(s)")
    return {
        "source_images": [source_image(slices[0])],
        "plane_positions": [
            hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                     [float(v) for v in ds.ImagePositionPatient])
            for ds in slices
        ],
    }


def build_seg(
    study: Study,
    result: AnalysisResult,
    *,
    input_key: str,
    series_number: int = 901,
) -> hd.seg.Segmentation:
    """Build the BINARY DICOM SEG of the lesions and the liver (PS3.3 A.51, C.8.20).

    Parameters
    ----------
    study:
        The analysed study; ``study.reference.datasets`` are the source images, in slice order
        (interpolated slices are left out: :func:`source_slices`): single-frame images, or the
        frames of one Enhanced CT image (:func:`_source_arguments`).
    result:
        The analysis result on the reference grid; lesion ``k`` has label ``k``.
    input_key:
        Key of the input instances (:func:`node.dicom.uids.input_key`); with the study UID it
        determines the SEG's UIDs, so the same inputs give the same UIDs.
    series_number:
        Series Number of the SEG series.

    Returns
    -------
    highdicom.seg.Segmentation
        The SEG, instance number 1; segment ``n + 1`` is the liver.

    Raises
    ------
    ValueError
        If the masks do not match the reference grid, the lesion labels are not 1..n or the
        source images mix instances (:func:`_source_arguments`).
    """
    _check_inputs(study, result)
    series_uid, sop_uid = seg_uids(study.study_instance_uid, input_key)
    slices = source_slices(study)
    seg = hd.seg.Segmentation(
        **_source_arguments([study.reference.datasets[k] for k in slices]),
        pixel_array=segment_stack(result)[slices],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(
            result, liver_tracking_uid(study.study_instance_uid, input_key)
        ),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=ALGORITHM_VERSION,
        device_serial_number=ALGORITHM_VERSION,
        content_label=SEG_CONTENT_LABEL,
        content_description=RESEARCH_DISCLAIMER,
        content_creator_name="liver-node^",
        series_description=SEG_SERIES_DESCRIPTION,
        omit_empty_frames=True,
        contributing_equipment=[contributing_equipment()],
    )
    # highdicom draws a random Dimension Organization UID: derive it, so the same inputs give
    # the same object (retries and re-runs never differ in any UID).
    dimension_uid = derive_uid(study.study_instance_uid, "seg", "dimensions", input_key)
    for item in [*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence]:
        item.DimensionOrganizationUID = dimension_uid
    return seg
