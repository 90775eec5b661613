"""The path a study takes, stage by stage, wired explicitly in order.

spool directory -> study assembly (study/) -> prior lookup (archive/ + dicom/sr_reader) ->
analysis (analysis/) -> DICOM SEG + TID 1500 SR (dicom/) -> files on disk -> C-STORE to the
archive (archive/).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from node import MANUFACTURER
from node.analysis import analyze
from node.analysis.results import AnalysisResult, PriorStudy
from node.dicom.seg import build_seg
from node.dicom.sr import build_sr, sr_uids
from node.dicom.sr_reader import read_prior
from node.dicom.uids import input_key
from node.errors import StudyError
from node.study.assembly import load_study_dir
from node.study.model import Study

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one run of the pipeline produced."""

    study: Study
    result: AnalysisResult
    prior: PriorStudy | None
    seg_path: Path
    sr_path: Path
    seconds: float


def study_input_key(study: Study) -> str:
    """Key of the instances the analysis used: output UIDs derive from it."""
    return input_key([str(ds.SOPInstanceUID) for v in study.volumes.values() for ds in v.datasets])


def time_point_label(study: Study) -> str:
    """Subject Time Point Identifier (TID 1502): the study date, else the study UID."""
    return study.study_date or study.study_instance_uid


def find_prior(study: Study, dicomweb_url: str | None) -> PriorStudy | None:
    """The node's own SR + SEG of the patient's latest earlier study, if the archive has one."""
    if not dicomweb_url:
        return None
    from node.archive.dicomweb import DicomWebArchive

    found = DicomWebArchive(dicomweb_url).find_prior_outputs(
        study.patient_id, study.study_instance_uid, study.study_date, MANUFACTURER
    )
    if found is None:
        logger.info("prior: none for patient %s before %s", study.patient_id, study.study_date)
        return None
    _, srs, segs = found
    # newest first; the SEG series the SR cites comes first
    prior = read_prior(srs[0], segs[0] if segs else None)
    logger.info(
        "prior: study %s (%s) with %d lesions",
        prior.study_instance_uid,
        prior.study_date,
        len(prior.lesions),
    )
    return prior


def find_predecessors(study: Study, dicomweb_url: str | None) -> list[Dataset]:
    """The node's earlier SR of this same study, made from other inputs (a late series).

    An SR with the UID this analysis will give its own SR is the same document (a retry),
    not a predecessor.
    """
    if not dicomweb_url:
        return []
    from node.archive.dicomweb import DicomWebArchive

    srs, _ = DicomWebArchive(dicomweb_url).find_node_outputs(study.study_instance_uid,
                                                              MANUFACTURER)
    _, own_uid = sr_uids(study.study_instance_uid, study_input_key(study))
    earlier = [ds for ds in srs if str(ds.SOPInstanceUID) != own_uid][:1]
    if earlier:
        logger.info("study %s: this SR supersedes %s", study.study_instance_uid,
                    earlier[0].SOPInstanceUID)
    return earlier


def write_outputs(
    study: Study, result: AnalysisResult, out_dir: Path,
    previous_versions: list[Dataset] | None = None,
) -> tuple[Dataset, Dataset, Path, Path]:
    """Build the SEG and the SR and write them under ``out_dir``."""
    key = study_input_key(study)
    seg = build_seg(study, result, input_key=key)
    sr = build_sr(study, result, seg, input_key=key, time_point=time_point_label(study),
                  previous_versions=previous_versions or ())
    out_dir.mkdir(parents=True, exist_ok=True)
    seg_path = out_dir / f"SEG-{seg.SOPInstanceUID}.dcm"
    sr_path = out_dir / f"SR-{sr.SOPInstanceUID}.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    return seg, sr, seg_path, sr_path


def run(
    study_dir: Path,
    out_dir: Path,
    *,
    dicomweb_url: str | None = None,
    prior: PriorStudy | None = None,
    send: Iterable[tuple[str, str, int, str]] = (),
) -> Outcome:
    """Analyse the study whose instances lie under ``study_dir``.

    Parameters
    ----------
    study_dir:
        Folder with the study's DICOM files (searched recursively).
    out_dir:
        Where the SEG and SR files are written.
    dicomweb_url:
        Archive to look for the patient's prior study in (the node's own earlier SR + SEG).
    prior:
        A prior given directly (overrides the archive lookup).
    send:
        C-STORE destinations ``(ae_title, host, port, calling_aet)`` for the SEG and SR.
    """
    start = time.monotonic()
    try:
        study = load_study_dir(study_dir)
    except StudyError as exc:
        logger.error("study in %s is not analysable: %s", study_dir, exc)
        raise
    logger.info(
        "study %s: phases %s, skipped %d series",
        study.study_instance_uid,
        ",".join(f"{p.value} ({v.phase_evidence})" for p, v in study.volumes.items()),
        len(study.skipped),
    )
    for line in [*study.skipped, *study.defects]:
        logger.info("study %s: %s", study.study_instance_uid, line)
    if prior is None:
        prior = find_prior(study, dicomweb_url)
    result = analyze(study, prior)
    predecessors = find_predecessors(study, dicomweb_url)
    _, _, seg_path, sr_path = write_outputs(study, result, out_dir, predecessors)
    for ae_title, host, port, calling_aet in send:
        from node.archive.dimse import store_datasets

        store_datasets([seg_path, sr_path], ae_title=ae_title, host=host, port=port,
                       calling_aet=calling_aet)
        logger.info("sent SEG + SR of %s to %s@%s:%d", study.study_instance_uid, ae_title, host,
                    port)
    seconds = time.monotonic() - start
    logger.info(
        "study %s analysed in %.1f s: %d lesions, total %.1f ml%s",
        study.study_instance_uid,
        seconds,
        len(result.lesions),
        result.total_volume_ml,
        f", response {result.response.category.value}" if result.response else "",
    )
    return Outcome(study, result, prior, seg_path, sr_path, seconds)


def report_not_analysable(
    study_dir: Path, reason: str, out_dir: Path,
    send: Iterable[tuple[str, str, int, str]] = (),
) -> Path | None:
    """Write (and send) the short "not analysable" SR for the study under ``study_dir``.

    Returns the SR's path, or None when no readable DICOM instance is there to say which
    patient and study the report belongs to.
    """
    import pydicom

    from node.dicom.status_sr import build_not_analysable_sr

    source = None
    for path in sorted(p for p in study_dir.rglob("*") if p.is_file()):
        try:
            source = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - any unreadable file: try the next one
            logger.debug("not a readable DICOM file: %s", path)
            continue
        if "StudyInstanceUID" in source:
            break
        source = None
    if source is None:
        logger.warning("no readable instance in %s: no report sent", study_dir)
        return None
    sr = build_not_analysable_sr(source, reason)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"SR-{sr.SOPInstanceUID}.dcm"
    sr.save_as(path, enforce_file_format=True)
    for ae_title, host, port, calling_aet in send:
        from node.archive.dimse import store_datasets

        store_datasets([path], ae_title=ae_title, host=host, port=port, calling_aet=calling_aet)
    logger.info("sent the not-analysable report of %s", source.StudyInstanceUID)
    return path


def format_report(outcome: Outcome) -> str:
    """A plain-text per-lesion table and the response, as the CLI and the demo print it."""
    s, r = outcome.study, outcome.result
    lines = [
        f"Patient {s.patient_id}  study {s.study_date}  {s.study_instance_uid}",
        f"Phases: {', '.join(p.value for p in s.volumes)}   liver {r.liver_volume_ml:.0f} ml",
        f"{'lesion':<10}{'volume ml':>10}{'prior ml':>10}{'change':>9}{'long mm':>9}{'short mm':>9}"
        f"  note",
    ]
    for les in r.lesions:
        prior = les.prior_volume_ml
        change = f"{(les.volume_ml - prior) / prior * 100:+.0f}%" if prior else ""
        prior_txt = f"{prior:.1f}" if prior is not None else "-"
        lines.append(
            f"{les.tracking_id:<10}{les.volume_ml:>10.1f}{prior_txt:>10}{change:>9}"
            f"{les.longest_diameter_mm:>9.1f}{les.short_axis_mm:>9.1f}"
            f"  {'new' if les.is_new else ''}"
        )
    lines.append(f"Total tumour volume: {r.total_volume_ml:.1f} ml")
    if r.response is not None:
        resp = r.response
        lines.append(
            f"Response vs {resp.prior_study_instance_uid}: "
            f"total {resp.prior_total_volume_ml:.1f} -> "
            f"{resp.current_total_volume_ml:.1f} ml ({resp.change_fraction * 100:+.1f}%), "
            f"volumetric category {resp.category.value}"
            + (f", {resp.new_lesions} new" if resp.new_lesions else "")
            + (f", vanished: {', '.join(resp.vanished_lesions)}" if resp.vanished_lesions else "")
        )
    else:
        lines.append("Response: no prior study (baseline)")
    return "\n".join(lines)
