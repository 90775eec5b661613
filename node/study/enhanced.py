"""Enhanced CT Image (multi-frame, PS3.3 A.38) split into per-frame single-slice datasets.

Each frame's geometry and rescale come from the Per-Frame Functional Groups, falling back to
the Shared Functional Groups (PS3.3 C.7.6.16): Plane Position (Patient), Plane Orientation
(Patient), Pixel Measures, Pixel Value Transformation and Frame Content. The per-frame
datasets then assemble exactly like classic CT Image slices.
"""

from __future__ import annotations

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from node.errors import StudyError

ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
#: Top-level attributes copied onto every frame (identification and series-level header).
COPIED = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "FrameOfReferenceUID", "PatientID", "PatientName", "StudyDate", "Modality",
    "SeriesDescription", "ImageType", "ContrastBolusAgent", "ContrastBolusStartTime",
    "AcquisitionNumber", "SeriesNumber", "Rows", "Columns", "SamplesPerPixel",
    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation",
)
PIXEL_DATA = Tag(0x7FE0, 0x0010)


def _group(frame: Dataset | None, shared: Dataset | None, sequence: str) -> Dataset | None:
    """The first item of a functional group macro, per-frame first, then shared."""
    for source in (frame, shared):
        if source is not None and sequence in source and len(source[sequence].value):
            item: Dataset = source[sequence].value[0]
            return item
    return None


def _header(ds: Dataset) -> Dataset:
    """The multi-frame's data elements except Pixel Data, shared, not copied."""
    header = Dataset({tag: ds[tag] for tag in ds.keys() if tag != PIXEL_DATA})
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    return header


def split_frames(ds: Dataset) -> list[Dataset]:
    """One lightweight CT-slice-like dataset per frame of an Enhanced CT image.

    The frame's 1-based number is kept as the Python attribute ``source_frame_number`` so
    that derived objects can reference (SOP Instance UID, frame) pairs, and the multi-frame's
    header (every attribute but Pixel Data, so the frames hold the only copy of the pixels)
    as ``source_dataset``: the SEG references the multi-frame image itself.

    Raises
    ------
    StudyError
        If a frame lacks its position, orientation or pixel spacing.
    """
    n = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = ds.pixel_array.reshape(n, int(ds.Rows), int(ds.Columns))
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or [None] * n
    header = _header(ds)
    out: list[Dataset] = []
    for k in range(n):
        fg = per_frame[k]
        position = _group(fg, shared, "PlanePositionSequence")
        orientation = _group(fg, shared, "PlaneOrientationSequence")
        measures = _group(fg, shared, "PixelMeasuresSequence")
        if position is None or orientation is None or measures is None:
            raise StudyError(f"Enhanced CT frame {k + 1} lacks plane position, orientation "
                             "or pixel measures")
        frame = Dataset()
        frame.file_meta = FileMetaDataset()
        frame.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        for keyword in COPIED:
            if keyword in ds:
                setattr(frame, keyword, ds[keyword].value)
        frame.ImagePositionPatient = position.ImagePositionPatient
        frame.ImageOrientationPatient = orientation.ImageOrientationPatient
        frame.PixelSpacing = measures.PixelSpacing
        if "SliceThickness" in measures:
            frame.SliceThickness = measures.SliceThickness
        rescale = _group(fg, shared, "PixelValueTransformationSequence")
        frame.RescaleSlope = rescale.RescaleSlope if rescale is not None else 1
        frame.RescaleIntercept = rescale.RescaleIntercept if rescale is not None else 0
        content = _group(fg, None, "FrameContentSequence")
        if content is not None and "FrameAcquisitionNumber" in content:
            frame.AcquisitionNumber = content.FrameAcquisitionNumber
        frame.PixelData = pixels[k].tobytes()
        frame.source_frame_number = k + 1
        frame.source_dataset = header
        out.append(frame)
    return out
