"""``liver-node serve``: the listener wired to the pipeline.

The listener (ingest/) only stores and answers; when a study is complete its worker calls the
handler made here, which runs the pipeline and sends the SEG and SR back to the archive.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from node import pipeline
from node.config import Settings
from node.errors import StudyError

logger = logging.getLogger(__name__)


def make_study_handler(
    settings: Settings, on_outcome: Callable[[pipeline.Outcome], object] | None = None
) -> Callable[[str, Path], None]:
    """Return the callback the ingest worker runs for each complete study."""
    archive = settings.archive

    def handle_study(study_instance_uid: str, study_dir: Path) -> None:
        out_dir = Path(settings.spool_dir) / "outputs" / study_instance_uid
        send = []
        if archive.host and archive.port:
            send.append((archive.ae_title, archive.host, archive.port, archive.calling_aet))
        try:
            outcome = pipeline.run(study_dir, out_dir,
                                   dicomweb_url=archive.dicomweb_url or None, send=send)
        except StudyError as exc:
            # Not a node failure: the study holds nothing the node can measure.
            if settings.report_unanalysable:
                pipeline.report_not_analysable(study_dir, str(exc), out_dir, send)
            return
        logger.info("report for %s\n%s", study_instance_uid, pipeline.format_report(outcome))
        if on_outcome is not None:
            on_outcome(outcome)

    return handle_study


def serve_forever(settings: Settings) -> int:
    """Run the listener until SIGTERM / SIGINT."""
    from node.ingest.server import NodeServer

    logger.info("liver-node starting: %s", settings.describe())
    server = NodeServer(settings, make_study_handler(settings))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        stop.wait()
    finally:
        server.stop()
    logger.info("liver-node stopped")
    return 0
