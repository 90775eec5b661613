"""The spool index interface and recovery from lost index entries.

``INDEXES`` lists the index implementations; every contract test runs against each, so another
index (e.g. PostgreSQL) is added by adding its factory here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from node.errors import IngestError
from node.ingest.index import InstanceRecord, SpoolIndex, SQLiteIndex, StudyState
from node.ingest.spool import CLEAN_MARKER, INDEX_NAME, Spool
from tests.conftest import make_ct_series

INDEXES: dict[str, Callable[[Path], SpoolIndex]] = {
    "sqlite": lambda d: SQLiteIndex(d / "index.sqlite3"),
}


@pytest.fixture(params=sorted(INDEXES))
def index(request: pytest.FixtureRequest, tmp_path: Path) -> SpoolIndex:
    return INDEXES[request.param](tmp_path)


def _record(sop: str, study: str = "1.2.3", series: str = "1.2.3.4") -> InstanceRecord:
    return InstanceRecord(sop, study, series, "1.2.840.10008.5.1.4.1.1.2",
                          Path(f"/spool/{study}/{series}/{sop}.dcm"), 10, "ab" * 32, 5.0)


def test_index_contract(index: SpoolIndex) -> None:
    index.add(_record("1.1"), "SCANNER")
    index.add(_record("1.2"), "SCANNER")
    index.add(_record("1.3", study="9.9"), "OTHER")
    assert index.instance("1.2") == _record("1.2")
    assert index.instance("7.7") is None
    assert [r.sop_instance_uid for r in index.instances("1.2.3")] == ["1.1", "1.2"]
    assert index.indexed_paths() == {str(_record(s).path) for s in ("1.1", "1.2")} | {
        str(_record("1.3", study="9.9").path)}
    study = index.study("1.2.3")
    assert study is not None and study.state is StudyState.PENDING
    assert study.calling_aet == "SCANNER" and study.processed_count == 0
    # compare-and-set: only from the expected state
    assert not index.set_state("1.2.3", StudyState.PROCESSING, expect=StudyState.QUEUED)
    assert index.set_state("1.2.3", StudyState.QUEUED, expect=StudyState.PENDING)
    assert [s.study_instance_uid for s in index.studies(StudyState.QUEUED)] == ["1.2.3"]
    assert index.set_state("1.2.3", StudyState.PROCESSING)
    assert not index.request_analysis("1.2.3")  # busy: left alone
    assert index.requeue_interrupted() == ["1.2.3"]
    requeued = index.study("1.2.3")
    assert requeued is not None and requeued.state is StudyState.PENDING
    assert requeued.last_received == 0
    assert index.set_state("1.2.3", StudyState.DONE, error="")
    done = index.study("1.2.3")
    assert done is not None and done.processed_count == 1
    assert index.request_analysis("1.2.3")
    with pytest.raises(IngestError, match="not in the spool"):
        index.request_analysis("4.5.6")
    # re-indexing an instance replaces it and makes its study pending again
    index.add(_record("1.1"), "LATE")
    again = index.study("1.2.3")
    assert again is not None and again.state is StudyState.PENDING and again.calling_aet == "LATE"
    index.close()


def _store(spool: Spool, ds: Dataset) -> Path:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    spool.store(buffer.getvalue(), ds.StudyInstanceUID, ds.SeriesInstanceUID,
                ds.SOPInstanceUID, ds.SOPClassUID, calling_aet="SCANNER")
    record = spool.instance(ds.SOPInstanceUID)
    assert record is not None
    return record.path


def test_recover_indexes_files_whose_index_entry_was_lost(tmp_path: Path) -> None:
    """A power loss may drop the last index commits (synchronous=NORMAL), never the fsync'ed
    files: recovery finds every file the index lacks and indexes it again, byte-identical."""
    series = make_ct_series(n=3)
    spool = Spool(tmp_path / "spool")
    paths = [_store(spool, ds) for ds in series]
    before = {ds.SOPInstanceUID: spool.instance(ds.SOPInstanceUID) for ds in series}
    spool.close()
    db = sqlite3.connect(tmp_path / "spool" / INDEX_NAME)  # the lost commits
    with db:
        db.execute("DELETE FROM instances WHERE sop_instance_uid != ?",
                   (series[0].SOPInstanceUID,))
        db.execute("DELETE FROM studies")
    db.close()
    spool = Spool(tmp_path / "spool")
    assert spool.instance(series[1].SOPInstanceUID) is None
    interrupted = spool.recover()
    assert interrupted == [series[0].StudyInstanceUID]  # complete again at once
    for ds, path in zip(series, paths, strict=True):
        record = spool.instance(ds.SOPInstanceUID)
        assert record is not None and record.path == path
        old = before[ds.SOPInstanceUID]
        assert old is not None and (record.sha256, record.size) == (old.sha256, old.size)
        assert record.sop_class_uid == ds.SOPClassUID
    study = spool.study(series[0].StudyInstanceUID)
    assert study is not None and study.state is StudyState.PENDING
    spool.close()


def test_recover_quarantines_an_unreadable_unindexed_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    stray = spool.studies_dir / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"not a DICOM file at all")
    assert spool.recover() == []
    assert not stray.exists()
    assert (spool.root / "quarantine" / "unindexed-1.2.3.4.5.dcm").read_bytes().startswith(b"not")
    assert spool.instance("1.2.3.4.5") is None
    spool.close()


def test_recover_skips_the_walk_only_after_a_clean_close(tmp_path: Path) -> None:
    """A clean close marks the spool, so the next start does not list every file; a close
    without the mark (a crash) gets the full walk. A file put in while the node was down
    shows which of the two happened."""
    series = make_ct_series(n=2)
    spool = Spool(tmp_path / "spool")
    _store(spool, series[0])
    spool.close(clean=True)
    assert (tmp_path / "spool" / CLEAN_MARKER).is_file()
    stray = _store(Spool(tmp_path / "other"), series[1])
    target = tmp_path / "spool" / stray.relative_to(tmp_path / "other")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(stray.read_bytes())

    spool = Spool(tmp_path / "spool")
    assert spool.recover() == []  # clean: no walk, the stray is not seen
    assert not (tmp_path / "spool" / CLEAN_MARKER).exists()
    assert spool.instance(series[1].SOPInstanceUID) is None
    spool.close()  # not clean: as after a crash

    spool = Spool(tmp_path / "spool")
    assert spool.recover() == [series[1].StudyInstanceUID]  # the walk found and indexed it
    assert spool.instance(series[1].SOPInstanceUID) is not None
    assert spool.instance(series[0].SOPInstanceUID) is not None
    spool.close()


def test_cli_helpers_refuse_a_missing_index(tmp_path: Path) -> None:
    from node.ingest.spool import request_analysis, study_record

    with pytest.raises(IngestError, match="no spool index"):
        study_record(tmp_path, "1.2.3")
    with pytest.raises(IngestError, match="no spool index"):
        request_analysis(tmp_path, "1.2.3")
    assert not (tmp_path / INDEX_NAME).exists()  # nothing created as a side effect


@pytest.mark.parametrize("sync", [True, False])
def test_sync_writes_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: bool) -> None:
    """sync=True fsyncs file and directory before indexing; sync=False (Orthanc's
    SyncStorageArea: false) skips both and stores the same bytes."""
    import os

    calls: list[str] = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append("file") or real_fdatasync(fd))
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("dir") or real_fsync(fd))
    spool = Spool(tmp_path / "spool", sync=sync)
    ds = make_ct_series(n=1)[0]
    path = _store(spool, ds)
    assert ("file" in calls) is sync and ("dir" in calls) is sync
    from pydicom import dcmread

    assert dcmread(path).PixelData == ds.PixelData
    spool.close()
