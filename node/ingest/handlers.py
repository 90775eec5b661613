"""pynetdicom event handlers of the node's SCP: plain functions, wired in ``server.py``.

The store handler only stores and answers (PS3.4 B.2.3 statuses); analysis happens elsewhere,
so peers never hit their DIMSE timeout. Every failure is a named status and a log line; no
exception escapes into pynetdicom's reactor.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from node.errors import IngestError
from node.ingest.metrics import Metrics
from node.ingest.part10 import file_meta_header
from node.ingest.spool import Incoming, Spool, StoreOutcome, write_durably
from node.ingest.validate import Attributes, check_dataset, read_header

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

    def open(self, event: Event, host: str = "", port: int = 0) -> tuple[AssociationRecord, int]:
        """Start the record of a new connection; returns it and how many connections from
        the same host are open now, this one included."""
        record = AssociationRecord(peer_host=host, peer_port=port)
        with self._lock:
            self._open[id(event.assoc)] = record
            same_host = sum(1 for r in self._open.values() if r.peer_host == host)
        return record, same_host

    def get(self, event: Event) -> AssociationRecord:
        with self._lock:
            record = self._open.get(id(event.assoc))
        return record if record is not None else self.open(event)[0]

    def close(self, event: Event) -> AssociationRecord:
        with self._lock:
            record = self._open.pop(id(event.assoc), None) or AssociationRecord()
            record.duration = time.monotonic() - record.started
            self.closed.append(record)
        return record


@dataclass
class IngestContext:
    """What the store handler needs: the spool, the logs and the limits."""

    spool: Spool
    log: AssociationLog
    metrics: Metrics
    min_free_bytes: int = 0
    max_instance_bytes: int = 2**31
    allowed_hosts: dict[str, set[str]] = field(default_factory=dict)  # AE -> hosts; empty: any


def _address(event: Event) -> tuple[str, int]:
    """(host, port) of the peer of a connection event."""
    address = getattr(event, "address", None) or ("?", 0)
    return str(address[0]), int(address[1])


def handle_conn_open(event: Event, log: AssociationLog, max_per_host: int = 0) -> None:
    """Set TCP_NODELAY on the accepted socket (pynetdicom never does) and start a record.

    Without it every small PDU waits for Nagle + delayed ACK (~40 ms per C-STORE response).
    A host that already holds ``max_per_host`` connections (0: no limit) has the new one shut
    at once, so one peer cannot take every association slot of the node.
    """
    record, same_host = log.open(event, *_address(event))
    sock: socket.socket | None = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is None:
        logger.error("connection from %s has no socket to configure", record.peer_host)
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    record.tcp_nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    if max_per_host and same_host > max_per_host:
        logger.warning("connection from %s refused: it already holds %d connections "
                       "(max_associations_per_host=%d)", record.peer_host, same_host - 1,
                       max_per_host)
        sock.shutdown(socket.SHUT_RDWR)  # the reader sees end-of-stream and closes normally


def handle_conn_close(event: Event, log: AssociationLog) -> None:
    """Log one structured line for the association and free its slot at once.

    A peer that hangs up before its A-ASSOCIATE-RQ was complete (half a PDU, or nothing)
    would otherwise keep its association thread, and so a slot, until the ACSE timeout:
    the thread waits on the connection's primitive queue, so it is woken with an empty
    primitive, the same as a timeout.
    """
    assoc = event.assoc
    if assoc.requestor.primitive is None and not assoc.is_established:
        assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]
    r = log.close(event)
    r.peer_ae = r.peer_ae or str(assoc.requestor.ae_title or "")
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


def handle_requested(event: Event, ctx: IngestContext) -> None:
    """Reject a calling AE that comes from a host it is not allowed from (PS3.8 7.1.1.3).

    ``ctx.allowed_hosts`` maps an AE title to the addresses it may call from; AE titles not in
    it are left to pynetdicom's ``require_calling_aet`` check.
    """
    primitive = event.assoc.requestor.primitive
    calling = str(primitive.calling_ae_title if primitive else "").strip()
    hosts = ctx.allowed_hosts.get(calling)
    host = str(event.assoc.requestor.address)
    if hosts is None or host in hosts:
        return
    logger.warning("association rejected: calling_ae=%s host=%s is not allowed from this host",
                   calling, host)
    # A-ASSOCIATE-RJ: rejected-permanent, service user, calling AE title not recognised
    event.assoc.acse.send_reject(0x01, 0x01, 0x03)
    event.assoc.kill()  # as pynetdicom's own rejections: flushes the A-ASSOCIATE-RJ, then stops
    ctx.metrics.incr("associations_rejected")


def handle_accepted(event: Event, ctx: IngestContext) -> None:
    """Count an accepted association."""
    ctx.metrics.incr("associations")


def handle_rejected(event: Event, ctx: IngestContext) -> None:
    """Log why an association was rejected (unknown called or calling AE title)."""
    ctx.metrics.incr("associations_rejected")
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


def _required_uids(ds: Dataset | Attributes) -> tuple[str, str, str, str] | None:
    values = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = ds.get(keyword)
        if not value:
            return None
        values.append(str(value))
    return values[0], values[1], values[2], values[3]


def incoming_sink(ctx: IngestContext) -> Callable[[Association, C_STORE, str], Incoming | None]:
    """The listener's sink factory (:func:`node.ingest.fastpath.start_server`): each C-STORE
    data set is written to the spool's ``incoming/`` as it arrives, behind the Part 10 header
    made from the request's SOP Class and Instance UIDs; :func:`handle_store` checks them
    against the data set's before it commits the file."""

    def make(assoc: Association, request: C_STORE, transfer_syntax: str) -> Incoming | None:
        sop_class, sop = request.AffectedSOPClassUID, request.AffectedSOPInstanceUID
        if not sop_class or not sop:
            return None
        who = str(assoc.requestor.ae_title or "").strip()
        header = file_meta_header(str(sop_class), str(sop), transfer_syntax, who)
        # Unhashed: the handler hashes the data set it holds while the network thread syncs.
        return ctx.spool.incoming(header, max_bytes=ctx.max_instance_bytes, hashed=False)

    return make


def handle_store(event: Event, ctx: IngestContext) -> int:
    """C-STORE (PS3.4 B.2.3): check, write the instance durably, index it, then answer."""
    start = time.perf_counter()
    record = ctx.log.get(event)
    record.peer_ae = str(event.assoc.requestor.ae_title or "").strip()
    incoming: Incoming | None = getattr(event.request, "_node_sink", None)
    try:
        status, size, duplicate = _store(event, ctx, record, incoming)
    except Exception:
        # Never let an exception reach pynetdicom's reactor: the association would abort.
        logger.exception("C-STORE from %s: unexpected failure", record.peer_ae)
        status, size, duplicate = 0xA700, 0, False  # Out of Resources: internal failure
    finally:
        if incoming is not None:
            incoming.discard()  # refused, or failed (a committed file has moved: no-op)
    if status != 0x0000:
        record.failed += 1
        ctx.metrics.refused_with(status)
    else:
        ctx.metrics.stored(size, time.perf_counter() - start, duplicate)
    return status


def quarantine(spool: Spool, data: bytes, reason: str) -> None:
    """Keep a refused instance's bytes and the reason under ``<spool>/quarantine/``."""
    name = hashlib.sha256(data).hexdigest()[:32]
    directory = spool.root / "quarantine"
    write_durably(directory / f"{name}.dcm", data, spool.root)
    write_durably(directory / f"{name}.txt", (reason + "\n").encode(), spool.root)


def _refuse(ctx: IngestContext, data: bytes | None, status: int, reason: str, who: str) -> int:
    logger.error("C-STORE from %s refused with 0x%04X: %s", who, status, reason)
    if data is not None:
        try:
            quarantine(ctx.spool, data, f"0x{status:04X} {who}: {reason}")
        except OSError:
            logger.exception("C-STORE from %s: could not quarantine the refused instance", who)
    return status


def _store(event: Event, ctx: IngestContext, record: AssociationRecord,
           incoming: Incoming | None) -> tuple[int, int, bool]:
    """(status, size, duplicate) of one C-STORE request; ``incoming``: its data set, already
    written to the spool's ``incoming/`` as it arrived (see :func:`incoming_sink`)."""
    request = cast(C_STORE, event.request)
    who = record.peer_ae
    free = shutil.disk_usage(ctx.spool.root).free
    if free < ctx.min_free_bytes:
        reason = f"{free} bytes free in the spool, below min_free_bytes={ctx.min_free_bytes}"
        return _refuse(ctx, None, 0xA700, reason, who), 0, False  # Out of Resources
    body = request.DataSet.getvalue() if request.DataSet is not None else b""
    if len(body) > ctx.max_instance_bytes:
        reason = f"{len(body)} bytes exceeds max_instance_bytes={ctx.max_instance_bytes}"
        return _refuse(ctx, None, 0xA700, reason, who), 0, False  # Out of Resources
    syntax = UID(event.context.transfer_syntax)
    try:
        ds = read_header(body, syntax) or event.dataset  # pydicom decodes what is not plain
        uids = _required_uids(ds)
    except Exception as exc:
        logger.exception("C-STORE from %s: the dataset cannot be decoded", who)
        # 0xC210 Cannot understand: dataset could not be decoded
        return _refuse(ctx, body or None, 0xC210, f"undecodable dataset: {exc}", who), 0, False
    if uids is None:
        reason = (f"instance {request.AffectedSOPInstanceUID} lacks Study/Series/SOP Instance"
                  " UID or SOP Class UID")
        return _refuse(ctx, body, 0xC000, reason, who), 0, False  # Cannot understand
    study, series, sop, sop_class = uids
    if sop_class != request.AffectedSOPClassUID or sop != request.AffectedSOPInstanceUID:
        reason = (f"dataset SOP class/instance {sop_class}/{sop} differ from the request's "
                  f"{request.AffectedSOPClassUID}/{request.AffectedSOPInstanceUID}")
        # 0xA900 Error: Data Set does not match SOP Class
        return _refuse(ctx, body, 0xA900, reason, who), 0, False
    # The sink's header was made from the request's UIDs, which now equal the data set's.
    header = incoming.header if incoming is not None else file_meta_header(
        sop_class, sop, syntax, who)
    data = (header, body)
    refusal = check_dataset(ds, sop_class, syntax)
    if refusal is not None:
        return _refuse(ctx, b"".join(data), refusal.status, refusal.reason, who), 0, False
    try:
        if incoming is not None:
            digest = hashlib.sha256(header)
            digest.update(body)  # releases the GIL: runs beside the sync on the network thread
            outcome = ctx.spool.commit(incoming, study, series, sop, sop_class, calling_aet=who,
                                       sha256=digest.hexdigest())
        else:
            outcome = ctx.spool.store(data, study, series, sop, sop_class, calling_aet=who)
    except IngestError as exc:
        # 0xC000 Cannot understand: malformed UID
        return _refuse(ctx, b"".join(data), 0xC000, str(exc), who), 0, False
    except Exception:
        logger.exception("C-STORE from %s: instance %s could not be stored", who, sop)
        return 0xA700, 0, False  # Out of Resources: disk or index write failed
    if outcome is StoreOutcome.DUPLICATE:
        record.duplicates += 1
    else:
        record.stored += 1
        record.studies.add(study)
    if outcome is StoreOutcome.REPLACED:
        logger.warning("instance %s of study %s received again with other content: replaced",
                       sop, study)
    return 0x0000, len(body), outcome is StoreOutcome.DUPLICATE  # Success
