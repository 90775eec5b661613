"""kill -9 of the real listener process: no acknowledged instance is lost, work resumes.

The node runs as its own process (``python -m node.ingest.standalone``: NodeServer with a
callback that writes a marker file); a pynetdicom sender records which instances were
acknowledged, the test kills the process with SIGKILL at chosen moments, restarts it on the
same spool and checks every acknowledged instance byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from pynetdicom import AE, build_context, evt

from node.archive.dimse import set_nodelay
from node.ingest.spool import Spool, StudyState, request_analysis, study_record
from tests.conftest import make_ct_series, process_alive

ROOT = Path(__file__).resolve().parents[1]


class NodeProcess:
    """The standalone listener as a child process on a fixed port and spool."""

    def __init__(self, workdir: Path, port: int, *, stable: float, delay: float,
                 extra: str = "") -> None:
        self.workdir, self.port = workdir, port
        self.config = workdir / "node.toml"
        self.config.write_text(
            f'port = {port}\nspool_dir = "{workdir / "spool"}"\nstable_seconds = {stable}\n'
            f"min_free_bytes = 0\n{extra}"
        )
        self.marker = workdir / "marker.txt"
        self.delay = delay
        self.proc: subprocess.Popen[str] | None = None

    def start(self, delay: float | None = None) -> None:
        cmd = [sys.executable, "-m", "node.ingest.standalone", "--config", str(self.config),
               "--marker", str(self.marker), "--delay", str(self.delay if delay is None else delay)]
        log = open(self.workdir / "node.log", "a")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("READY"), (self.workdir / "node.log").read_text()

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)

    def markers(self) -> list[str]:
        return self.marker.read_text().splitlines() if self.marker.exists() else []


@pytest.fixture
def node_process(tmp_path: Path, free_port: Callable[[], int]) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path, free_port(), stable=0.5, delay=0.0)
    yield node
    node.stop()


def _send(port: int, datasets: list[Dataset], acked: list[Dataset],
          progress: threading.Event | None = None, after: int = 0) -> None:
    """Send on one association, appending each dataset acknowledged with Success to ``acked``."""
    ae = AE(ae_title="SCANNER")
    # pynetdicom notices a peer killed mid-exchange only at its DIMSE timeout: keep it short.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, [build_context(CTImageStorage)], ae_title="LIVERNODE",
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        return
    try:
        for ds in datasets:
            if not assoc.is_established:
                return
            rsp = assoc.send_c_store(ds)
            if "Status" in rsp and int(rsp.Status) == 0x0000:
                acked.append(ds)
                if progress is not None and len(acked) >= after:
                    progress.set()
    finally:
        if assoc.is_established:
            assoc.release()


def _check_intact(spool_dir: Path, acked: list[Dataset]) -> None:
    spool = Spool(spool_dir)
    try:
        for ds in acked:
            record = spool.instance(ds.SOPInstanceUID)
            assert record is not None, f"acknowledged {ds.SOPInstanceUID} lost"
            data = record.path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == record.sha256
            back = dcmread(record.path)
            assert np.array_equal(back.pixel_array, ds.pixel_array)
    finally:
        spool.close()


def _wait(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.mark.parametrize("kill_after", [2, 23])
def test_kill9_during_ingest_loses_no_acknowledged_instance(
    node_process: NodeProcess, kill_after: int
) -> None:
    # Enough instances that the kill lands mid-transfer even when the node is fast.
    series = make_ct_series(n=200, size=128)
    study = series[0].StudyInstanceUID
    node_process.start()
    acked: list[Dataset] = []
    progress = threading.Event()
    sender = threading.Thread(target=_send, args=(node_process.port, series, acked, progress,
                                                  kill_after))
    sender.start()
    assert progress.wait(20)
    node_process.kill9()
    sender.join(30)
    assert kill_after <= len(acked) < len(series)
    _check_intact(node_process.workdir / "spool", acked)

    # Restart; the sender retries what was not acknowledged, the study completes.
    node_process.start()
    retry: list[Dataset] = []
    _send(node_process.port, series[len(acked):], retry)
    assert len(retry) == len(series) - len(acked)
    _wait(lambda: f"done {study} {len(series)}" in node_process.markers())
    _check_intact(node_process.workdir / "spool", series)
    assert not list((node_process.workdir / "spool" / "studies").glob("*/*/.*.tmp"))
    assert not any((node_process.workdir / "spool" / "incoming").iterdir())


def _children(pid: int) -> list[int]:
    """Process IDs whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_kill9_with_two_listener_processes(tmp_path: Path,
                                           free_port: Callable[[], int]) -> None:
    """Both listener processes store durably; killing the node takes the other one with it
    (it would otherwise keep accepting on the port); after a restart nothing acknowledged
    by either process is missing."""
    node = NodeProcess(tmp_path, free_port(), stable=0.5, delay=0.0,
                       extra="listener_processes = 2\n")
    try:
        node.start()
        assert node.proc is not None
        children = [c for c in _children(node.proc.pid) if process_alive(c)]
        assert children, "no extra listener process"
        groups = [make_ct_series(n=60, size=64) for _ in range(6)]
        acked: list[list[Dataset]] = [[] for _ in groups]
        progress = threading.Event()
        senders = [threading.Thread(target=_send, args=(node.port, group, got, progress, 5))
                   for group, got in zip(groups, acked, strict=True)]
        for sender in senders:
            sender.start()
        assert progress.wait(30)
        node.kill9()
        _wait(lambda: not any(process_alive(c) for c in children), timeout=5.0)
        for sender in senders:
            sender.join(30)
        done = [ds for got in acked for ds in got]
        assert done and len(done) < sum(len(g) for g in groups)
        _check_intact(tmp_path / "spool", done)
        node.start()  # recovery with both processes: the spool is consistent
        _check_intact(tmp_path / "spool", done)
        assert not any((tmp_path / "spool" / "incoming").iterdir())
    finally:
        node.stop()


def test_kill9_during_analysis_resumes_after_restart(node_process: NodeProcess) -> None:
    series = make_ct_series(n=3)
    study = series[0].StudyInstanceUID
    node_process.start(delay=60.0)  # the "analysis" hangs until killed
    acked: list[Dataset] = []
    _send(node_process.port, series, acked)
    assert len(acked) == 3
    _wait(lambda: f"start {study}" in node_process.markers())
    node_process.kill9()

    node_process.start(delay=0.0)  # no resend: the interrupted study is resumed from the spool
    _wait(lambda: f"done {study} 3" in node_process.markers())
    assert node_process.markers().count(f"start {study}") == 2  # at-least-once


def test_request_analysis_while_node_runs(node_process: NodeProcess) -> None:
    series = make_ct_series(n=2)
    study = series[0].StudyInstanceUID
    node_process.start()
    _send(node_process.port, series, [])
    _wait(lambda: f"done {study} 2" in node_process.markers())
    spool_dir = node_process.workdir / "spool"
    assert request_analysis(spool_dir, study)  # what `liver-node analyze --study UID` calls
    _wait(lambda: node_process.markers().count(f"done {study} 2") == 2)
    _wait(lambda: getattr(study_record(spool_dir, study), "processed_count", 0) == 2)
    node_process.stop()
    spool = Spool(spool_dir)
    try:
        record = spool.study(study)
        assert record is not None and record.state is StudyState.DONE
        assert record.processed_count == 2
    finally:
        spool.close()
    with pytest.raises(Exception, match="not in the spool"):
        request_analysis(spool_dir, "1.2.3.4")
