"""Study assembly: DICOM CT files in, one regular HU volume per contrast phase out.

Files are grouped by Series Instance UID and, within a series, by Acquisition Number (one series
may hold two acquisitions, i.e. two phases). Enhanced CT multi-frame images are split into their
frames first (:mod:`node.study.enhanced`). Slices are ordered by their position along the slice
direction (PS3.3 C.7.6.2.1.1), never by Instance Number, and stacked by
:func:`node.study.stacking.stack_slices`, which repairs tilt, missing slices and uneven spacing.
Pixel values become Hounsfield units through the Modality LUT (PS3.3 C.11.1.1.2).
Localizers, dose reports, derived reformats and projections, secondary captures and other SOP
classes are skipped, each series with a logged reason (:data:`SKIP_IMAGE_TYPES`).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from node.errors import StudyError
from node.study.enhanced import ENHANCED_CT_IMAGE_STORAGE, split_frames
from node.study.model import Phase, Study, Volume
from node.study.phases import assign_phases, parse_tm
from node.study.stacking import stack_slices, to_hu

logger = logging.getLogger(__name__)

__all__ = ["load_study", "load_study_dir", "to_hu"]

#: SOP classes that assemble into volumes (PS3.4 B.5).
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VOLUME_SOP_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE})
#: Image Type values (PS3.3 C.8.2.1.1.1, C.8.15.3.1.1) that mark an image as not part of a
#: reconstructed volume -> the reason reported.
SKIP_IMAGE_TYPES: dict[str, str] = {
    "LOCALIZER": "localizer", "SCOUT": "localizer", "TOPOGRAM": "localizer",
    "SCREEN SAVE": "screen save", "DOSE INFO": "dose report", "DOSE_INFO": "dose report",
    "MPR": "derived reformat (MPR)", "REFORMATTED": "derived reformat (MPR)",
    "CURVED": "derived reformat (MPR)", "MIP": "projection (MIP)", "MINIP": "projection (MinIP)",
    "MAXIMUM": "projection (MIP)", "MINIMUM": "projection (MinIP)",
    "PROJECTION IMAGE": "projection", "VOLUME RENDER": "volume rendering", "VR": "volume rendering",
}
#: (Value 1, Value 2) of Image Type that mark a derived secondary image (not a primary recon).
DERIVED_SECONDARY = ("DERIVED", "SECONDARY")
#: Series descriptions of non-image series sent as CT images (dose screens, protocols).
SKIP_DESCRIPTION = re.compile(r"dose\s*(report|info)|patient\s*protocol|scout|topogram|"
                              r"localizer|\bmip\b|\bminip\b", re.IGNORECASE)
#: Slices more than this apart in time (s) belong to different acquisitions.
ACQUISITION_GAP_S = 8.0
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
        Files to read. Non-DICOM files, other SOP classes (SEG, SR, ...), localizers, dose
        reports, derived reformats and projections are skipped, logged and reported in
        :attr:`Study.skipped` (one line per series and reason).

    Returns
    -------
    Study
        One volume per recognised phase (see :func:`node.study.phases.assign_phases`);
        repaired or reported assembly defects are in :attr:`Study.defects`.

    Raises
    ------
    StudyError
        If no series can be assembled into a volume; the message names every reason.
    """
    skipped: list[str] = []
    ct: list[Dataset] = []
    for path in paths:
        ct.extend(_read(Path(path), skipped))
    if not ct:
        raise StudyError("no usable CT image among the input files: "
                         + "; ".join(_collapse(skipped)))
    ct = _single_study(ct, skipped)
    volumes: list[Volume] = []
    for cand in _split_candidates(ct, skipped):
        vol = _build_volume(cand, skipped)
        if vol is not None:
            volumes.append(vol)
    if not volumes:
        raise StudyError("no CT series could be assembled into a volume: "
                         + "; ".join(_collapse(skipped)))
    first = ct[0]
    study = Study(
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        patient_id=str(first.get("PatientID", "")),
        patient_name=str(first.get("PatientName", "")),
        study_date=str(first.get("StudyDate", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
    )
    study.volumes, rejected = assign_phases(volumes)
    study.skipped = _collapse([*skipped, *rejected])
    study.defects = [f"{v.series_instance_uid}: {note}" for v in volumes
                     for note in v.assembly_notes]
    return study


def _collapse(skipped: list[str]) -> list[str]:
    """One line per distinct reason (with the instance count), each logged once."""
    counts: dict[str, int] = {}
    for line in skipped:
        counts[line] = counts.get(line, 0) + 1
    out = [line if n == 1 else f"{line} ({n} instances)" for line, n in counts.items()]
    for line in out:
        logger.info("skipped %s", line)
    return out


def _read(path: Path, skipped: list[str]) -> list[Dataset]:
    """Read one file; its slices (frames) if it is part of a CT volume, else note why not."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError) as exc:
        skipped.append(f"{path}: not readable as DICOM ({exc.__class__.__name__})")
        return []
    series = str(ds.get("SeriesInstanceUID", path))
    reason = skip_reason(ds)
    if reason is not None:
        skipped.append(f"{series}: {reason}")
        return []
    if str(ds.SOPClassUID) == ENHANCED_CT_IMAGE_STORAGE:
        try:
            slices = split_frames(ds)
        except (StudyError, AttributeError, ValueError) as exc:
            skipped.append(f"{series}: Enhanced CT not usable ({exc})")
            return []
    else:
        slices = [ds]
    missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                           "PixelData") if k not in slices[0]]
    if missing:
        skipped.append(f"{series}: instances lack {', '.join(missing)}")
        return []
    return slices


def skip_reason(ds: Dataset) -> str | None:
    """Why an instance is not part of a CT volume (None: it is), by the tables above."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in VOLUME_SOP_CLASSES:
        name = UID(sop_class).name if sop_class else "?"
        return f"SOP class {name} is not CT Image Storage"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    for value in image_type:
        if value in SKIP_IMAGE_TYPES:
            return f"{SKIP_IMAGE_TYPES[value]} (ImageType {'/'.join(image_type)})"
    if tuple(image_type[:2]) == DERIVED_SECONDARY:
        return f"derived secondary image (ImageType {'/'.join(image_type)})"
    description = str(ds.get("SeriesDescription", "") or "")
    if SKIP_DESCRIPTION.search(description):
        return f"not an image volume (series description '{description}')"
    return None


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
                out.extend(_split_by_time(_Candidate(f"{uid} acquisition {acq}",
                                                     by_acq[acq])))
        else:
            out.extend(_split_by_time(_Candidate(uid, group)))
    return out


def _split_by_time(cand: _Candidate) -> list[_Candidate]:
    """Separate acquisitions that share a series and an Acquisition Number.

    Only when slice positions repeat: the slices are ordered by Acquisition (else Content)
    Time and cut where consecutive times are more than :data:`ACQUISITION_GAP_S` apart
    (slices of one helical acquisition follow each other within fractions of a second).
    """
    if len({_position_key(ds) for ds in cand.datasets}) == len(cand.datasets):
        return [cand]
    times = [parse_tm(ds.get("AcquisitionTime") or ds.get("ContentTime"))
             for ds in cand.datasets]
    if any(t is None for t in times):
        return [cand]
    order = sorted(range(len(times)), key=lambda i: times[i])  # type: ignore[arg-type,return-value]
    parts: list[list[Dataset]] = [[cand.datasets[order[0]]]]
    for prev, cur in zip(order, order[1:], strict=False):
        if times[cur] - times[prev] > ACQUISITION_GAP_S:  # type: ignore[operator]
            parts.append([])
        parts[-1].append(cand.datasets[cur])
    if len(parts) == 1 or any(len(p) < MIN_ACQUISITION_SLICES for p in parts):
        return [cand]
    logger.info("%s: %d acquisitions told apart by acquisition time", cand.key, len(parts))
    return [_Candidate(f"{cand.key} time cluster {n + 1}", part)
            for n, part in enumerate(parts)]


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
    """Check and stack one candidate; None (with a reason) when it is not a volume."""
    frames: dict[tuple[object, ...], list[Dataset]] = defaultdict(list)
    for ds in cand.datasets:
        frames[_frame_key(ds)].append(ds)
    main_key = max(frames, key=lambda k: len(frames[k]))
    notes: list[str] = []
    if len(frames) > 1:
        kinds = ", ".join(f"{len(g)} x {k[1]}x{k[2]} px {k[3]} mm iop {k[0]}"
                          for k, g in frames.items())
        notes.append(f"mixed orientation / matrix sizes ({kinds}): kept the "
                     f"{len(frames[main_key])} slices of {main_key[1]}x{main_key[2]}")
        skipped.append(f"{cand.key}: {len(cand.datasets) - len(frames[main_key])} slices "
                       "with another orientation or matrix ignored")
    datasets = frames[main_key]
    if len(datasets) < 2:
        skipped.append(f"{cand.key}: a single slice is not a volume")
        return None
    try:
        stack = stack_slices(datasets)
    except StudyError as exc:
        skipped.append(f"{cand.key}: {exc}")
        return None
    notes.extend(stack.notes)
    for note in notes:
        logger.warning("%s: %s", cand.key, note)
    first = stack.datasets[0]
    return Volume(
        array=stack.array,
        geometry=stack.geometry,
        phase=Phase.UNKNOWN,
        series_instance_uid=str(first.SeriesInstanceUID),
        datasets=stack.datasets,
        series_description=str(first.get("SeriesDescription", "")),
        assembly_notes=notes,
    )
