"""Study assembly: DICOM CT files in, one regular HU volume per contrast phase out.

Files are grouped by Series Instance UID and, within a series, by Acquisition Number (one series
may hold two acquisitions, i.e. two phases). Slices are ordered by their position along the slice
direction (PS3.3 C.7.6.2.1.1), never by Instance Number. Pixel values become Hounsfield units
through the Modality LUT, i.e. Rescale Slope / Intercept (PS3.3 C.11.1.1.2).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.errors import StudyError
from node.study.model import Geometry, Phase, Study, Volume
from node.study.phases import assign_phases

logger = logging.getLogger(__name__)

#: SOP classes that assemble into volumes (PS3.4 B.5).
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Image Type values (PS3.3 C.8.2.1.1.1) that mark a slice as not part of an axial volume.
NON_VOLUME_IMAGE_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM", "SCREEN SAVE"})
#: Tolerances of the geometry checks.
ORIENTATION_TOLERANCE = 1e-3
SPACING_RELATIVE_TOLERANCE = 0.1
#: A second acquisition inside one series counts as its own volume from this many slices on.
MIN_ACQUISITION_SLICES = 3


@dataclass
class _Candidate:
    """One set of slices that may become a volume."""

    key: str
    datasets: list[Dataset]


def load_study_dir(directory: Path | str) -> Study:
    """Assemble the study from every file below ``directory`` (recursive)."""
    root = Path(directory)
    if not root.is_dir():
        raise StudyError(f"not a directory: {root}")
    return load_study(sorted(p for p in root.rglob("*") if p.is_file()))


def load_study(paths: Iterable[Path | str]) -> Study:
    """Read DICOM files and assemble them into a :class:`Study`.

    Parameters
    ----------
    paths:
        Files to read. Non-DICOM files, other SOP classes (SEG, SR, ...) and localizers are
        skipped and reported in :attr:`Study.skipped`.

    Returns
    -------
    Study
        One volume per recognised phase (see :func:`node.study.phases.assign_phases`).

    Raises
    ------
    StudyError
        If no usable CT image is found.
    """
    skipped: list[str] = []
    ct: list[Dataset] = []
    for path in paths:
        ds = _read(Path(path), skipped)
        if ds is not None:
            ct.append(ds)
    if not ct:
        raise StudyError("no CT image storage instances among the input files")
    ct = _single_study(ct, skipped)
    volumes: list[Volume] = []
    for cand in _split_candidates(ct, skipped):
        vol = _build_volume(cand, skipped)
        if vol is not None:
            volumes.append(vol)
    if not volumes:
        raise StudyError("no CT series could be assembled into a volume; " + "; ".join(skipped))
    first = ct[0]
    study = Study(
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        patient_id=str(first.get("PatientID", "")),
        patient_name=str(first.get("PatientName", "")),
        study_date=str(first.get("StudyDate", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        skipped=skipped,
    )
    study.volumes, rejected = assign_phases(volumes)
    study.skipped.extend(rejected)
    return study


def _read(path: Path, skipped: list[str]) -> Dataset | None:
    """Read one file; return it if it is an axial CT image, else note why not."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError) as exc:
        skipped.append(f"{path}: not readable as DICOM ({exc.__class__.__name__})")
        return None
    sop_class = str(ds.get("SOPClassUID", ""))
    series = str(ds.get("SeriesInstanceUID", path))
    if sop_class != CT_IMAGE_STORAGE:
        skipped.append(f"{series}: SOP class {sop_class or '?'} is not CT Image Storage")
        return None
    image_type = {str(v).upper() for v in (ds.get("ImageType") or [])}
    if image_type & NON_VOLUME_IMAGE_TYPES:
        skipped.append(f"{series}: localizer ({'/'.join(sorted(image_type))})")
        return None
    missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                           "PixelData") if k not in ds]
    if missing:
        skipped.append(f"{series}: instance {ds.get('SOPInstanceUID', path)} lacks "
                       f"{', '.join(missing)}")
        return None
    return ds


def _single_study(ct: list[Dataset], skipped: list[str]) -> list[Dataset]:
    """Keep the study with the most instances; report instances of other studies."""
    by_study: dict[str, list[Dataset]] = defaultdict(list)
    for ds in ct:
        by_study[str(ds.get("StudyInstanceUID", ""))].append(ds)
    best = max(sorted(by_study), key=lambda uid: len(by_study[uid]))
    for uid, group in sorted(by_study.items()):
        if uid != best:
            skipped.append(f"{uid}: {len(group)} instances of another study ignored")
    return by_study[best]


def _split_candidates(ct: list[Dataset], skipped: list[str]) -> list[_Candidate]:
    """Group by series, then by acquisition number when that yields real volumes."""
    by_series: dict[str, list[Dataset]] = defaultdict(list)
    for ds in ct:
        by_series[str(ds.SeriesInstanceUID)].append(ds)
    out: list[_Candidate] = []
    for uid in sorted(by_series):
        group = by_series[uid]
        by_acq: dict[str, list[Dataset]] = defaultdict(list)
        for ds in group:
            by_acq[str(ds.get("AcquisitionNumber", ""))].append(ds)
        positions = {_position_key(ds) for ds in group}
        duplicated = len(positions) < len(group)
        real = all(len(g) >= MIN_ACQUISITION_SLICES for g in by_acq.values())
        if len(by_acq) > 1 and (duplicated or real):
            for acq in sorted(by_acq, key=_acq_sort_key):
                out.append(_Candidate(f"{uid} acquisition {acq}", by_acq[acq]))
        else:
            out.append(_Candidate(uid, group))
    return out


def _acq_sort_key(acq: str) -> tuple[int, str]:
    return (int(acq), "") if acq.lstrip("-").isdigit() else (1 << 30, acq)


def _position_key(ds: Dataset) -> tuple[float, ...]:
    return tuple(round(float(v), 2) for v in ds.ImagePositionPatient)


def _frame_key(ds: Dataset) -> tuple[object, ...]:
    """Orientation and matrix: what every slice of one volume must share."""
    iop = tuple(round(float(v), 3) for v in ds.ImageOrientationPatient)
    spacing = tuple(round(float(v), 4) for v in ds.PixelSpacing)
    return (iop, int(ds.Rows), int(ds.Columns), spacing)


def _build_volume(cand: _Candidate, skipped: list[str]) -> Volume | None:
    """Sort, check and stack one candidate; None (with a reason) when it is not a volume."""
    frames: dict[tuple[object, ...], list[Dataset]] = defaultdict(list)
    for ds in cand.datasets:
        frames[_frame_key(ds)].append(ds)
    main_key = max(frames, key=lambda k: len(frames[k]))
    for key, group in frames.items():
        if key != main_key:
            skipped.append(f"{cand.key}: {len(group)} slices with another orientation or "
                           "matrix ignored")
    datasets = frames[main_key]
    if len(datasets) < 2:
        skipped.append(f"{cand.key}: a single slice is not a volume")
        return None
    try:
        datasets, geometry = sort_and_measure(datasets)
    except StudyError as exc:
        skipped.append(f"{cand.key}: {exc}")
        return None
    array = np.stack([to_hu(ds) for ds in datasets]).astype(np.float32, copy=False)
    first = datasets[0]
    return Volume(
        array=array,
        geometry=geometry,
        phase=Phase.UNKNOWN,
        series_instance_uid=str(first.SeriesInstanceUID),
        datasets=datasets,
        series_description=str(first.get("SeriesDescription", "")),
    )


def sort_and_measure(datasets: Sequence[Dataset]) -> tuple[list[Dataset], Geometry]:
    """Order slices along the slice normal and derive the volume geometry.

    The slice direction is taken from the slice positions themselves (first to last), so that
    gantry-tilted stacks keep their true geometry; spacing is the mean step between positions.

    Raises
    ------
    StudyError
        On duplicate positions or irregular slice spacing.
    """
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    if np.linalg.norm(normal) < 1 - ORIENTATION_TOLERANCE:
        raise StudyError("ImageOrientationPatient cosines are not orthonormal")
    pos = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for ds in datasets])
    order = np.argsort(pos @ normal, kind="stable")
    pos = pos[order]
    ordered = [datasets[i] for i in order]
    steps = np.linalg.norm(np.diff(pos, axis=0), axis=1)
    if np.any(steps < 1e-3):
        raise StudyError("duplicate slice positions")
    mean_step = float(np.mean(steps))
    if np.max(np.abs(steps - mean_step)) > SPACING_RELATIVE_TOLERANCE * mean_step:
        raise StudyError(f"irregular slice spacing ({steps.min():.2f}-{steps.max():.2f} mm)")
    direction = (pos[-1] - pos[0]) / np.linalg.norm(pos[-1] - pos[0])
    px = [float(v) for v in ordered[0].PixelSpacing]
    geometry = Geometry(
        origin=tuple(float(v) for v in pos[0]),  # type: ignore[arg-type]
        row_cosine=tuple(float(v) for v in row_cos),  # type: ignore[arg-type]
        column_cosine=tuple(float(v) for v in col_cos),  # type: ignore[arg-type]
        slice_normal=tuple(float(v) for v in direction),  # type: ignore[arg-type]
        spacing=(mean_step, px[0], px[1]),
        shape=(len(ordered), int(ordered[0].Rows), int(ordered[0].Columns)),
    )
    return ordered, geometry


def to_hu(ds: Dataset) -> np.ndarray:
    """Stored values to Hounsfield units via Rescale Slope / Intercept (PS3.3 C.11.1.1.2)."""
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return ds.pixel_array.astype(np.float32) * np.float32(slope) + np.float32(intercept)
