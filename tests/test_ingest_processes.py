"""``listener_processes = 2``: two processes accept on one port and store into one spool.

The first process accepts and hands connections out in turn, itself included; every instance
ends up in the one spool index whichever process served it, the metrics endpoint of the first
process adds up both, and stopping the node stops both cleanly.
"""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage
from pynetdicom import AE, build_context, evt

from node.archive.dimse import set_nodelay
from node.config import load_settings
from node.errors import ConfigError
from node.ingest.spool import CLEAN_MARKER
from tests.conftest import NodeFactory, make_ct_series, process_alive, wait_until


def test_two_listener_processes_share_the_port_the_spool_and_the_counters(
        start_node: NodeFactory, free_port: Callable[[], int]) -> None:
    node = start_node(lambda uid, path: None, listener_processes=2, min_free_bytes=0,
                      metrics_port=free_port())
    (pid,) = node.listener_pids
    assert process_alive(pid) and pid != os.getpid()
    series = make_ct_series(n=16, size=32)
    for ds in series:  # one association each
        ae = AE(ae_title="SCANNER")
        assoc = ae.associate("127.0.0.1", node.port, [build_context(CTImageStorage)],
                             ae_title="LIVERNODE",
                             evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(ds).Status) == 0x0000
        finally:
            assoc.release()
    study = series[0].StudyInstanceUID
    assert len(node.spool.instances(study)) == 16
    # The first process hands connections out in turn, itself included: 8 each.
    assert node.metrics.received == 8
    assert wait_until(lambda: node.total_metrics().received == 16, 5.0)
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as rsp:
        text = rsp.read().decode()
    assert "liver_node_instances_received_total 16" in text
    assert "liver_node_listener_processes 2" in text
    assert node.health() == ""


def test_stop_ends_every_listener_process_and_closes_the_spool_clean(
        start_node: NodeFactory) -> None:
    node = start_node(lambda uid, path: None, listener_processes=3)
    pids = node.listener_pids
    assert len(pids) == 2 and all(process_alive(p) for p in pids)
    node.stop()
    assert not any(process_alive(p) for p in pids)
    assert (node.spool.root / CLEAN_MARKER).exists()


def test_listener_processes_must_be_positive(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("listener_processes = 0\n")
    with pytest.raises(ConfigError, match="listener_processes"):
        load_settings(config, environ={})


def test_a_listener_process_that_ends_is_reported_and_its_share_served_here(
        start_node: NodeFactory) -> None:
    """SIGTERM (systemd signals every process of a service) stops a listener process
    gracefully; the node reports it unhealthy and serves the connections itself."""
    node = start_node(lambda uid, path: None, listener_processes=2, min_free_bytes=0)
    (pid,) = node.listener_pids
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not process_alive(pid), 10.0)
    assert "listener-1 exited with code 0" in node.health()
    for ds in make_ct_series(n=4, size=32):
        ae = AE(ae_title="SCANNER")
        assoc = ae.associate("127.0.0.1", node.port, [build_context(CTImageStorage)],
                             ae_title="LIVERNODE")
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(ds).Status) == 0x0000
        finally:
            assoc.release()
    assert node.metrics.received == 4
