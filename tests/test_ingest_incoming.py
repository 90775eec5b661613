"""Instances written to the spool while they arrive (spool.Incoming, fastpath's StoreSink).

Each C-STORE data set goes to a temporary file in ``<spool>/incoming/`` fragment by fragment;
after the last one the network thread syncs it while the handler checks the data set, and the
handler commits it (rename into place, index) before answering. Every way a request can end
without a commit (refusal, failed sync, abort in the middle, an association that ends with a
request unserved) must leave no temporary file and no open file behind.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from node.archive.dimse import set_nodelay
from node.ingest import NodeServer
from node.ingest.fastpath import NodeDIMSEServiceProvider
from node.ingest.incoming import FilePool
from node.ingest.spool import Spool, StoreOutcome
from tests.conftest import NodeFactory, make_ct_series, wait_until
from tests.test_ingest_fastpath import _node_dimse, _store_request_pdatas

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.826.0.1.3680043.8.498.123"


class RecordingSink:
    """A StoreSink that keeps what it was given and what was called."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.calls: list[str] = []

    def write(self, data: memoryview) -> None:
        self.data += data
        self.calls.append("write")

    def finish(self) -> None:
        self.calls.append("finish")

    def discard(self) -> None:
        self.calls.append("discard")


def _dimse_with_sink() -> tuple[NodeDIMSEServiceProvider, list[RecordingSink]]:
    dimse = _node_dimse()
    dimse.assoc._accepted_cx[3] = build_context(CTImageStorage, ExplicitVRLittleEndian)
    sinks: list[RecordingSink] = []

    def factory(assoc: Association, rq: C_STORE, syntax: str) -> RecordingSink:
        assert syntax == ExplicitVRLittleEndian and rq.MessageID == 17
        sinks.append(RecordingSink())
        return sinks[-1]

    dimse.sink_factory = factory
    return dimse, sinks


def test_each_fragment_goes_to_the_sink_and_it_is_finished_after_queueing() -> None:
    sent, pdatas = _store_request_pdatas(16384)
    dimse, sinks = _dimse_with_sink()
    for pdata in pdatas:
        dimse.receive_primitive(pdata)
    (sink,) = sinks
    _, rq = dimse.msg_queue.get_nowait()
    assert bytes(sink.data) == sent.DataSet.getvalue() == rq.DataSet.getvalue()
    assert sink.calls[-1] == "finish" and "discard" not in sink.calls
    assert sink.calls.count("write") > 10  # fragment by fragment, not at the end
    assert rq._node_sink is sink


def test_sinks_of_cut_and_unserved_requests_are_discarded() -> None:
    _, pdatas = _store_request_pdatas(16384)
    dimse, sinks = _dimse_with_sink()
    dimse.receive_primitive(pdatas[0])
    dimse.receive_primitive(pdatas[1])
    dimse.drop_partial()  # what the network thread does when the connection ends here
    assert sinks[0].calls[-1] == "discard"
    for pdata in pdatas:
        dimse.receive_primitive(pdata)
    assert sinks[1].calls[-1] == "finish"
    dimse.drop_unserved()  # the association ended before its reactor served the request
    assert sinks[1].calls[-1] == "discard" and dimse.msg_queue.empty()
    dimse.receive_primitive(pdatas[0])
    dimse.receive_primitive(pdatas[1])
    dimse.receive_primitive(pdatas[0])  # a command inside the data set: abort
    assert sinks[2].calls[-1] == "discard"


def test_a_failing_sink_factory_leaves_the_request_to_the_handler() -> None:
    sent, pdatas = _store_request_pdatas(16384)
    dimse, _ = _dimse_with_sink()

    def broken(assoc: Association, rq: C_STORE, syntax: str) -> None:
        raise OSError(errno.EMFILE, "too many open files")

    dimse.sink_factory = broken
    for pdata in pdatas:
        dimse.receive_primitive(pdata)
    _, rq = dimse.msg_queue.get_nowait()
    assert rq._node_sink is None and rq.DataSet.getvalue() == sent.DataSet.getvalue()


def _incoming_files(spool: Spool) -> list[Path]:
    return sorted(spool.incoming_dir.iterdir())


def test_commit_moves_the_file_into_place_and_indexes_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    incoming = spool.incoming(b"HEAD")
    for part in (b"a" * 1000, memoryview(b"b" * 3000)[1000:], b""):
        incoming.write(part)
    incoming.finish()
    assert len(_incoming_files(spool)) == 1
    assert spool.commit(incoming, STUDY, SERIES, SOP, CTImageStorage) is StoreOutcome.STORED
    record = spool.instance(SOP)
    assert record is not None and record.size == 4 + 1000 + 2000
    data = record.path.read_bytes()
    assert data == b"HEAD" + b"a" * 1000 + b"b" * 2000
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    assert _incoming_files(spool) == []
    again = spool.incoming(b"HEAD")
    again.write(b"a" * 1000 + b"b" * 2000)
    again.finish()
    assert spool.commit(again, STUDY, SERIES, SOP, CTImageStorage) is StoreOutcome.DUPLICATE
    assert _incoming_files(spool) == []
    spool.close()


def test_a_failed_sync_or_an_oversized_instance_is_not_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    big = spool.incoming(b"HEAD", max_bytes=10)
    big.write(b"x" * 11)
    big.finish()
    with pytest.raises(OSError, match="exceeds"):
        spool.commit(big, STUDY, SERIES, SOP, CTImageStorage)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "injected I/O error")

    monkeypatch.setattr(os, "fdatasync", failing)
    broken = spool.incoming(b"HEAD")
    broken.write(b"y" * 100)
    broken.finish()
    with pytest.raises(OSError, match="injected"):
        spool.commit(broken, STUDY, SERIES, SOP, CTImageStorage)
    assert spool.instance(SOP) is None and _incoming_files(spool) == []
    assert not list(spool.studies_dir.rglob("*.dcm"))
    spool.close()


def test_recovery_removes_unfinished_incoming_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    left = spool.incoming(b"HEAD")
    left.write(b"z" * 100)
    left.close()  # the process died here: never acknowledged
    spool.close(clean=True)
    spool = Spool(tmp_path / "spool")
    spool.recover()  # even after a clean stop (the listener was killed first)
    assert _incoming_files(spool) == []
    spool.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


Make = Callable[..., NodeServer]


def _associate(node: NodeServer) -> Association:
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", node.port, [build_context(CTImageStorage)],
                         ae_title="LIVERNODE", evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    assert assoc.is_established
    return assoc


def test_live_sync_failure_answers_out_of_resources_and_the_next_store_succeeds(
        start_node: NodeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    node = start_node(lambda uid, path: None, min_free_bytes=0)
    first, second = make_ct_series(n=2, size=32)
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "injected I/O error")

    monkeypatch.setattr(os, "fdatasync", failing)
    assoc = _associate(node)
    try:
        assert int(assoc.send_c_store(first).Status) == 0xA700  # Out of Resources
        monkeypatch.setattr(os, "fdatasync", real)
        assert int(assoc.send_c_store(second).Status) == 0x0000
    finally:
        assoc.release()
    assert node.spool.instance(first.SOPInstanceUID) is None
    record = node.spool.instance(second.SOPInstanceUID)
    assert record is not None and record.path.is_file()
    assert _incoming_files(node.spool) == []


def test_live_abort_in_the_middle_of_a_data_set_leaves_nothing_behind(
        start_node: NodeFactory) -> None:
    node = start_node(lambda uid, path: None, min_free_bytes=0)
    (ds,) = make_ct_series(n=1, size=256)
    pool = node.spool.file_pool  # holds its ready files open: counted once it is full
    fd, path = pool.take(node.spool.incoming_dir)  # starts the pool's thread
    os.close(fd)
    path.unlink()
    assert wait_until(lambda: pool.ready == pool.size, 5.0)
    before = _open_fds()
    for _ in range(3):
        assoc = _associate(node)
        context_id = cast(int, assoc.accepted_contexts[0].context_id)
        _, pdatas = _store_request_pdatas(16384)
        for pdata in pdatas:  # re-addressed to the accepted context
            pdata.presentation_data_value_list = [
                [context_id, data] for _, data in pdata.presentation_data_value_list]
        for pdata in pdatas[:3]:  # the command and two data fragments, then abort
            assoc.dul.send_pdu(pdata)
        assert wait_until(lambda: len(_incoming_files(node.spool)) == 1, 5.0)
        assoc.abort()
        assert wait_until(lambda: not node.ae.active_associations, 5.0)
        assert wait_until(lambda: _incoming_files(node.spool) == [], 5.0)
    assert wait_until(lambda: pool.ready == pool.size and _open_fds() <= before, 5.0), (
        before, _open_fds())
    assoc = _associate(node)
    try:
        assert int(assoc.send_c_store(ds).Status) == 0x0000
    finally:
        assoc.release()
    assert node.spool.instance(ds.SOPInstanceUID) is not None


def test_an_unhashed_incoming_file_is_committed_with_the_hash_given(tmp_path: Path) -> None:
    """The listener's files are hashed by the handler (beside the sync), not while written."""
    spool = Spool(tmp_path / "spool")
    incoming = spool.incoming(b"HEAD", hashed=False)
    incoming.write(b"body")
    incoming.finish()
    assert incoming.header == b"HEAD"
    with pytest.raises(ValueError, match="without hashing"):
        spool.commit(incoming, STUDY, SERIES, SOP, CTImageStorage)
    assert _incoming_files(spool) == [] and spool.instance(SOP) is None
    incoming = spool.incoming(b"HEAD", hashed=False)
    incoming.write(b"body")
    incoming.finish()
    digest = hashlib.sha256(b"HEADbody").hexdigest()
    assert spool.commit(incoming, STUDY, SERIES, SOP, CTImageStorage,
                        sha256=digest) is StoreOutcome.STORED
    record = spool.instance(SOP)
    assert record is not None and record.sha256 == digest
    assert hashlib.sha256(record.path.read_bytes()).hexdigest() == digest
    spool.close()


def test_discard_after_commit_leaves_a_new_file_of_the_same_name(tmp_path: Path) -> None:
    """mkstemp may hand a committed file's temporary name to the next instance: the first
    instance's (late) discard must not delete it."""
    spool = Spool(tmp_path / "spool")
    first = spool.incoming(b"HEAD")
    first.write(b"one")
    first.finish()
    spool.commit(first, STUDY, SERIES, SOP, CTImageStorage)
    first.path.write_bytes(b"another instance, same temporary name")
    first.discard()
    assert first.path.exists()
    spool.close()


def test_file_pool_hands_out_empty_files_made_ahead(tmp_path: Path) -> None:
    ready_dir, target = tmp_path / "ready", tmp_path / "incoming"
    ready_dir.mkdir()
    target.mkdir()
    pool = FilePool(ready_dir, size=3)
    try:
        first_fd, first = pool.take(target)  # made on the spot: the thread just started
        assert wait_until(lambda: pool.ready == 3 and len(list(ready_dir.iterdir())) == 3)
        made_ahead = {p.name for p in ready_dir.iterdir()}
        fd, path = pool.take(target)
        assert path.parent == target and path.name in made_ahead and path.stat().st_size == 0
        os.write(fd, b"data")
        assert path.read_bytes() == b"data"
        assert wait_until(lambda: pool.ready == 3)  # refilled
        for handle in (fd, first_fd):
            os.close(handle)
        assert first.parent == target
    finally:
        pool.close()
    assert list(ready_dir.iterdir()) == []  # what was not taken is deleted
    fd, path = pool.take(target)  # closed: still works, without a thread
    os.close(fd)
    assert path.parent == target and list(ready_dir.iterdir()) == []


def test_file_pool_without_its_directory_creates_in_place(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ready_dir, target = tmp_path / "ready", tmp_path / "incoming"
    ready_dir.mkdir()
    target.mkdir()
    pool = FilePool(ready_dir, size=2)
    try:
        os.close(pool.take(target)[0])
        assert wait_until(lambda: pool.ready == 2)
        for path in ready_dir.iterdir():
            path.unlink()  # the ready files vanish (e.g. a recovery by another process)
        ready_dir.rmdir()
        fd, path = pool.take(target)  # the rename fails: a file is made in place
        os.close(fd)
        assert path.parent == target and path.exists()
        # The thread cannot refill: it says so once, not at each retry (every second).
        assert wait_until(lambda: "cannot make files" in caplog.text, 5.0)
        time.sleep(1.5)
        assert caplog.text.count("cannot make files") == 1
    finally:
        pool.close()


def test_spool_recovery_and_close_remove_the_pools_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.incoming(b"x").discard()
    ready_dir = spool.root / "ready"
    assert wait_until(lambda: spool.file_pool.ready == spool.file_pool.size)
    spool.close()
    assert list(ready_dir.iterdir()) == []
    (ready_dir / "left-by-a-crash.tmp").write_bytes(b"")
    spool = Spool(tmp_path / "spool")
    spool.recover()
    assert list(ready_dir.iterdir()) == []
    spool.close()
