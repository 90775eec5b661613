"""Resource limits, security checks, per-AE stable times and the metrics endpoint, for real."""

from __future__ import annotations

import queue
import socket
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from pynetdicom import AE, build_context, evt

from node.archive.dimse import echo, set_nodelay
from node.errors import ArchiveError
from node.ingest import NodeServer
from tests.conftest import NodeFactory, make_ct_series, wait_until

Make = Callable[..., NodeServer]


@pytest.fixture
def done() -> queue.Queue[str]:
    return queue.Queue()


@pytest.fixture
def make_node(start_node: NodeFactory, done: queue.Queue[str]) -> Make:
    return lambda **changes: start_node(lambda uid, _: done.put(uid),
                                        **{"stable_seconds": 60.0, "min_free_bytes": 0, **changes})


def _associate(port: int, calling: str = "SCANNER") -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, [build_context(CTImageStorage)], ae_title="LIVERNODE",
                        evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])


def _store(port: int, datasets: list[Dataset], calling: str = "SCANNER") -> list[int]:
    assoc = _associate(port, calling)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_low_disk_refuses_with_out_of_resources_and_health_says_why(make_node: Make) -> None:
    node = make_node(min_free_bytes=2**62, metrics_port=0)
    assert _store(node.port, make_ct_series(n=2)) == [0xA700, 0xA700]  # Out of Resources
    assert node.metrics.refused == {0xA700: 2}
    assert "disk nearly full" in node.health()
    assert echo(ae_title="LIVERNODE", host="127.0.0.1", port=node.port, calling_aet="X") == 0


def test_instance_size_limit_and_small_pdu(make_node: Make) -> None:
    node = make_node(max_instance_bytes=20_000, max_pdu_bytes=4096)
    small, big = make_ct_series(n=1, size=64)[0], make_ct_series(n=1, size=128)[0]
    assoc = _associate(node.port)
    assert assoc.is_established
    try:
        assert assoc.acceptor.maximum_length == 4096  # what the node announced (PS3.8 D.3.3.1)
        assert int(assoc.send_c_store(small).Status) == 0x0000  # 8 KiB pixels in 4 KiB PDUs
        assert int(assoc.send_c_store(big).Status) == 0xA700  # 32 KiB: Out of Resources
    finally:
        assoc.release()


def test_association_limit_rejects_the_extra_peer(make_node: Make) -> None:
    node = make_node(max_associations=1)
    held = _associate(node.port)
    assert held.is_established
    try:
        extra = _associate(node.port)
        assert extra.is_rejected
    finally:
        held.release()
    # the node's thread of the released association ends just after the peer saw the release
    assert wait_until(lambda: not node.ae.active_associations, 2.0)
    assert _store(node.port, make_ct_series(n=1)) == [0]


def test_peer_that_hangs_up_mid_request_frees_its_slot_at_once(make_node: Make) -> None:
    """Half an A-ASSOCIATE-RQ, or nothing, then hang up: the slot is free at once, not after
    the ACSE timeout (30 s here), so such peers cannot starve the node of associations."""
    node = make_node(max_associations=2, network_timeout=30.0)
    for payload in (b"\x01\x00\x00\x00\x01\x00\x00\x01", b""):  # half an RQ; nothing
        socks = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(2)]
        for sock in socks:
            sock.sendall(payload)
        assert wait_until(lambda: len(node.ae.active_associations) == 2, 5)
        for sock in socks:
            sock.close()
        assert wait_until(lambda: not node.ae.active_associations, 2.0), "slots still held"
    assert _store(node.port, make_ct_series(n=1)) == [0]


def test_connections_per_host_are_limited(make_node: Make) -> None:
    node = make_node(max_associations=8, max_associations_per_host=2, network_timeout=30.0)
    held = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(2)]
    try:
        assert wait_until(lambda: len(node.ae.active_associations) == 2, 5)
        extra = socket.create_connection(("127.0.0.1", node.port))
        extra.settimeout(5)
        assert extra.recv(1) == b""  # shut by the node at once
        extra.close()
        assert _associate(node.port).is_established is False
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: not node.ae.active_associations, 2.0)
    assert _store(node.port, make_ct_series(n=1)) == [0]  # the host may come back


def test_calling_ae_host_check(make_node: Make) -> None:
    node = make_node(allowed_calling_aets=("SCANNER@127.0.0.1", "ORTHANC@10.254.254.254", "ANY"))
    kw = {"ae_title": "LIVERNODE", "host": "127.0.0.1", "port": node.port}
    assert echo(calling_aet="SCANNER", **kw) == 0  # type: ignore[arg-type]
    assert echo(calling_aet="ANY", **kw) == 0  # type: ignore[arg-type]
    for calling in ("ORTHANC", "INTRUDER"):  # from the wrong host / not listed
        with pytest.raises(ArchiveError, match="rejected"):
            echo(calling_aet=calling, **kw)  # type: ignore[arg-type]
    # counted on the node's thread, possibly just after the peer saw the rejection
    assert wait_until(lambda: node.metrics.associations_rejected == 2, 2.0)


def test_stable_time_per_calling_ae(make_node: Make, done: queue.Queue[str]) -> None:
    node = make_node(stable_seconds_by_aet=("FAST=0.3",))
    slow, fast = make_ct_series(n=1), make_ct_series(n=1)
    assert _store(node.port, slow, "SCANNER") == [0]
    assert _store(node.port, fast, "FAST") == [0]
    assert done.get(timeout=5) == fast[0].StudyInstanceUID
    with pytest.raises(queue.Empty):
        done.get(timeout=0.8)


def test_metrics_and_health_endpoint(make_node: Make, free_port: Callable[[], int],
                                     done: queue.Queue[str]) -> None:
    node = make_node(metrics_port=free_port(), stable_seconds=0.3)
    series = make_ct_series(n=3)
    bad = make_ct_series(n=1)[0]
    bad.Modality = "MR"
    assert _store(node.port, [*series, bad]) == [0, 0, 0, 0xA900]
    assert done.get(timeout=5) == series[0].StudyInstanceUID
    base = f"http://127.0.0.1:{node.metrics_port}"
    assert _get(base + "/health") == (200, "ok\n")
    status, text = _get(base + "/metrics")
    assert status == 200
    lines = set(text.splitlines())
    assert "liver_node_instances_received_total 3" in lines
    assert 'liver_node_instances_refused_total{status="0xA900"} 1' in lines
    assert 'liver_node_store_latency_seconds_bucket{le="+Inf"} 3' in lines
    assert "liver_node_queue_depth 0" in lines
    assert "liver_node_associations_total 1" in lines
    assert "liver_node_analyses_done_total 1" in lines
    assert _get(base + "/nothing")[0] == 404
