"""The archive side for real: Orthanc (Debian package) as a child process, DIMSE and DICOMweb."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    SegmentationStorage,
    generate_uid,
)

from node import MANUFACTURER
from node.archive.dicomweb import DicomWebArchive
from node.archive.dimse import echo, store_datasets
from node.archive.orthanc import OrthancServer
from node.config import Settings
from node.errors import ArchiveError
from node.ingest import NodeServer
from tests.conftest import make_ct_series, storescu, write_files

pytestmark = pytest.mark.orthanc


def _output(
    ct: Dataset, modality: str, *, series_time: str, number: int, manufacturer: str = MANUFACTURER,
    cites: str | None = None,
) -> Dataset:
    """An SR- or SEG-like object in ``ct``'s study (enough for routing and QIDO, not a real one)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComprehensiveSRStorage if modality == "SR" else SegmentationStorage
    ds.SOPInstanceUID = generate_uid()
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyTime",
                    "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, keyword, ct.get(keyword))
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.Manufacturer = modality, manufacturer
    ds.SeriesNumber, ds.InstanceNumber = number, 1
    ds.SeriesDate = ds.ContentDate = ct.StudyDate
    ds.SeriesTime = ds.ContentTime = series_time
    if cites:
        ref_series = Dataset()
        ref_series.SeriesInstanceUID = cites
        ref_series.ReferencedSOPSequence = Sequence()
        ref_study = Dataset()
        ref_study.StudyInstanceUID = ct.StudyInstanceUID
        ref_study.ReferencedSeriesSequence = Sequence([ref_series])
        ds.CurrentRequestedProcedureEvidenceSequence = Sequence([ref_study])
    return ds


def _store(orthanc: OrthancServer, datasets: list[Dataset], calling_aet: str = "LIVERNODE") -> None:
    statuses = store_datasets(datasets, ae_title=orthanc.aet, host="127.0.0.1",
                              port=orthanc.dicom_port, calling_aet=calling_aet)
    assert statuses == [0x0000] * len(datasets)


def test_store_then_find_and_retrieve_over_dicomweb(orthanc: OrthancServer) -> None:
    assert echo(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port,
                calling_aet="LIVERNODE") == 0x0000
    pid = "LN-ARCH-1"
    baseline = make_ct_series(patient_id=pid, study_date="20240110", n=3)
    followup = make_ct_series(patient_id=pid, study_date="20240612", n=2)
    other_patient = make_ct_series(patient_id="LN-ARCH-2", study_date="20231201", n=1)
    ct0 = baseline[0]
    seg_old = _output(ct0, "SEG", series_time="120000", number=901)
    seg_new = _output(ct0, "SEG", series_time="130000", number=903)
    sr_old = _output(ct0, "SR", series_time="120000", number=902, cites=seg_old.SeriesInstanceUID)
    sr_new = _output(ct0, "SR", series_time="130000", number=904, cites=seg_new.SeriesInstanceUID)
    foreign_sr = _output(ct0, "SR", series_time="235959", number=999, manufacturer="OtherCo")
    _store(orthanc, [*baseline, *followup, *other_patient, seg_old, seg_new, sr_old, sr_new,
                     foreign_sr])

    archive = DicomWebArchive(orthanc.dicomweb_url)
    studies = archive.find_studies(pid)
    assert [s["StudyInstanceUID"] for s in studies] == [
        ct0.StudyInstanceUID, followup[0].StudyInstanceUID]
    assert studies[0]["StudyDate"] == "20240110"

    ct_series = archive.find_series(ct0.StudyInstanceUID, modality="CT")
    assert [s["SeriesInstanceUID"] for s in ct_series] == [ct0.SeriesInstanceUID]
    retrieved = archive.retrieve_series(ct0.StudyInstanceUID, ct0.SeriesInstanceUID)
    assert sorted(ds.SOPInstanceUID for ds in retrieved) == sorted(
        ds.SOPInstanceUID for ds in baseline)
    assert retrieved[0].pixel_array.shape == (64, 64)

    sr, seg = archive.find_node_outputs(ct0.StudyInstanceUID, MANUFACTURER)
    assert [ds.SOPInstanceUID for ds in sr] == [sr_new.SOPInstanceUID]
    assert [ds.SOPInstanceUID for ds in seg] == [seg_new.SOPInstanceUID]
    assert archive.find_node_outputs(followup[0].StudyInstanceUID, MANUFACTURER) == ([], [])

    prior = archive.find_prior_outputs(
        pid, followup[0].StudyInstanceUID, "20240612", MANUFACTURER)
    assert prior is not None
    study, prior_sr, prior_seg = prior
    assert study["StudyInstanceUID"] == ct0.StudyInstanceUID
    assert prior_sr[0].SOPInstanceUID == sr_new.SOPInstanceUID
    assert prior_seg[0].SOPInstanceUID == seg_new.SOPInstanceUID
    # The baseline has no earlier study; a same-day study is not a prior.
    assert archive.find_prior_outputs(pid, ct0.StudyInstanceUID, "20240110", MANUFACTURER) is None
    assert archive.find_prior_outputs(pid, "1.2.3", "20240110", MANUFACTURER) is None


def test_unknown_calling_ae_cannot_store(orthanc: OrthancServer) -> None:
    with pytest.raises(ArchiveError):
        store_datasets(make_ct_series(n=1), ae_title=orthanc.aet, host="127.0.0.1",
                       port=orthanc.dicom_port, calling_aet="INTRUDER")
    assert orthanc.get("/studies") == []


def test_orthanc_routes_a_stable_study_to_the_node_exactly_once(
    orthanc: OrthancServer, node_port: int, tmp_path: Path
) -> None:
    calls: queue.Queue[tuple[str, Path]] = queue.Queue()
    settings = Settings(port=node_port, spool_dir=tmp_path / "spool", stable_seconds=0.5,
                        allowed_calling_aets=("ORTHANC",))
    with NodeServer(settings, lambda uid, d: calls.put((uid, d))) as node:
        ct = make_ct_series(patient_id="LN-ROUTE", n=3)
        result = storescu(write_files(ct, tmp_path / "in"), orthanc.dicom_port,
                          calling_aet="SCANNER", called_aet=orthanc.aet)
        assert result.returncode == 0, result.stderr

        try:
            study_uid, study_dir = calls.get(timeout=20)
        except queue.Empty:
            pytest.fail("the node was not called; Orthanc log:\n" + orthanc.log_tail())
        assert study_uid == ct[0].StudyInstanceUID
        assert len(list(study_dir.rglob("*.dcm"))) == 3
        assert {r.peer_ae for r in node.recent_associations} == {"ORTHANC"}

        # The node's result arrives: the study becomes stable again but is not routed again;
        # a study holding only an SR is never routed.
        sr = _output(ct[0], "SR", series_time="120000", number=900)
        lone = make_ct_series(patient_id="LN-ROUTE-2", n=1)[0]
        sr_only = _output(lone, "SR", series_time="120000", number=900)
        _store(orthanc, [sr, sr_only], calling_aet=settings.archive.calling_aet)
        time.sleep(1 + 3)  # StableAge + 3 s
        assert calls.empty(), "a study bounced back to the node"
        assert len(node.spool.instances(study_uid)) == 3
        assert node.spool.study(lone.StudyInstanceUID) is None
        routed = orthanc.post("/tools/lookup", ct[0].StudyInstanceUID.encode())[0]["ID"]
        assert orthanc.get(f"/studies/{routed}/metadata/Routed") == 3
