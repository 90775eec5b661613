"""Ingest benchmark: DCMTK storescu -> DCMTK storescp vs -> the node, in the same run.

Sends the same study of N CT images (512 x 512 int16, default 300) with DCMTK's storescu
(``TCP_NODELAY=1``: the sender's setting is what counts) to

1. DCMTK storescp writing to disk (the reference),
2. a pynetdicom SCP whose handler stores nothing, with pynetdicom's stock acceptor and with
   the node's (node/ingest/fastpath.py: the ceiling of the node),
3. the node with ``sync_writes = false`` (no fsync: what the durability costs),
4. the node (``python -m node.ingest.standalone``: the real listener with its durable spool,
   without the analysis),

on one association, then to the node on 4 concurrent associations, then checks the node's
RSS growth over ``--rss-instances`` further instances (new UIDs each round). Prints
instances/s, the ratio and the bars of issue #3::

    .venv/bin/python benchmarks/ingest.py [--images 300] [--rss-instances 3000]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
STORESCU, STORESCP = Path("/usr/bin/storescu"), Path("/usr/bin/storescp")
ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_study(directory: Path, n: int, size: int = 512) -> list[Path]:
    """``n`` CT Image Storage files of one new study (new UIDs at each call)."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.dcm"):
        old.unlink()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 1500, (size, size), dtype=np.int16)
    paths = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.PatientName, ds.PatientID, ds.Modality = "Bench^Ingest", "BENCH", "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (base + i).tobytes()
        path = directory / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(paths: list[Path], port: int, called: str, associations: int = 1) -> float:
    """Send with ``associations`` concurrent storescu processes; returns the seconds taken."""
    groups = [paths[i::associations] for i in range(associations)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen([str(STORESCU), "-aet", "SCANNER", "-aec", called, "127.0.0.1",
                          str(port), *map(str, group)], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for group in groups
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def pynetdicom_floor(paths: list[Path], fast: bool) -> float:
    """Seconds to send ``paths`` to a pynetdicom SCP whose handler stores nothing.

    ``fast``: with the node's acceptor (node/ingest/fastpath.py), the ceiling of the node on
    this machine; else pynetdicom's stock acceptor. Both set TCP_NODELAY as the node does.
    """
    from pydicom.uid import ExplicitVRLittleEndian as EVRLE
    from pynetdicom import AE, evt

    from node.ingest.fastpath import start_server
    from node.ingest.handlers import AssociationLog, handle_conn_open

    ae = AE(ae_title="FLOOR")
    ae.add_supported_context(CTImageStorage, EVRLE)
    ae.maximum_pdu_size = 262144  # as the node
    port = free_port()
    handlers = [
        (evt.EVT_C_STORE, lambda event: 0x0000),  # Success, without storing
        (evt.EVT_CONN_OPEN, handle_conn_open, [AssociationLog()]),
    ]
    if fast:
        start_server(ae, ("127.0.0.1", port), handlers)
    else:
        ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        return send(paths, port, "FLOOR")
    finally:
        ae.shutdown()


def start_node(work: Path, sync: bool = True) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = work / "node.toml"
    spool = work / ("spool" if sync else "spool-nosync")
    config.write_text(f'port = {port}\nspool_dir = "{spool}"\nstable_seconds = 3600\n'
                      f"max_associations = 8\nsync_writes = {str(sync).lower()}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.ingest.standalone", "--config", str(config),
         "--marker", str(work / "marker.txt")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(work / "node.log", "wb"),  # noqa: SIM115
    )
    wait_port(port)
    return proc, port


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--rss-instances", type=int, default=3000)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        work = Path(tmp)
        paths = write_study(work / "src", args.images)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"study: {len(paths)} images 512x512 int16, {mb:.0f} MB")

        scp_port = free_port()
        (work / "scp").mkdir()
        scp = subprocess.Popen([str(STORESCP), "-aet", "STORESCP", "-od", str(work / "scp"),
                                str(scp_port)], env=ENV, stderr=subprocess.DEVNULL)
        try:
            wait_port(scp_port)
            t_scp = send(paths, scp_port, "STORESCP")
        finally:
            scp.terminate()
            scp.wait(10)
        t_stock = pynetdicom_floor(paths, fast=False)
        t_floor = pynetdicom_floor(paths, fast=True)
        node, port = start_node(work, sync=False)
        try:
            t_nosync = send(paths, port, "LIVERNODE")
        finally:
            node.terminate()
            node.wait(30)
        node, port = start_node(work)
        try:
            t_node = send(paths, port, "LIVERNODE")
            paths = write_study(work / "src", args.images)
            t_node4 = send(paths, port, "LIVERNODE", associations=4)
            rss0 = rss_mb(node.pid)
            sent = 0
            while sent < args.rss_instances:
                paths = write_study(work / "src", min(args.images, args.rss_instances - sent))
                send(paths, port, "LIVERNODE", associations=4)
                sent += len(paths)
            rss1 = rss_mb(node.pid)
        finally:
            node.terminate()
            node.wait(30)
    n = args.images
    scp_rate, node_rate, node4_rate = n / t_scp, n / t_node, n / t_node4
    ratio = node_rate / scp_rate
    print(f"DCMTK storescp, 1 association : {scp_rate:7.1f} inst/s ({t_scp:.2f} s)")
    print(f"pynetdicom no-op SCP, stock   : {n / t_stock:7.1f} inst/s ({t_stock:.2f} s, "
          f"{t_scp / t_stock:.2f} x storescp)")
    print(f"pynetdicom no-op SCP, node's  : {n / t_floor:7.1f} inst/s ({t_floor:.2f} s, "
          f"{t_scp / t_floor:.2f} x storescp; the ceiling of the node)")
    print(f"node, sync_writes=false       : {n / t_nosync:7.1f} inst/s ({t_nosync:.2f} s, "
          f"{t_scp / t_nosync:.2f} x storescp; not power-loss safe)")
    print(f"node, 1 association           : {node_rate:7.1f} inst/s ({t_node:.2f} s)")
    print(f"node, 4 associations (total)  : {node4_rate:7.1f} inst/s ({t_node4:.2f} s)")
    print(f"ratio node/storescp           : {ratio:.2f}  (bar >= 0.5: "
          f"{'PASS' if ratio >= 0.5 else 'FAIL'})")
    print(f"4 assoc >= 1 assoc            : {'PASS' if node4_rate >= node_rate else 'FAIL'}")
    growth = rss1 - rss0
    print(f"RSS over {sent} instances     : {rss0:.0f} -> {rss1:.0f} MB, growth {growth:.1f} MB "
          f"(bar < 50: {'PASS' if growth < 50 else 'FAIL'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
