"""The node's listener for real: NodeServer on a free port, DCMTK and pynetdicom as peers."""

from __future__ import annotations

import queue
import socket
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom import _config as pynetdicom_config

from node.archive.dimse import echo
from node.config import ConfigError, Settings, load_settings
from node.errors import ArchiveError, IngestError
from node.ingest import NodeServer, StudyState
from node.ingest.spool import CLEAN_MARKER
from tests.conftest import (
    NodeFactory,
    make_ct_series,
    require_tool,
    storescu,
    wait_until,
    write_files,
)

STABLE = 0.5  # seconds without instances before a study is complete


class Calls:
    """Records on_study_complete calls; optionally raises for chosen studies."""

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[str, Path]] = queue.Queue()
        self.fail_for: set[str] = set()

    def __call__(self, study_uid: str, study_dir: Path) -> None:
        self.q.put((study_uid, study_dir))
        if study_uid in self.fail_for:
            raise RuntimeError("analysis exploded (on purpose)")

    def wait(self, timeout: float = 10.0) -> tuple[str, Path]:
        return self.q.get(timeout=timeout)

    def none_within(self, seconds: float) -> bool:
        try:
            self.q.get(timeout=seconds)
        except queue.Empty:
            return True
        return False


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def make_node(start_node: NodeFactory, calls: Calls) -> Callable[..., NodeServer]:
    return lambda **changes: start_node(calls, **{"stable_seconds": STABLE, **changes})


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    if not wait_until(predicate, timeout):
        raise AssertionError("condition not met in time")


def test_storescu_study_is_spooled_indexed_and_completed_once(
    make_node: Callable[..., NodeServer], calls: Calls, tmp_path: Path
) -> None:
    node = make_node()
    ct = make_ct_series(n=3) + make_ct_series(n=2)
    for ds in ct[3:]:  # second series, same study
        ds.StudyInstanceUID = ct[0].StudyInstanceUID
    result = storescu(write_files(ct, tmp_path / "in"), node.port)
    assert result.returncode == 0, result.stderr
    study = ct[0].StudyInstanceUID

    records = node.spool.instances(study)
    assert len(records) == 5
    for ds in ct:
        path = tmp_path / "spool" / "studies" / study / ds.SeriesInstanceUID
        path = path / f"{ds.SOPInstanceUID}.dcm"
        assert path.is_file()
        back = dcmread(path)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert np.array_equal(back.pixel_array, ds.pixel_array)

    uid, study_dir = calls.wait(timeout=STABLE + 5)
    assert (uid, study_dir) == (study, tmp_path / "spool" / "studies" / study)
    assert calls.none_within(STABLE + 1.0)
    record = node.spool.study(study)
    assert record is not None and record.state is StudyState.DONE
    assert record.processed_count == 1
    log = node.recent_associations[-1]
    assert (log.peer_ae, log.stored, log.failed) == ("SCANNER", 5, 0)


def test_echo_with_dcmtk_and_pynetdicom(make_node: Callable[..., NodeServer]) -> None:
    node = make_node()
    exe = require_tool("echoscu")
    result = subprocess.run(
        [str(exe), "-aet", "SCANNER", "-aec", "LIVERNODE", "127.0.0.1", str(node.port)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    status = echo(ae_title="LIVERNODE", host="127.0.0.1", port=node.port, calling_aet="TEST")
    assert status == 0x0000


def test_unknown_calling_or_called_ae_is_rejected(make_node: Callable[..., NodeServer]) -> None:
    node = make_node(allowed_calling_aets=("SCANNER", "ORTHANC"))
    kw = {"host": "127.0.0.1", "port": node.port}
    assert echo(ae_title="LIVERNODE", calling_aet="SCANNER", **kw) == 0x0000  # type: ignore[arg-type]
    with pytest.raises(ArchiveError, match="rejected"):
        echo(ae_title="LIVERNODE", calling_aet="INTRUDER", **kw)  # type: ignore[arg-type]
    with pytest.raises(ArchiveError, match="rejected"):
        echo(ae_title="SOMEONEELSE", calling_aet="SCANNER", **kw)  # type: ignore[arg-type]
    _wait_for(lambda: len(node.recent_associations) == 3)
    assert sum(r.echoes for r in node.recent_associations) == 1


def _send_raw(port: int, datasets: list[Dataset]) -> list[int]:
    """Send on one association with pynetdicom; return each status (no raising)."""
    ae = AE(ae_title="SCANNER")
    assoc = ae.associate("127.0.0.1", port, [build_context(CTImageStorage)], ae_title="LIVERNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_malformed_instances_fail_and_listener_keeps_serving(
    make_node: Callable[..., NodeServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_node()
    good, no_study, no_series, good2 = make_ct_series(n=4)
    del no_study.StudyInstanceUID
    del no_series.SeriesInstanceUID
    statuses = _send_raw(node.port, [good, no_study, no_series, good2])
    assert statuses == [0x0000, 0xC000, 0xC000, 0x0000]

    # A file whose dataset lacks the SOP Instance UID (only its file meta has it). DCMTK's
    # storescu refuses to send it, so pynetdicom sends the file's bytes as they are.
    bad = make_ct_series(n=1)[0]
    path = write_files([bad], tmp_path / "bad")[0]
    raw = dcmread(path)
    del raw.SOPInstanceUID
    raw.save_as(path)  # keeps MediaStorageSOPInstanceUID in the file meta
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    context = build_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = AE(ae_title="SCANNER").associate(
        "127.0.0.1", node.port, [context], ae_title="LIVERNODE")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(path).Status) == 0xC000
    finally:
        assoc.release()

    # ... and the listener still serves.
    assert _send_raw(node.port, make_ct_series(n=1)) == [0x0000]
    assert len(node.spool.instances(good.StudyInstanceUID)) == 2
    assert node.spool.instance(bad.SOPInstanceUID) is None


def test_duplicates_same_bytes_are_idempotent_other_bytes_replace(
    make_node: Callable[..., NodeServer], calls: Calls, tmp_path: Path
) -> None:
    node = make_node()
    ds = make_ct_series(n=1)[0]
    path = write_files([ds], tmp_path / "a")[0]
    assert storescu([path], node.port).returncode == 0
    assert calls.wait(timeout=STABLE + 5)[0] == ds.StudyInstanceUID
    first = node.spool.instance(ds.SOPInstanceUID)
    assert storescu([path], node.port).returncode == 0
    assert node.spool.instance(ds.SOPInstanceUID) == first
    assert node.recent_associations[-1].duplicates == 1
    assert calls.none_within(STABLE + 1.0)  # identical bytes do not re-trigger the study

    ds.PixelData = np.full((64, 64), 5, np.int16).tobytes()
    path = write_files([ds], tmp_path / "b")[0]
    assert storescu([path], node.port).returncode == 0
    second = node.spool.instance(ds.SOPInstanceUID)
    assert second is not None and first is not None and second.sha256 != first.sha256
    assert dcmread(second.path).pixel_array.max() == 5
    assert len(node.spool.instances(ds.StudyInstanceUID)) == 1
    assert calls.wait(timeout=STABLE + 5)[0] == ds.StudyInstanceUID  # changed: processed again


def test_tcp_nodelay_is_set_on_accepted_sockets(make_node: Callable[..., NodeServer]) -> None:
    node = make_node()
    ae = AE(ae_title="SCANNER")
    assoc = ae.associate(
        "127.0.0.1", node.port, [build_context("1.2.840.10008.1.1")], ae_title="LIVERNODE")
    assert assoc.is_established
    try:
        _wait_for(lambda: len(node.ae.active_associations) == 1)
        accepted = node.ae.active_associations[0].dul.socket
        assert accepted is not None and accepted.socket is not None
        server_side = accepted.socket
        assert server_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()
    _wait_for(lambda: len(node.recent_associations) == 1)
    assert node.recent_associations[0].tcp_nodelay


def test_callback_failure_marks_study_failed_and_growth_reprocesses(
    make_node: Callable[..., NodeServer], calls: Calls
) -> None:
    node = make_node()
    series = make_ct_series(n=3)
    study = series[0].StudyInstanceUID
    calls.fail_for.add(study)
    assert _send_raw(node.port, series[:2]) == [0, 0]
    assert calls.wait(timeout=STABLE + 5)[0] == study
    _wait_for(lambda: node.spool.study(study).state is StudyState.FAILED)  # type: ignore[union-attr]
    assert "exploded" in node.spool.study(study).error  # type: ignore[union-attr]

    calls.fail_for.clear()
    assert _send_raw(node.port, series[2:]) == [0]  # the listener is unaffected
    assert calls.wait(timeout=STABLE + 5)[0] == study
    _wait_for(lambda: node.spool.study(study).state is StudyState.DONE)  # type: ignore[union-attr]
    assert len(node.spool.instances(study)) == 3


def test_mark_complete_triggers_at_once(make_node: Callable[..., NodeServer], calls: Calls) -> None:
    node = make_node(stable_seconds=60.0)
    series = make_ct_series(n=1)
    assert _send_raw(node.port, series) == [0]
    assert node.mark_complete(series[0].StudyInstanceUID)
    assert calls.wait(timeout=5)[0] == series[0].StudyInstanceUID
    with pytest.raises(IngestError):
        node.mark_complete("1.2.3.4")


def test_settings_file_environment_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('port = 11200\nstable_seconds = 3\n[archive]\nhost = "pacs"\n')
    env = {"LIVER_NODE_PORT": "11300", "LIVER_NODE_ARCHIVE_AE_TITLE": "PACS"}
    s = load_settings(path, {"archive.port": 104, "spool_dir": None}, environ=env)
    assert (s.port, s.stable_seconds) == (11300, 3.0)
    assert (s.archive.host, s.archive.ae_title) == ("pacs", "PACS")
    assert s.archive.port == 104 and "PACS@pacs:104" in s.describe()
    example = Path(__file__).resolve().parents[1] / "config" / "node.toml"
    assert load_settings(example, environ={}) == Settings()
    for bad in ({"prot": 1}, {"port": 0}, {"archive.ae_title": "X" * 17}, {"workers": "two"}):
        with pytest.raises(ConfigError):
            load_settings(None, bad, environ={})
    with pytest.raises(ConfigError, match="LIVER_NODE_SPOL_DIR"):
        load_settings(None, environ={"LIVER_NODE_SPOL_DIR": "x"})


def test_pending_study_survives_a_restart(
    tmp_path: Path, free_port: Callable[[], int], calls: Calls
) -> None:
    settings = Settings(port=free_port(), spool_dir=tmp_path / "spool", stable_seconds=60.0)
    series = make_ct_series(n=2)
    with NodeServer(settings, calls) as node:
        assert _send_raw(node.port, series) == [0, 0]
    assert calls.none_within(0.1)
    assert (tmp_path / "spool" / CLEAN_MARKER).is_file()  # a clean stop left its marker
    with NodeServer(replace(settings, stable_seconds=STABLE), calls) as node:
        assert not (tmp_path / "spool" / CLEAN_MARKER).exists()  # gone before serving
        assert calls.wait(timeout=STABLE + 5)[0] == series[0].StudyInstanceUID
        assert len(node.spool.instances(series[0].StudyInstanceUID)) == 2
