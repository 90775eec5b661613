"""Study-complete detection and the worker threads that hand complete studies on.

DICOM has no "end of study" message over C-STORE, so a study is complete once no instance of
it has arrived for ``stable_seconds`` (the same rule as Orthanc's StableAge). A monitor thread
moves such studies from ``pending`` to ``queued`` and puts them on a queue; worker threads call
``on_study_complete(study_instance_uid, study_dir)`` outside the network threads, so slow
analysis never delays a C-STORE response.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from node.errors import IngestError
from node.ingest.metrics import Metrics
from node.ingest.spool import Spool, StudyState

logger = logging.getLogger(__name__)

StudyCallback = Callable[[str, Path], None]

_STOP = ""  # queue sentinel; never a valid UID


class CompletionMonitor:
    """Detects complete studies and runs the callback on worker threads.

    Parameters
    ----------
    spool:
        The spool whose index holds the study states.
    on_study_complete:
        Called with (Study Instance UID, study directory) once per completion; an exception
        marks the study ``failed`` and is logged, the node carries on.
    stable_seconds:
        Silence after the last instance that makes a study complete.
    workers:
        Number of worker threads.
    stable_by_aet:
        Per calling AE overrides of ``stable_seconds`` (the AE that sent the last instance).
    metrics:
        Counts analyses done and failed.
    """

    def __init__(
        self,
        spool: Spool,
        on_study_complete: StudyCallback,
        *,
        stable_seconds: float,
        workers: int = 1,
        stable_by_aet: Mapping[str, float] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._spool = spool
        self._callback = on_study_complete
        self._stable = stable_seconds
        self._stable_by_aet = dict(stable_by_aet or {})
        self.metrics = metrics or Metrics()
        shortest = min([stable_seconds, *self._stable_by_aet.values()])
        self._poll = min(1.0, max(0.05, shortest / 4))
        self._queue: queue.Queue[str] = queue.Queue()
        self._inflight: set[str] = set()  # queued or processing: never queued twice
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._monitor, name="study-monitor", daemon=True)]
        self._threads += [
            threading.Thread(target=self._work, name=f"study-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        self._n_workers = workers

    def start(self) -> None:
        """Start the monitor and worker threads."""
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the threads; a callback that is running is waited for up to ``timeout``."""
        self._stop.set()
        for _ in range(self._n_workers):
            self._queue.put(_STOP)
        for t in self._threads:
            if t.is_alive():
                t.join(timeout)
                if t.is_alive():
                    logger.error("thread %s did not stop within %.0f s", t.name, timeout)

    def mark_complete(self, study_instance_uid: str) -> bool:
        """Queue a study now, without waiting for ``stable_seconds``.

        Returns
        -------
        bool
            False if the study is already queued or being processed (a running analysis is
            not interrupted; new instances make the study pending again afterwards).

        Raises
        ------
        IngestError
            The study is unknown to the spool.
        """
        record = self._spool.study(study_instance_uid)
        if record is None:
            raise IngestError(f"unknown study {study_instance_uid}")
        return self._enqueue(study_instance_uid, expect=None)

    def _enqueue(self, study_instance_uid: str, *, expect: StudyState | None) -> bool:
        with self._lock:
            if study_instance_uid in self._inflight:
                return False
            if not self._spool.set_state(study_instance_uid, StudyState.QUEUED, expect=expect):
                return False
            self._inflight.add(study_instance_uid)
        self._queue.put(study_instance_uid)
        return True

    def _monitor(self) -> None:
        while not self._stop.wait(self._poll):
            try:
                now = time.time()
                for study in self._spool.studies(StudyState.PENDING):
                    stable = self._stable_by_aet.get(study.calling_aet, self._stable)
                    if study.last_received <= now - stable:
                        self._enqueue(study.study_instance_uid, expect=StudyState.PENDING)
            except Exception:
                # Keep monitoring: a transient index error must not end study detection.
                logger.exception("study monitor: scanning the spool index failed")

    def queue_depth(self) -> int:
        """Studies queued or being processed."""
        with self._lock:
            return len(self._inflight)

    def _work(self) -> None:
        while True:
            study_uid = self._queue.get()
            if study_uid == _STOP:
                return
            try:
                self._process(study_uid)
            finally:
                with self._lock:
                    self._inflight.discard(study_uid)

    def _process(self, study_uid: str) -> None:
        if not self._spool.set_state(study_uid, StudyState.PROCESSING, expect=StudyState.QUEUED):
            # New instances arrived while it was queued: it is pending again and will return.
            logger.info("study %s: new instances while queued, waiting again", study_uid)
            return
        n = len(self._spool.instances(study_uid))
        record = self._spool.study(study_uid)
        previous = record.processed_count if record is not None else 0
        start = time.monotonic()
        state, error = StudyState.DONE, ""
        try:
            self._callback(study_uid, self._spool.study_dir(study_uid))
        except Exception as exc:
            logger.exception("study %s: processing failed", study_uid)
            state, error = StudyState.FAILED, f"{type(exc).__name__}: {exc}"
        # Compare-and-set: a study that grew during processing stays pending.
        self.metrics.incr("analyses_done" if state is StudyState.DONE else "analyses_failed")
        moved = self._spool.set_state(study_uid, state, expect=StudyState.PROCESSING, error=error)
        final = state.value if moved else "pending (new instances during processing)"
        logger.info(
            "study complete study=%s instances=%d previous_analyses=%d outcome=%s duration=%.2fs",
            study_uid, n, previous, final, time.monotonic() - start,
        )
