"""A short SR saying that a study could not be analysed, and why.

Sent (by configuration, ``report_unanalysable``) instead of the SEG + TID 1500 report when a
study has no usable CT series, so the archive and the reading radiologist see why no
measurement came back. Comprehensive SR (PS3.3 A.35.3) with a plain tree::

    CONTAINER Diagnostic imaging report (18748-4, LN)
      CONTAINS TEXT Finding (121071, DCM) = "Not analysable by liver-node: <reason>"
      CONTAINS TEXT Comment (121106, DCM) = research-use disclaimer, algorithm and version
"""

from __future__ import annotations

import hashlib

import highdicom as hd
from highdicom.sr import (
    ContainerContentItem,
    ContentSequence,
    RelationshipTypeValues,
    TextContentItem,
)
from pydicom.dataset import Dataset

from node import ALGORITHM_NAME, ALGORITHM_VERSION, MANUFACTURER, RESEARCH_DISCLAIMER
from node.dicom import codes
from node.dicom.seg import contributing_equipment
from node.dicom.uids import derive_uid

SERIES_DESCRIPTION = "liver-node: not analysable (research use)"
#: Text values of SR TEXT items are UT; keep the reason readable, not a traceback.
MAX_REASON_CHARS = 4000


def build_not_analysable_sr(
    source: Dataset, reason: str, *, series_number: int = 903
) -> hd.sr.ComprehensiveSR:
    """Build the short report for the study ``source`` belongs to.

    Parameters
    ----------
    source:
        Any instance of the study (header only is enough): patient and study attributes are
        copied from it, and it is listed as evidence.
    reason:
        Why the study could not be analysed (e.g. the StudyError message).
    series_number:
        Series Number of the report.

    Raises
    ------
    ValueError
        If ``reason`` is empty or ``source`` has no StudyInstanceUID.
    """
    if not reason.strip():
        raise ValueError("reason must not be empty")
    study_uid = str(getattr(source, "StudyInstanceUID", "") or "")
    if not study_uid:
        raise ValueError("source has no StudyInstanceUID")
    text = reason.strip()[:MAX_REASON_CHARS]
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    contains = RelationshipTypeValues.CONTAINS
    root = ContainerContentItem(name=codes.NOT_ANALYSABLE_TITLE)
    root.ContentSequence = ContentSequence([
        TextContentItem(codes.FINDING_TEXT, f"Not analysable by liver-node: {text}", contains),
        TextContentItem(codes.COMMENT,
                        f"{RESEARCH_DISCLAIMER}. {ALGORITHM_NAME} {ALGORITHM_VERSION}", contains),
    ])
    return hd.sr.ComprehensiveSR(
        evidence=[source],
        content=root,
        series_instance_uid=derive_uid(study_uid, "not-analysable-series", key),
        series_number=series_number,
        sop_instance_uid=derive_uid(study_uid, "not-analysable", key),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=SERIES_DESCRIPTION,
        contributing_equipment=[contributing_equipment()],
    )
