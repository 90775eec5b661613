"""pynetdicom event handlers of the node's SCP: plain functions, wired in ``server.py``.

The store handler only stores and answers (PS3.4 B.2.3 statuses); analysis happens elsewhere,
so peers never hit their DIMSE timeout. Every failure is a named status and a log line; no
exception escapes into pynetdicom's reactor.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import cast

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from node.errors import IngestError
from node.ingest.spool import Spool, StoreOutcome

logger = logging.getLogger(__name__)


@dataclass
class AssociationRecord:
    """What happened on one association; logged as one line when the connection closes."""

    peer_ae: str = ""
    peer_host: str = ""
    peer_port: int = 0
    tcp_nodelay: bool = False  # read back from the accepted socket with getsockopt
    started: float = field(default_factory=time.monotonic)
    duration: float = 0.0
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    echoes: int = 0
    studies: set[str] = field(default_factory=set)


class AssociationLog:
    """Per-association counters, keyed by the pynetdicom Association; keeps the last 100."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[int, AssociationRecord] = {}
        self.closed: collections.deque[AssociationRecord] = collections.deque(maxlen=100)

    def open(self, event: Event) -> AssociationRecord:
        record = AssociationRecord()
        with self._lock:
            self._open[id(event.assoc)] = record
        return record

    def get(self, event: Event) -> AssociationRecord:
        with self._lock:
            record = self._open.get(id(event.assoc))
        return record if record is not None else self.open(event)

    def close(self, event: Event) -> AssociationRecord:
        with self._lock:
            record = self._open.pop(id(event.assoc), None) or AssociationRecord()
            record.duration = time.monotonic() - record.started
            self.closed.append(record)
        return record


def _address(event: Event) -> tuple[str, int]:
    """(host, port) of the peer of a connection event."""
    address = getattr(event, "address", None) or ("?", 0)
    return str(address[0]), int(address[1])


def handle_conn_open(event: Event, log: AssociationLog) -> None:
    """Set TCP_NODELAY on the accepted socket (pynetdicom never does) and start a record.

    Without it every small PDU waits for Nagle + delayed ACK (~40 ms per C-STORE response).
    """
    record = log.open(event)
    record.peer_host, record.peer_port = _address(event)
    sock: socket.socket | None = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is None:
        logger.error("connection from %s has no socket to configure", record.peer_host)
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    record.tcp_nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def handle_conn_close(event: Event, log: AssociationLog) -> None:
    """Log one structured line for the association."""
    r = log.close(event)
    r.peer_ae = r.peer_ae or str(event.assoc.requestor.ae_title or "")
    assoc = event.assoc
    state = "closed"
    if assoc.is_rejected:
        state = "rejected"
    elif assoc.is_aborted:
        state = "aborted"
    elif assoc.is_released:
        state = "released"
    logger.info(
        "association peer_ae=%s host=%s port=%d outcome=%s instances=%d duplicates=%d "
        "failed=%d echoes=%d studies=%d duration=%.3fs tcp_nodelay=%d",
        r.peer_ae, r.peer_host, r.peer_port, state, r.stored, r.duplicates, r.failed,
        r.echoes, len(r.studies), r.duration, r.tcp_nodelay,
    )


def handle_rejected(event: Event) -> None:
    """Log why an association was rejected (unknown called or calling AE title)."""
    requestor = event.assoc.requestor
    called = requestor.primitive.called_ae_title if requestor.primitive else "?"
    logger.warning(
        "association rejected: calling_ae=%s called_ae=%s (not accepted by this node)",
        requestor.ae_title, called,
    )


def handle_echo(event: Event, log: AssociationLog) -> int:
    """C-ECHO (PS3.7 9.1.5): always success."""
    log.get(event).echoes += 1
    return 0x0000  # Success


def _required_uids(ds: Dataset) -> tuple[str, str, str, str] | None:
    values = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = ds.get(keyword)
        if not value:
            return None
        values.append(str(value))
    return values[0], values[1], values[2], values[3]


def handle_store(event: Event, spool: Spool, log: AssociationLog) -> int:
    """C-STORE (PS3.4 B.2.3): write the instance durably, index it, then answer."""
    record = log.get(event)
    record.peer_ae = str(event.assoc.requestor.ae_title or "")
    status = _store(event, spool, record)
    if status != 0x0000:
        record.failed += 1
    return status


def _store(event: Event, spool: Spool, record: AssociationRecord) -> int:
    request = cast(C_STORE, event.request)
    try:
        ds = event.dataset
        uids = _required_uids(ds)
    except Exception:
        logger.exception("C-STORE from %s: the dataset cannot be decoded", record.peer_ae)
        return 0xC210  # Cannot understand: dataset could not be decoded
    if uids is None:
        logger.error(
            "C-STORE from %s: SOP instance %s lacks Study/Series/SOP Instance UID or SOP Class UID",
            record.peer_ae, request.AffectedSOPInstanceUID,
        )
        return 0xC000  # Cannot understand: required identifiers missing
    study, series, sop, sop_class = uids
    if sop_class != request.AffectedSOPClassUID or sop != request.AffectedSOPInstanceUID:
        logger.error(
            "C-STORE from %s: dataset SOP class/instance %s/%s differ from the request's %s/%s",
            record.peer_ae, sop_class, sop, request.AffectedSOPClassUID,
            request.AffectedSOPInstanceUID,
        )
        return 0xA900  # Error: Data Set does not match SOP Class
    try:
        outcome = spool.store(event.encoded_dataset(), study, series, sop, sop_class)
    except IngestError:
        logger.exception("C-STORE from %s: instance %s rejected", record.peer_ae, sop)
        return 0xC000  # Cannot understand: malformed UID
    except Exception:
        logger.exception("C-STORE from %s: instance %s could not be stored", record.peer_ae, sop)
        return 0xA700  # Out of Resources: disk or index write failed
    if outcome is StoreOutcome.DUPLICATE:
        record.duplicates += 1
    else:
        record.stored += 1
        record.studies.add(study)
    if outcome is StoreOutcome.REPLACED:
        logger.warning("instance %s of study %s received again with other content: replaced",
                       sop, study)
    return 0x0000  # Success
