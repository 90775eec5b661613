"""The node's DICOM listener: Verification and Storage SCP (PS3.4 Annex A and B).

Wires the handlers of ``handlers.py`` to a pynetdicom AE, the spool and the completion
monitor. Usage::

    server = NodeServer(settings, on_study_complete=pipeline.run)
    server.start()
    ...
    server.stop()
"""

from __future__ import annotations

import logging
import shutil
import ssl
import time
from pathlib import Path

from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedSRStorage,
    SegmentationStorage,
)
from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from node.config import Settings, stable_by_aet
from node.errors import IngestError
from node.ingest.completion import CompletionMonitor, StudyCallback
from node.ingest.fastpath import start_server
from node.ingest.handlers import (
    AssociationLog,
    AssociationRecord,
    IngestContext,
    handle_accepted,
    handle_conn_close,
    handle_conn_open,
    handle_echo,
    handle_rejected,
    handle_requested,
    handle_store,
    incoming_sink,
)
from node.ingest.metrics import Metrics, MetricsServer
from node.ingest.spool import Spool, StudyState

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class (PS3.4 A.4)
#: Uncompressed transfer syntaxes (PS3.5 A.1-A.3, A.5); Implicit VR Little Endian first,
#: the default every peer must support.
UNCOMPRESSED_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old scanners)
)
#: Compressed pixel transfer syntaxes, accepted for storage as they come (PS3.5 A.4).
COMPRESSED_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
IMAGE_STORAGE = (CTImageStorage, EnhancedCTImageStorage, SegmentationStorage)
SR_STORAGE = (ComprehensiveSRStorage, Comprehensive3DSRStorage, EnhancedSRStorage)


def build_ae(settings: Settings) -> AE:
    """The node's AE: supported contexts, AE title checks (PS3.8 7.1.1.5-6)."""
    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(VERIFICATION, list(UNCOMPRESSED_SYNTAXES[:2]))
    for sop_class in IMAGE_STORAGE:
        ae.add_supported_context(sop_class, list(UNCOMPRESSED_SYNTAXES + COMPRESSED_SYNTAXES))
    for sop_class in SR_STORAGE:
        ae.add_supported_context(sop_class, list(UNCOMPRESSED_SYNTAXES))
    ae.require_called_aet = True
    ae.require_calling_aet = sorted({a.partition("@")[0] for a in settings.allowed_calling_aets})
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_bytes
    ae.network_timeout = settings.network_timeout
    ae.acse_timeout = min(30.0, settings.network_timeout)
    return ae


def allowed_hosts(settings: Settings) -> dict[str, set[str]]:
    """AE title -> the hosts it may call from, for the ``AET@host`` allow-list entries."""
    hosts: dict[str, set[str]] = {}
    for entry in settings.allowed_calling_aets:
        aet, _, host = entry.partition("@")
        if host:
            hosts.setdefault(aet, set()).add(host)
    return hosts


def server_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the listener (PS3.15 B.1), or None for plain TCP.

    With ``tls_ca`` set, peers must present a certificate signed by that CA.
    """
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_ca:
            context.load_verify_locations(settings.tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise IngestError(f"cannot load the TLS certificate, key or CA: {exc}") from exc
    return context


class NodeServer:
    """Storage SCP + spool + study-complete detection.

    Parameters
    ----------
    settings:
        Listen address, AE titles, spool directory, ``stable_seconds``, ``workers``.
    on_study_complete:
        Called on a worker thread as ``on_study_complete(study_instance_uid, study_dir)`` when a
        study is complete; ``study_dir`` is ``<spool>/studies/<StudyInstanceUID>`` holding one
        directory per series. Raising marks the study failed (logged); the listener carries on.
    """

    def __init__(self, settings: Settings, on_study_complete: StudyCallback) -> None:
        self.settings = settings
        self.spool = Spool(settings.spool_dir, sync=settings.sync_writes)
        self.associations = AssociationLog()
        self.metrics = Metrics()
        self.context = IngestContext(
            self.spool, self.associations, self.metrics,
            min_free_bytes=settings.min_free_bytes,
            max_instance_bytes=settings.max_instance_bytes,
            allowed_hosts=allowed_hosts(settings),
        )
        self._monitor = CompletionMonitor(
            self.spool,
            on_study_complete,
            stable_seconds=settings.stable_seconds,
            workers=settings.workers,
            stable_by_aet=stable_by_aet(settings),
            metrics=self.metrics,
        )
        self._ae = build_ae(settings)
        self._server: ThreadedAssociationServer | None = None
        self._http: MetricsServer | None = None

    @property
    def port(self) -> int:
        """The port actually listened on."""
        if self._server is None:
            raise IngestError("the node server is not running")
        return int(self._server.server_address[1])

    @property
    def ae(self) -> AE:
        """The pynetdicom AE (``ae.active_associations`` lists the open associations)."""
        return self._ae

    @property
    def recent_associations(self) -> list[AssociationRecord]:
        """Records of the last (up to 100) closed associations, oldest first."""
        return list(self.associations.closed)

    def start(self) -> None:
        """Start listening and the completion threads; returns at once.

        Raises
        ------
        IngestError
            The address cannot be bound.
        """
        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, handle_conn_open,
             [self.associations, self.settings.max_associations_per_host]),
            (evt.EVT_CONN_CLOSE, handle_conn_close, [self.associations]),
            (evt.EVT_REQUESTED, handle_requested, [self.context]),
            (evt.EVT_ACCEPTED, handle_accepted, [self.context]),
            (evt.EVT_REJECTED, handle_rejected, [self.context]),
            (evt.EVT_C_ECHO, handle_echo, [self.associations]),
            (evt.EVT_C_STORE, handle_store, [self.context]),
        ]
        self.spool.recover()
        address = (self.settings.host, self.settings.port)
        tls = server_tls_context(self.settings)
        try:
            self._server = start_server(self._ae, address, handlers, ssl_context=tls,
                                        sink_factory=incoming_sink(self.context))
        except OSError as exc:
            raise IngestError(f"cannot listen on {address[0]}:{address[1]}: {exc}") from exc
        self._monitor.start()
        if self.settings.metrics_port:
            self._http = MetricsServer(
                self.settings.host, self.settings.metrics_port, self.render_metrics, self.health
            )
            self._http.start()
        logger.info("node listening: %s", self.settings.describe())

    @property
    def metrics_port(self) -> int:
        """Port of the metrics endpoint (0 if it is off)."""
        return self._http.port if self._http is not None else 0

    def render_metrics(self) -> str:
        """The Prometheus text of the counters and the spool and queue gauges."""
        by_state = {state: 0 for state in StudyState}
        for study in self.spool.studies():
            by_state[study.state] += 1
        gauges = {f'liver_node_studies{{state="{k.value}"}}': float(v) for k, v in by_state.items()}
        gauges["liver_node_queue_depth"] = float(self._monitor.queue_depth())
        gauges["liver_node_active_associations"] = float(len(self._ae.active_associations))
        gauges["liver_node_spool_free_bytes"] = float(shutil.disk_usage(self.spool.root).free)
        return self.metrics.render(gauges)

    def health(self) -> str:
        """Empty if healthy, else why not (listener down, index unreadable, disk full)."""
        if self._server is None:
            return "listener not running"
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
        """Stop listening, then the completion threads; closes the spool index.

        Open associations get ``grace`` seconds to finish, then are aborted (an instance not
        yet acknowledged is the peer's to resend). If none is left running the spool is closed
        as clean, so the next start skips its walk over every spool file.
        """
        server, self._server = self._server, None
        clean = True
        if server is not None:
            server.shutdown()
            open_assocs = list(server.active_associations)
            deadline = time.monotonic() + grace
            for assoc in open_assocs:
                assoc.join(max(0.0, deadline - time.monotonic()))
                if assoc.is_alive():
                    logger.warning("aborting association with %s at shutdown",
                                   assoc.requestor.ae_title)
                    assoc.abort()
                    assoc.join(2.0)
                    clean = clean and not assoc.is_alive()  # its handler may still write
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

