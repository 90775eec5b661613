"""DICOMweb client towards the archive: QIDO-RS searches and WADO-RS retrieval (PS3.18).

Finds a patient's studies, a study's series, and the node's own earlier outputs (TID 1500 SR
and SEG, recognised by their Manufacturer) so that a follow-up can be compared with its prior.
Carries DICOM objects only; reading measurements out of them is ``dicom/``'s job.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from node.errors import ArchiveError

logger = logging.getLogger(__name__)

#: QIDO-RS attributes returned for studies and series (keyword -> tag, PS3.6).
STUDY_FIELDS = {
    "StudyInstanceUID": "0020000D",
    "StudyDate": "00080020",
    "StudyTime": "00080030",
    "AccessionNumber": "00080050",
    "StudyDescription": "00081030",
    "PatientID": "00100020",
}
SERIES_FIELDS = {
    "SeriesInstanceUID": "0020000E",
    "Modality": "00080060",
    "Manufacturer": "00080070",
    "SeriesDate": "00080021",
    "SeriesTime": "00080031",
    "SeriesNumber": "00200011",
    "SeriesDescription": "0008103E",
    "NumberOfSeriesRelatedInstances": "00201209",
}


def _simplify(item: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    """DICOM JSON (PS3.18 F.2) -> {keyword: first value or ""}."""
    out: dict[str, Any] = {}
    for keyword, tag in fields.items():
        values = item.get(tag, {}).get("Value") or [""]
        out[keyword] = values[0]
    return out


def _series_key(series: dict[str, Any]) -> tuple[str, str, int]:
    number = series.get("SeriesNumber")
    return (str(series.get("SeriesDate") or ""), str(series.get("SeriesTime") or ""),
            int(number) if isinstance(number, int | float) else -1)


def _instance_key(ds: Dataset) -> tuple[str, str, int]:
    number = ds.get("InstanceNumber")
    return (str(ds.get("ContentDate", "")), str(ds.get("ContentTime", "")),
            int(number) if number is not None else -1)


def _referenced_series(sr: Dataset) -> set[str]:
    """Series UIDs an SR names as evidence (PS3.3 C.17.2: Current Requested Procedure /
    Pertinent Other Evidence Sequences)."""
    uids: set[str] = set()
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in sr.get(keyword, []):
            for series in study.get("ReferencedSeriesSequence", []):
                if "SeriesInstanceUID" in series:
                    uids.add(str(series.SeriesInstanceUID))
    return uids


class DicomWebArchive:
    """The archive's DICOMweb services.

    Parameters
    ----------
    url:
        Base URL, e.g. ``http://127.0.0.1:8042/dicom-web``.
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._client = DICOMwebClient(url=self.url)

    def _call(self, what: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (requests.RequestException, ValueError) as exc:
            raise ArchiveError(f"DICOMweb {what} at {self.url} failed: {exc}") from exc

    def find_studies(self, patient_id: str) -> list[dict[str, Any]]:
        """Studies of a patient, oldest first (by StudyDate, StudyTime).

        Raises
        ------
        ValueError
            ``patient_id`` is empty or holds QIDO wildcard characters (PS3.4 C.2.2.2.4), which
            would match other patients.
        ArchiveError
            The search failed.
        """
        if not patient_id or any(c in patient_id for c in "*?\\"):
            raise ValueError(f"patient_id must be a plain, non-empty ID, got {patient_id!r}")
        found = self._call(
            "study search", self._client.search_for_studies,
            search_filters={"PatientID": patient_id}, fields=list(STUDY_FIELDS),
        )
        studies = [_simplify(s, STUDY_FIELDS) for s in found]
        # Exact match: some archives match PatientID case-insensitively.
        studies = [s for s in studies if s["PatientID"] in ("", patient_id)]
        return sorted(studies, key=lambda s: (str(s["StudyDate"]), str(s["StudyTime"])))

    def find_series(self, study_uid: str, modality: str | None = None) -> list[dict[str, Any]]:
        """Series of a study (optionally of one modality), oldest first."""
        filters = {"Modality": modality} if modality else {}
        found = self._call(
            "series search", self._client.search_for_series,
            study_instance_uid=study_uid, search_filters=filters, fields=list(SERIES_FIELDS),
        )
        series = [_simplify(s, SERIES_FIELDS) for s in found]
        if modality:
            series = [s for s in series if s["Modality"] == modality]
        return sorted(series, key=_series_key)

    def retrieve_series(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """Every instance of a series (WADO-RS), in the archive's order."""
        datasets = self._call(
            "series retrieval", self._client.retrieve_series,
            study_instance_uid=study_uid, series_instance_uid=series_uid,
        )
        return list(datasets)

    def find_node_outputs(
        self, study_uid: str, manufacturer: str
    ) -> tuple[list[Dataset], list[Dataset]]:
        """The node's latest SR and SEG in a study.

        Node outputs are the SR / SEG series whose Manufacturer equals ``manufacturer``
        (``node.MANUFACTURER``). If there are several (re-analyses), the latest SR series by
        (SeriesDate, SeriesTime, SeriesNumber) wins, and the SEG series that SR cites as
        evidence (else the latest SEG series).

        Returns
        -------
        (sr_datasets, seg_datasets)
            Instances of the chosen series, newest first by (ContentDate, ContentTime,
            InstanceNumber); empty lists when there is none.
        """
        series = [s for s in self.find_series(study_uid) if s["Manufacturer"] == manufacturer]
        srs = [s for s in series if s["Modality"] == "SR"]
        segs = [s for s in series if s["Modality"] == "SEG"]
        sr_datasets = self._latest(study_uid, srs)
        cited: set[str] = set()
        for ds in sr_datasets:
            cited |= _referenced_series(ds)
        preferred = [s for s in segs if s["SeriesInstanceUID"] in cited] or segs
        return sr_datasets, self._latest(study_uid, preferred)

    def _latest(self, study_uid: str, series: Iterable[dict[str, Any]]) -> list[Dataset]:
        ordered = sorted(series, key=_series_key)
        if not ordered:
            return []
        datasets = self.retrieve_series(study_uid, ordered[-1]["SeriesInstanceUID"])
        return sorted(datasets, key=_instance_key, reverse=True)

    def find_prior_outputs(
        self,
        patient_id: str,
        current_study_uid: str,
        current_study_date: str,
        manufacturer: str,
        *,
        current_study_time: str = "",
    ) -> tuple[dict[str, Any], list[Dataset], list[Dataset]] | None:
        """The most recent earlier study of the patient that holds node outputs.

        A study is earlier if its (StudyDate, StudyTime) sorts before (``current_study_date``,
        ``current_study_time``); with no current time given, only an earlier date counts, so
        another study of the same day is never taken as the prior. Studies without an SR by
        the node are skipped.

        Returns
        -------
        (study, sr_datasets, seg_datasets) or None
            ``study`` as returned by :meth:`find_studies`; ``seg_datasets`` may be empty.
        """
        current = (current_study_date, current_study_time)
        for study in reversed(self.find_studies(patient_id)):
            if study["StudyInstanceUID"] == current_study_uid or not study["StudyDate"]:
                continue
            when = (str(study["StudyDate"]), str(study["StudyTime"]) if current_study_time else "")
            if when >= current:
                continue
            sr, seg = self.find_node_outputs(study["StudyInstanceUID"], manufacturer)
            if sr:
                return study, sr, seg
            logger.info("prior study %s has no node outputs, looking further back",
                        study["StudyInstanceUID"])
        return None
