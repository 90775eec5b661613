"""Ingest benchmark: DCMTK storescu -> DCMTK storescp vs -> the node, in the same run.

Sends the same study of N CT images (512 x 512 int16, default 300) with DCMTK's storescu
(``TCP_NODELAY=1``: the sender's setting is what counts) to

1. DCMTK storescp writing to disk (the reference),
2. a pynetdicom SCP whose handler stores nothing, with pynetdicom's stock acceptor and with
   the node's (node/ingest/fastpath.py: the ceiling of the node),
3. the node with ``sync_writes = false`` (no fsync: what the durability costs),
4. the node (``python -m node.ingest.standalone``: the real listener with its durable spool,
   without the analysis),
5. Orthanc (the Debian package, ``SyncStorageArea: true``, its default: like the node it syncs
   each instance before Success), a production archive with the same durability for scale,

on one association, one after the other in each of ``--rounds`` rounds (a new study, new UIDs,
per round; the page cache written back before each receiver), so that every receiver sees
the same machine load; then to the node on 4 concurrent associations, then checks the node's
RSS growth (all its processes) over ``--rss-instances`` further instances. The node runs with
``listener_processes`` = ``--listener-processes`` (default: the CPU cores, at most 4). Every
receiver stores under ``--dir`` (default: ``benchmarks/out``; the cost of creating a file
there is printed, see :func:`creation_ms`). Prints the median
instances/s, the median per-round ratio to storescp and the bars of issue #3::

    .venv/bin/python benchmarks/ingest.py [--images 300] [--rounds 3] [--rss-instances 3000]
        [--listener-processes N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
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


def ct_series(n: int, size: int = 512) -> list[Dataset]:
    """``n`` CT Image Storage data sets of one new series (new UIDs at each call)."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 1500, (size, size), dtype=np.int16)
    out = []
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
        out.append(ds)
    return out


def write_study(directory: Path, n: int, size: int = 512) -> list[Path]:
    """``n`` CT Image Storage files of one new study (new UIDs at each call)."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.dcm"):
        old.unlink()
    paths = []
    for i, ds in enumerate(ct_series(n, size)):
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


def settle() -> None:
    """Write back every dirty page before the next receiver runs, so that none pays for the
    writes another left in the page cache (storescp and the node without fsync leave 158 MB
    each, which the kernel would otherwise write back during the next receiver's run)."""
    os.sync()
    time.sleep(0.2)


def creation_ms(directory: Path, files: int = 100) -> float:
    """Milliseconds to create one empty file in a new ``directory``: on an ext4 file system
    without a journal that has seen many deletions (a shared /tmp) it is 0.4-0.9 ms of kernel
    time instead of ~0.03 ms (the inode allocator reads inode tables to skip recently deleted
    inodes), which distorts every receiver's figure."""
    directory.mkdir(parents=True)
    start = time.perf_counter()
    for i in range(files):
        os.close(os.open(directory / f"{i}.probe", os.O_CREAT | os.O_WRONLY | os.O_EXCL))
    return (time.perf_counter() - start) / files * 1000


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
    """Resident memory of a process and its children (the node's listener processes)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if stat.parent.name != str(pid) and int(fields[1]) != pid:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, ValueError):
            continue
        total += next((int(line.split()[1]) / 1024 for line in status.splitlines()
                       if line.startswith("VmRSS:")), 0.0)
    if not total:
        raise RuntimeError(f"no process {pid}")
    return total


def start_storescp(stack: ExitStack, directory: Path) -> int:
    """Start DCMTK storescp (AE title STORESCP) writing to ``directory``; returns its port."""
    directory.mkdir()
    port = free_port()
    scp = subprocess.Popen([str(STORESCP), "-aet", "STORESCP", "-od", str(directory), str(port)],
                           env=ENV, stderr=subprocess.DEVNULL)
    stack.callback(_stop, scp)
    wait_port(port)
    return port


def start_floor(stack: ExitStack, fast: bool) -> int:
    """Start a pynetdicom SCP whose handler stores nothing; returns its port.

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
    stack.callback(ae.shutdown)
    return port


def start_node(stack: ExitStack, work: Path, sync: bool = True, processes: int = 1
               ) -> tuple[subprocess.Popen[bytes], int]:
    name = "node" if sync else "node-nosync"
    port = free_port()
    config = work / f"{name}.toml"
    config.write_text(f'port = {port}\nspool_dir = "{work / name}"\nstable_seconds = 3600\n'
                      f"max_associations = 8\nsync_writes = {str(sync).lower()}\n"
                      f"listener_processes = {processes}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.ingest.standalone", "--config", str(config),
         "--marker", str(work / f"{name}.marker")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=open(work / f"{name}.log", "wb"),  # noqa: SIM115
    )
    stack.callback(_stop, proc)
    assert proc.stdout is not None
    if not proc.stdout.readline().startswith(b"READY"):  # every listener process listens
        raise RuntimeError(f"the node did not start: see {work / name}.log")
    return proc, port


def start_orthanc(stack: ExitStack, work: Path) -> int:
    """Start Orthanc as the archive tests do (no routing); returns its DICOM port."""
    from node.archive.orthanc import OrthancServer

    server = OrthancServer(work / "orthanc", lua_scripts=[], stable_age=3600,
                           extra_config={"SyncStorageArea": True})
    server.start()
    stack.callback(server.stop)
    return server.dicom_port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


TARGETS = {  # name -> label
    "storescp": "DCMTK storescp (reference)   ",
    "stock": "pynetdicom no-op SCP, stock  ",
    "ceiling": "pynetdicom no-op SCP, node's ",
    "nosync": "node, sync_writes=false      ",
    "node": "node                         ",
    "orthanc": "Orthanc (SyncStorageArea=true)",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds over all receivers, interleaved; medians are reported")
    p.add_argument("--rss-instances", type=int, default=3000)
    p.add_argument("--listener-processes", type=int, default=min(4, os.cpu_count() or 1),
                   help="the node's listener_processes (default: CPU cores, at most 4)")
    p.add_argument("--dir", type=Path, default=ROOT / "benchmarks" / "out",
                   help="where every receiver stores (default: benchmarks/out); file creation "
                        "cost depends on the file system's state there (printed)")
    args = p.parse_args(argv)
    n = args.images
    args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ingest-bench-", dir=args.dir) as tmp, \
            ExitStack() as stack:
        work = Path(tmp)
        paths = write_study(work / "src", n)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"study: {len(paths)} images 512x512 int16, {mb:.0f} MB; {args.rounds} rounds; "
              f"node: listener_processes = {args.listener_processes}")
        print(f"file creation under {args.dir}: {creation_ms(work / 'probe'):.3f} ms per file "
              "(every receiver pays it once per instance)")
        scp_port = start_storescp(stack, work / "scp")
        ports = {"storescp": (scp_port, "STORESCP"),
                 "stock": (start_floor(stack, fast=False), "FLOOR"),
                 "ceiling": (start_floor(stack, fast=True), "FLOOR"),
                 "nosync": (start_node(stack, work, sync=False,
                                       processes=args.listener_processes)[1], "LIVERNODE")}
        node, node_port = start_node(stack, work, processes=args.listener_processes)
        ports["node"] = (node_port, "LIVERNODE")
        ports["orthanc"] = (start_orthanc(stack, work), "ORTHANC")
        seconds: dict[str, list[float]] = {name: [] for name in ports}
        # Nothing is deleted until the timed rounds are over: on a file system that scans
        # recently deleted inodes when it creates a file (ext4 without a journal, as here),
        # the benchmark's own deletions would slow file creation for whichever receiver's
        # directory shares their block group (measured: the node fell from ~250 to ~120
        # inst/s over 8 rounds that deleted the previous round's files).
        for r in range(args.rounds):
            if r:
                paths = write_study(work / f"src{r}", n)  # new UIDs: no duplicates
            for name, (port, called) in ports.items():
                settle()
                seconds[name].append(send(paths, port, called))
        paths = write_study(work / "src", n)
        t_node4 = send(paths, node_port, "LIVERNODE", associations=4)
        rss0 = rss_mb(node.pid)
        sent = 0
        while sent < args.rss_instances:
            paths = write_study(work / "src", min(n, args.rss_instances - sent))
            send(paths, node_port, "LIVERNODE", associations=4)
            sent += len(paths)
        rss1 = rss_mb(node.pid)
    rate = {name: n / statistics.median(t) for name, t in seconds.items()}
    # Per-round ratio to storescp (sent right before), then the median over rounds.
    ratio = {name: statistics.median(s / t for s, t in zip(seconds["storescp"], ts, strict=True))
             for name, ts in seconds.items()}
    for name, label in TARGETS.items():
        note = "" if name == "storescp" else f", {ratio[name]:.2f} x storescp"
        rounds = " ".join(f"{n / t:.0f}" for t in seconds[name])
        print(f"{label}: {rate[name]:7.1f} inst/s (median of {args.rounds}{note}; {rounds})")
    node4 = n / t_node4
    print(f"node, 4 associations (total)  : {node4:7.1f} inst/s")
    print(f"ratio node/storescp           : {ratio['node']:.2f}  (bar >= 0.5: "
          f"{'PASS' if ratio['node'] >= 0.5 else 'FAIL'})")
    print(f"4 assoc >= 1 assoc            : {'PASS' if node4 >= rate['node'] else 'FAIL'}")
    growth = rss1 - rss0
    print(f"RSS over {sent} instances     : {rss0:.0f} -> {rss1:.0f} MB, growth {growth:.1f} MB "
          f"(bar < 50: {'PASS' if growth < 50 else 'FAIL'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
