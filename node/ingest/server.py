"""The node's DICOM listener: Verification and Storage SCP (PS3.4 Annex A and B).

Wires the listener(s) of ``listener.py`` to the spool, the completion monitor and the metrics
endpoint. Usage::

    server = NodeServer(settings, on_study_complete=pipeline.run)
    server.start()
    ...
    server.stop()
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import shutil
import socket
import threading
import time
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

from pynetdicom import AE

from node.config import Settings, stable_by_aet
from node.errors import IngestError
from node.ingest.completion import CompletionMonitor, StudyCallback
from node.ingest.handlers import AssociationRecord
from node.ingest.listener import Listener, listener_process
from node.ingest.metrics import Metrics, MetricsServer
from node.ingest.spool import Spool, StudyState

logger = logging.getLogger(__name__)

PROCESS_START_SECONDS = 60.0
"""How long the extra listener processes may take to start listening."""


class NodeServer:
    """Storage SCP + spool + study-complete detection.

    Parameters
    ----------
    settings:
        Listen address, AE titles, spool directory, ``stable_seconds``, ``workers``,
        ``listener_processes``.
    on_study_complete:
        Called on a worker thread as ``on_study_complete(study_instance_uid, study_dir)`` when a
        study is complete; ``study_dir`` is ``<spool>/studies/<StudyInstanceUID>`` holding one
        directory per series. Raising marks the study failed (logged); the listener carries on.
    """

    def __init__(self, settings: Settings, on_study_complete: StudyCallback) -> None:
        self.settings = settings
        self.spool = Spool(settings.spool_dir, sync=settings.sync_writes)
        self.metrics = Metrics()
        self._listener = Listener(settings, self.spool, self.metrics)
        self.associations = self._listener.associations
        self.context = self._listener.context
        self._monitor = CompletionMonitor(
            self.spool,
            on_study_complete,
            stable_seconds=settings.stable_seconds,
            workers=settings.workers,
            stable_by_aet=stable_by_aet(settings),
            metrics=self.metrics,
        )
        self._running = False
        self._http: MetricsServer | None = None
        self._processes: list[BaseProcess] = []
        self._channels: list[socket.socket] = []
        self._stop_processes: EventType | None = None
        self._reports: Any = None  # multiprocessing Queue of the extra processes' reports
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        self._remote_metrics: dict[int, dict[str, Any]] = {}
        self._remote_associations: dict[int, int] = {}
        self._remote_clean: dict[int, bool] = {}

    @property
    def port(self) -> int:
        """The port actually listened on."""
        return self._listener.port

    @property
    def ae(self) -> AE:
        """The pynetdicom AE of this process (``ae.active_associations`` lists its open
        associations; other listener processes have their own)."""
        return self._listener.ae

    @property
    def listener_pids(self) -> list[int]:
        """Process IDs of the extra listener processes (``listener_processes`` > 1)."""
        return [int(p.pid) for p in self._processes if p.pid is not None]

    @property
    def recent_associations(self) -> list[AssociationRecord]:
        """Records of the last (up to 100) closed associations of this process, oldest first."""
        return list(self.associations.closed)

    def start(self) -> None:
        """Start listening (in ``listener_processes`` processes) and the completion threads;
        returns once every listener listens.

        Raises
        ------
        IngestError
            The address cannot be bound, or an extra listener process did not start.
        """
        self.spool.recover()
        extra = self.settings.listener_processes - 1
        self._listener.start()
        if extra:
            try:
                self._start_processes(extra)
            except IngestError:
                self._stop_extra(grace=1.0)
                self._listener.stop(grace=1.0)
                raise
        self._running = True
        self._monitor.start()
        if self.settings.metrics_port:
            self._http = MetricsServer(
                self.settings.host, self.settings.metrics_port, self.render_metrics, self.health
            )
            self._http.start()
        logger.info("node listening: %s", self.settings.describe())

    def _start_processes(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop_processes = context.Event()
        self._reports = context.Queue()
        level = logging.getLogger().getEffectiveLevel()
        for number in range(1, count + 1):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            process = context.Process(
                target=listener_process, name=f"listener-{number}", daemon=True,
                args=(self.settings, number, theirs, self._stop_processes, self._reports, level))
            process.start()
            theirs.close()
            self._processes.append(process)
            self._channels.append(ours)
        deadline = time.monotonic() + PROCESS_START_SECONDS
        ready = 0
        while ready < count:
            try:
                report = self._reports.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise IngestError(f"only {ready} of {count} extra listener processes started "
                                  f"within {PROCESS_START_SECONDS:.0f} s") from None
            if report[0] == "failed":
                raise IngestError(f"listener process {report[1]} failed: {report[2]}")
            ready += report[0] == "ready"
        self._listener.hand_out(self._channels)
        self._reader = threading.Thread(target=self._read_reports, name="listener-reports",
                                        daemon=True)
        self._reader.start()

    def _read_reports(self) -> None:
        """Keep the latest counters of every extra process (until all have stopped)."""
        while len(self._remote_clean) < len(self._processes):
            try:
                report = self._reports.get(timeout=0.5)
            except queue.Empty:
                if not any(p.is_alive() for p in self._processes):
                    return
                continue
            with self._lock:
                if report[0] == "metrics":
                    self._remote_metrics[report[1]] = report[2]
                    self._remote_associations[report[1]] = report[3]
                elif report[0] == "stopped":
                    self._remote_clean[report[1]] = bool(report[2])

    def _stop_extra(self, grace: float) -> bool:
        """Stop the extra listener processes; True if all stopped cleanly."""
        if not self._processes or self._stop_processes is None:
            return True
        self._stop_processes.set()
        for channel in self._channels:
            channel.close()
        deadline = time.monotonic() + grace + 5.0
        clean = True
        for process in self._processes:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                logger.error("listener process %s did not stop: killing it", process.name)
                process.kill()
                process.join(5.0)
                clean = False
        if self._reader is not None:
            self._reader.join(5.0)
        with self._lock:
            clean = clean and all(self._remote_clean.get(n, False)
                                  for n in range(1, len(self._processes) + 1))
        return clean

    @property
    def metrics_port(self) -> int:
        """Port of the metrics endpoint (0 if it is off)."""
        return self._http.port if self._http is not None else 0

    def total_metrics(self) -> Metrics:
        """The counters of every listener process added up."""
        total = Metrics()
        total.add(self.metrics.snapshot())
        with self._lock:
            for snapshot in self._remote_metrics.values():
                total.add(snapshot)
        return total

    def render_metrics(self) -> str:
        """The Prometheus text of the counters and the spool and queue gauges."""
        by_state = {state: 0 for state in StudyState}
        for study in self.spool.studies():
            by_state[study.state] += 1
        gauges = {f'liver_node_studies{{state="{k.value}"}}': float(v) for k, v in by_state.items()}
        gauges["liver_node_queue_depth"] = float(self._monitor.queue_depth())
        with self._lock:
            remote = sum(self._remote_associations.values())
        gauges["liver_node_active_associations"] = float(len(self.ae.active_associations) + remote)
        gauges["liver_node_listener_processes"] = float(
            1 + sum(p.is_alive() for p in self._processes))
        gauges["liver_node_spool_free_bytes"] = float(shutil.disk_usage(self.spool.root).free)
        return self.total_metrics().render(gauges)

    def health(self) -> str:
        """Empty if healthy, else why not (listener down, index unreadable, disk full)."""
        if not self._running:
            return "listener not running"
        for process in self._processes:
            if not process.is_alive():
                return f"listener process {process.name} exited with code {process.exitcode}"
        try:
            self.spool.studies(StudyState.QUEUED)
        except Exception as exc:
            logger.exception("health: spool index unreadable")
            return f"spool index unreadable: {exc}"
        free = shutil.disk_usage(self.spool.root).free
        if free < self.settings.min_free_bytes:
            return f"spool disk nearly full: {free} bytes free"
        return ""

    def stop(self, grace: float = 5.0) -> None:
        """Stop listening (every process), then the completion threads; closes the spool.

        Open associations get ``grace`` seconds to finish, then are aborted (an instance not
        yet acknowledged is the peer's to resend). If none is left running the spool is closed
        as clean, so the next start skips its walk over every spool file.
        """
        self._running = False
        if self._stop_processes is not None:
            self._stop_processes.set()  # the others stop beside this one
        clean = self._listener.stop(grace)
        clean = self._stop_extra(grace) and clean
        if self._http is not None:
            self._http.stop()
            self._http = None
        self._monitor.stop()
        self.spool.close(clean=clean)
        logger.info("node stopped")

    def mark_complete(self, study_instance_uid: str) -> bool:
        """Process a study now instead of after ``stable_seconds`` of silence.

        Returns False if it is already queued or being processed. Raises IngestError for a
        study the spool does not know.
        """
        return self._monitor.mark_complete(study_instance_uid)

    def study_dir(self, study_instance_uid: str) -> Path:
        """Spool directory of a study."""
        return self.spool.study_dir(study_instance_uid)

    def __enter__(self) -> NodeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
