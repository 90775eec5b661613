"""Association benchmark: many short associations, and idle ones, node vs DCMTK storescp.

Some modalities open an association per image. A pynetdicom SCU (the same sender for both)
opens an association, sends one small CT image and releases, ``--associations`` times, to
DCMTK ``storescp`` and to the node (``python -m node.ingest.standalone``, one listener
process, with fsync), interleaved over ``--rounds`` rounds; prints the median milliseconds
per association and each phase (associate, C-STORE, release) and the ratio node/storescp.
Then holds ``--idle`` associations open to the node without traffic for 10 s and prints the
CPU the node spends on them (pynetdicom's own loops poll every 1 ms)::

    .venv/bin/python benchmarks/associations.py [--associations 20] [--rounds 4] [--idle 4]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from ingest import ROOT, ct_series, start_node, start_storescp  # beside this file
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE


def one_association(ae: AE, port: int, called: str, ds: Dataset) -> tuple[float, float, float]:
    """Seconds to associate, to store ``ds`` and to release."""
    t0 = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"{called} refused the association")
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t1 = time.perf_counter()
    status = assoc.send_c_store(ds)
    t2 = time.perf_counter()
    assoc.release()
    t3 = time.perf_counter()
    if status.get("Status") != 0x0000:
        raise RuntimeError(f"{called} answered {status.get('Status')}")
    return t1 - t0, t2 - t1, t3 - t2


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--associations", type=int, default=20, help="per receiver and round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--idle", type=int, default=4, help="idle associations held open")
    args = p.parse_args(argv)
    out_dir = ROOT / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="assoc-bench-", dir=out_dir) as tmp, \
            ExitStack() as stack:
        work = Path(tmp)
        node, node_port = start_node(stack, work, processes=1)
        scp_port = start_storescp(stack, work / "scp")
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context("1.2.840.10008.1.1")  # Verification
        targets = {"storescp": (scp_port, "STORESCP"), "node": (node_port, "LIVERNODE")}
        phases: dict[str, list[tuple[float, float, float]]] = {name: [] for name in targets}
        for r in range(args.rounds):
            images = ct_series(args.associations, size=64)
            order = list(targets) if r % 2 == 0 else list(targets)[::-1]
            for name in order:
                port, called = targets[name]
                phases[name] += [one_association(ae, port, called, ds) for ds in images]
        per = {name: statistics.median(sum(p) for p in v) * 1000 for name, v in phases.items()}
        for name, values in phases.items():
            parts = [statistics.median(v[i] for v in values) * 1000 for i in range(3)]
            print(f"{name:9s}: {per[name]:5.1f} ms per association (median of "
                  f"{len(values)}; associate {parts[0]:.1f}, C-STORE {parts[1]:.1f}, "
                  f"release {parts[2]:.1f})")
        print(f"ratio node/storescp: {per['node'] / per['storescp']:.2f} "
              "(time per association; lower is better)")
        time.sleep(1.0)
        c0 = cpu_seconds(node.pid)
        time.sleep(5.0)
        base = (cpu_seconds(node.pid) - c0) / 5.0
        idle = [ae.associate("127.0.0.1", node_port, ae_title="LIVERNODE")
                for _ in range(args.idle)]
        time.sleep(1.0)
        c0 = cpu_seconds(node.pid)
        time.sleep(10.0)
        busy = (cpu_seconds(node.pid) - c0) / 10.0
        for assoc in idle:
            assoc.release()
        print(f"idle: the node {base * 100:.1f} % of a core; with {args.idle} idle associations "
              f"{busy * 100:.1f} % ({(busy - base) * 100 / max(args.idle, 1):.2f} % each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
