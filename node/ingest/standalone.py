"""The listener alone, without the analysis: ``python -m node.ingest.standalone``.

For the kill -9 durability tests and the ingest benchmark: it runs :class:`NodeServer` as its
own process with a trivial study callback that appends ``start <uid>`` and, after an optional
delay, ``done <uid> <n files>`` to a marker file (each line fsync'ed), so a test can kill the
process at any moment, including in the middle of an "analysis", and see what resumed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from pathlib import Path

from node.config import load_settings
from node.ingest.completion import StudyCallback
from node.ingest.server import NodeServer

logger = logging.getLogger(__name__)


def _append(marker: Path, line: str) -> None:
    with open(marker, "a", encoding="ascii") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def marker_callback(marker: Path, delay: float) -> StudyCallback:
    """A study callback that records start and end of each call in ``marker``."""

    def on_study_complete(study_instance_uid: str, study_dir: Path) -> None:
        _append(marker, f"start {study_instance_uid}")
        time.sleep(delay)
        n = sum(1 for _ in study_dir.glob("*/*.dcm"))
        _append(marker, f"done {study_instance_uid} {n}")

    return on_study_complete


def main(argv: list[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT; prints ``READY <port>`` once listening."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="TOML settings file")
    p.add_argument("--marker", required=True, help="file the study callback appends to")
    p.add_argument("--delay", type=float, default=0.0, help="seconds the callback sleeps")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    settings = load_settings(Path(args.config))
    server = NodeServer(settings, marker_callback(Path(args.marker), args.delay))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    print(f"READY {server.port}", flush=True)
    try:
        stop.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
