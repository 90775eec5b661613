"""The storage SCP of the node, in this process and optionally in more (same port).

:class:`Listener` is one listening socket with its AE, handlers and per-association log,
storing into the shared spool. :class:`node.ingest.server.NodeServer` runs one in its own
process and, with ``listener_processes`` > 1, starts more with :func:`listener_process`: every
socket is bound with ``SO_REUSEPORT`` and the kernel spreads new connections over them, so
concurrent senders are served by several interpreters (one core each) instead of threads that
share one. The extra processes only store (the spool index is SQLite in WAL mode: many
processes, one writer at a time); completion, analysis and the metrics endpoint stay in the
first process, which adds up the counters the others report.
"""

from __future__ import annotations

import logging
import os
import queue
import ssl
import time
from multiprocessing.synchronize import Event as EventType
from typing import Any

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

from node.config import Settings
from node.errors import IngestError
from node.ingest.fastpath import start_server
from node.ingest.handlers import (
    AssociationLog,
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
from node.ingest.metrics import Metrics
from node.ingest.spool import Spool

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



class Listener:
    """One listening socket of the node's storage SCP, storing into ``spool``.

    Parameters
    ----------
    settings:
        AE title, address, limits, TLS.
    spool:
        Where instances go (shared by every listener of the node).
    metrics:
        The counters this listener updates.
    """

    def __init__(self, settings: Settings, spool: Spool, metrics: Metrics) -> None:
        self.settings = settings
        self.associations = AssociationLog()
        self.context = IngestContext(
            spool, self.associations, metrics,
            min_free_bytes=settings.min_free_bytes,
            max_instance_bytes=settings.max_instance_bytes,
            allowed_hosts=allowed_hosts(settings),
        )
        self.ae = build_ae(settings)
        self.server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        """The port actually listened on."""
        if self.server is None:
            raise IngestError("the listener is not running")
        return int(self.server.server_address[1])

    def start(self, reuse_port: bool = False) -> None:
        """Listen (``reuse_port``: other processes may listen on the same port).

        Raises
        ------
        IngestError
            The address cannot be bound or the TLS files cannot be loaded.
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
        address = (self.settings.host, self.settings.port)
        tls = server_tls_context(self.settings)
        try:
            self.server = start_server(self.ae, address, handlers, ssl_context=tls,
                                       sink_factory=incoming_sink(self.context),
                                       reuse_port=reuse_port)
        except OSError as exc:
            raise IngestError(f"cannot listen on {address[0]}:{address[1]}: {exc}") from exc

    def stop(self, grace: float = 5.0) -> bool:
        """Stop listening; open associations get ``grace`` seconds, then are aborted.

        Returns True if none was left running (none of their handlers may still write).
        """
        server, self.server = self.server, None
        clean = True
        if server is None:
            return clean
        server.shutdown()
        deadline = time.monotonic() + grace
        for assoc in list(server.active_associations):
            assoc.join(max(0.0, deadline - time.monotonic()))
            if assoc.is_alive():
                logger.warning("aborting association with %s at shutdown",
                               assoc.requestor.ae_title)
                assoc.abort()
                assoc.join(2.0)
                clean = clean and not assoc.is_alive()
        return clean


REPORT_SECONDS = 1.0
"""How often an extra listener process reports its counters to the first."""


def listener_process(settings: Settings, number: int, stop: EventType,
                     reports: queue.Queue[tuple[Any, ...]], log_level: int) -> None:
    """Entry point of an extra listener process (``multiprocessing``, spawn).

    Listens on ``settings.port`` beside the first process, reports ``("ready", number, pid)``
    (or ``("failed", number, reason)``), then ``("metrics", number, snapshot, associations)``
    every :data:`REPORT_SECONDS`, until ``stop`` is set or the parent process is gone (a kill
    of the node takes its listeners with it); then stops like the first process and reports
    ``("stopped", number, clean)``.
    """
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s "
                        "%(processName)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(max(log_level, logging.WARNING))
    parent = os.getppid()
    spool = Spool(settings.spool_dir, sync=settings.sync_writes)
    metrics = Metrics()
    listener = Listener(settings, spool, metrics)
    try:
        listener.start(reuse_port=True)
    except IngestError as exc:
        reports.put(("failed", number, str(exc)))
        spool.close()
        return
    reports.put(("ready", number, os.getpid()))
    last = time.monotonic()
    while not stop.wait(0.2) and os.getppid() == parent:
        if time.monotonic() - last >= REPORT_SECONDS:
            active = len(listener.ae.active_associations)
            reports.put(("metrics", number, metrics.snapshot(), active))
            last = time.monotonic()
    if os.getppid() != parent:
        logger.error("listener process %d: the node process is gone, stopping", number)
    clean = listener.stop()
    spool.close()
    reports.put(("metrics", number, metrics.snapshot(), 0))
    reports.put(("stopped", number, clean))

