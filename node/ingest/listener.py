"""The storage SCP of the node, in this process and optionally in more.

:class:`Listener` is one storage SCP (AE, handlers, per-association log) storing into the
shared spool. :class:`node.ingest.server.NodeServer` runs one in its own process, listening on
the node's port, and with ``listener_processes`` > 1 starts more with :func:`listener_process`.
The first process accepts every connection and hands them out in turn, itself included
(:class:`DispatchServer`: the socket goes over a Unix socket pair, ``SCM_RIGHTS``), so
concurrent senders are served by several interpreters (one core each) instead of threads that
share one, and evenly (the kernel's ``SO_REUSEPORT`` spreading is random: 4 connections over
2 processes all land on one 1 time in 8). Only the first process listens on the network. The
extra processes only store (the spool index is SQLite in WAL mode: many processes, one writer
at a time); completion, analysis and the metrics endpoint stay in the first process, which
adds up the counters the others report.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import ssl
import threading
import time
from multiprocessing.synchronize import Event as EventType
from typing import Any, cast

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
        self._accepting = False

    @property
    def port(self) -> int:
        """The port actually listened on."""
        if self.server is None:
            raise IngestError("the listener is not running")
        return int(self.server.server_address[1])

    def start(self, accept: bool = True) -> None:
        """Listen on the node's address, or (``accept=False``, an extra listener process)
        only serve the connections handed over with :meth:`serve_handed`.

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
        address = (self.settings.host, self.settings.port) if accept else ("127.0.0.1", 0)
        tls = server_tls_context(self.settings)
        try:
            self.server = start_server(self.ae, address, handlers, ssl_context=tls,
                                       sink_factory=incoming_sink(self.context),
                                       server_class=DispatchServer, serve=accept)
        except OSError as exc:
            raise IngestError(f"cannot listen on {address[0]}:{address[1]}: {exc}") from exc
        self._accepting = accept

    def hand_out(self, channels: list[socket.socket]) -> None:
        """From now on, hand accepted connections in turn to the processes at the other end
        of ``channels`` (this one included)."""
        if self.server is not None:
            cast(DispatchServer, self.server).channels = channels

    def serve_handed(self, channel: socket.socket) -> None:
        """Serve the connections that arrive over ``channel`` until it is closed."""
        server = cast(DispatchServer, self.server)
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(channel, 1024, 4)
            except OSError:
                return
            if not message and not fds:
                return  # the first process closed its end
            for fd in fds:
                connection = socket.socket(fileno=fd)
                try:
                    address = tuple(json.loads(message))
                    server.serve_connection(connection, cast(tuple[str, int], address))
                except Exception:  # one bad hand-over must not stop the others
                    logger.exception("cannot serve a handed-over connection")
                    connection.close()

    def stop(self, grace: float = 5.0) -> bool:
        """Stop listening; open associations get ``grace`` seconds, then are aborted.

        Returns True if none was left running (none of their handlers may still write).
        """
        server, self.server = self.server, None
        clean = True
        if server is None:
            return clean
        if self._accepting:
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


class DispatchServer(ThreadedAssociationServer):
    """The node's server: serves a connection itself or hands it to the next extra listener
    process in turn (:attr:`channels`: Unix sockets to them; empty: serve everything).

    TLS is set up by whichever process serves the connection (pynetdicom does it in
    ``get_request``, which would leave nothing to hand over)."""

    channels: list[socket.socket] = []
    _turn = 0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        connection, address = cast(socket.socket, self.socket).accept()
        return connection, address

    def process_request(self, request: Any, client_address: Any) -> None:
        channels = self.channels
        turn, self._turn = self._turn % (len(channels) + 1), self._turn + 1
        if turn:
            message = json.dumps(list(client_address)).encode()
            try:
                socket.send_fds(channels[turn - 1], [message], [request.fileno()])
            except OSError:
                logger.exception("cannot hand a connection to listener process %d: serving "
                                 "it here", turn)
            else:
                request.close()  # this process's copy; the other one serves it
                return
        self.serve_connection(request, client_address)

    def serve_connection(self, connection: socket.socket, address: tuple[str, int]) -> None:
        """Serve ``connection`` on a new association thread (after the TLS handshake)."""
        if self.ssl_context is not None:
            try:
                connection = self.ssl_context.wrap_socket(connection, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                logger.warning("TLS handshake with %s failed: %s", address[0], exc)
                connection.close()
                return
        super().process_request(connection, address)


REPORT_SECONDS = 1.0
"""How often an extra listener process reports its counters to the first."""


def listener_process(settings: Settings, number: int, channel: socket.socket, stop: EventType,
                     reports: queue.Queue[tuple[Any, ...]], log_level: int) -> None:
    """Entry point of an extra listener process (``multiprocessing``, spawn).

    Serves the connections the first process hands over ``channel``; reports
    ``("ready", number, pid)`` (or ``("failed", number, reason)``), then
    ``("metrics", number, snapshot, associations)`` every :data:`REPORT_SECONDS`, until
    ``stop`` is set, the process gets SIGINT or SIGTERM, or the parent process is gone (a kill
    of the node takes its listeners with it); then stops like the first process and reports
    ``("stopped", number, clean)``.
    """
    # Ctrl-C reaches the whole process group and systemd signals every process of the
    # service: stop as gracefully as when the first process asks.
    signalled = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: signalled.set())
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s "
                        "%(processName)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(max(log_level, logging.WARNING))
    parent = os.getppid()
    spool = Spool(settings.spool_dir, sync=settings.sync_writes)
    metrics = Metrics()
    listener = Listener(settings, spool, metrics)
    try:
        listener.start(accept=False)
    except IngestError as exc:
        reports.put(("failed", number, str(exc)))
        spool.close()
        return
    receiver = threading.Thread(target=listener.serve_handed, args=(channel,),
                                name="handed-connections", daemon=True)
    receiver.start()
    reports.put(("ready", number, os.getpid()))
    last = time.monotonic()
    while not stop.wait(0.2) and not signalled.is_set() and os.getppid() == parent:
        if time.monotonic() - last >= REPORT_SECONDS:
            active = len(listener.ae.active_associations)
            reports.put(("metrics", number, metrics.snapshot(), active))
            last = time.monotonic()
    if os.getppid() != parent:
        logger.error("listener process %d: the node process is gone, stopping", number)
    try:
        channel.shutdown(socket.SHUT_RDWR)  # wakes the receiver: no more hand-overs
    except OSError:
        pass
    receiver.join(5.0)
    channel.close()
    clean = listener.stop()
    spool.close()
    reports.put(("metrics", number, metrics.snapshot(), 0))
    reports.put(("stopped", number, clean))

