"""``liver-node demo``: the node's main job, end to end, on this machine.

Starts a real Orthanc (Debian package) and the node, writes a phantom baseline study and a
follow-up of the same patient after TACE, sends each to Orthanc with DCMTK ``storescu`` as a
scanner would, lets Orthanc route the stable study to the node, waits until the node's SEG and
SR are in the archive, and prints the per-lesion table and the response.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from node import MANUFACTURER, pipeline
from node.errors import NodeError

logger = logging.getLogger(__name__)
SCANNER_AET = "SCANNER"


def send_with_storescu(folder: Path, *, aet: str, host: str, port: int, calling_aet: str) -> None:
    """Send every file under ``folder`` with DCMTK's storescu (the scanner's role)."""
    storescu = "/usr/bin/storescu"
    if not os.path.exists(storescu):
        raise NodeError("DCMTK storescu not found: run `bash config/setup.sh` "
                        "(apt-get install dcmtk)")
    env = dict(os.environ, TCP_NODELAY="1")
    cmd = [storescu, "-aet", calling_aet, "-aec", aet, "+sd", "+r", "-nh", host, str(port),
           str(folder)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise NodeError(f"storescu failed ({proc.returncode}): {proc.stderr[-2000:]}")


def wait_for_outputs(dicomweb_url: str, study_uid: str, timeout: float = 300.0) -> list[dict]:
    """Poll QIDO-RS until the study holds the node's SEG and SR series."""
    from node.archive.dicomweb import DicomWebArchive

    archive = DicomWebArchive(dicomweb_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sr, seg = archive.find_node_outputs(study_uid, MANUFACTURER)
        if sr and seg:
            return archive.find_series(study_uid)
        time.sleep(1.0)
    raise NodeError(f"no SEG + SR from the node in study {study_uid} after {timeout:.0f} s")


def run_demo(workdir: Path, *, size: int = 512, seed: int = 7, keep: bool = False) -> int:
    """Run the demo in ``workdir`` (recreated); return a process exit code."""
    from node.archive.orthanc import OrthancServer, free_port
    from node.config import load_settings
    from node.ingest.server import NodeServer
    from node.phantom import generate_baseline, generate_follow_up, load_truth
    from node.service import make_study_handler

    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    print(f"[demo] writing phantom studies ({size}x{size}) to {workdir}")
    base_dir = generate_baseline(workdir / "phantom-baseline", seed, size=size, n_lesions=4,
                                 lesion_diameter_mm=(18.0, 60.0))
    fu_dir = generate_follow_up(base_dir, workdir / "phantom-follow-up", seed + 1, tace=True,
                                target_category="PR")

    node_port = free_port()
    outcomes: dict[str, pipeline.Outcome] = {}
    with OrthancServer(workdir / "orthanc", node_aet="LIVERNODE", node_port=node_port,
                       stable_age=2) as orthanc:
        settings = load_settings(None, {
            "port": node_port, "spool_dir": str(workdir / "spool"), "stable_seconds": 2,
            "archive.ae_title": orthanc.aet, "archive.host": "127.0.0.1",
            "archive.port": orthanc.dicom_port, "archive.dicomweb_url": orthanc.dicomweb_url,
        })
        def keep_outcome(outcome: pipeline.Outcome) -> None:
            outcomes[outcome.study.study_instance_uid] = outcome

        handler = make_study_handler(settings, on_outcome=keep_outcome)
        server = NodeServer(settings, handler)
        server.start()
        try:
            for label, folder in (("baseline", base_dir), ("follow-up", fu_dir)):
                truth = load_truth(folder)
                uid = truth["study_instance_uid"]
                print(f"[demo] storescu -> Orthanc: {label} study {uid}")
                t0 = time.monotonic()
                send_with_storescu(folder / "dicom", aet=orthanc.aet, host="127.0.0.1",
                                   port=orthanc.dicom_port, calling_aet=SCANNER_AET)
                wait_for_outputs(orthanc.dicomweb_url, uid)
                print(f"[demo] SEG + SR of the {label} are in Orthanc after "
                      f"{time.monotonic() - t0:.1f} s\n")
                print(pipeline.format_report(outcomes[uid]))
                print(_truth_line(truth) + "\n")
            print(f"[demo] Orthanc Explorer: {orthanc.http_url}/app/explorer.html")
            print(f"[demo] DICOMweb:         {orthanc.dicomweb_url}")
            print(f"[demo] node outputs:     {settings.spool_dir}/outputs")
            if keep:
                print("[demo] Orthanc and the node keep running: Ctrl-C to stop")
                threading.Event().wait()
        finally:
            server.stop()
    return 0


def _truth_line(truth: dict) -> str:
    vols = ", ".join(f"{les['truth_id']} {les['volume_ml']:.1f} ml ({les['status']})"
                     for les in truth["lesions"])
    line = f"Ground truth of the phantom: {vols}"
    if "category" in truth:
        change = truth["volume_change_fraction"] * 100
        line += f"; total change {change:+.1f}% -> {truth['category']}"
    return line
