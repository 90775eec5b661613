"""pynetdicom's acceptor with its per-instance costs removed.

Measured with py-spy, per-thread CPU time and paired A/B runs (pynetdicom 3.0.4, 300 CT
instances of 0.5 MB from DCMTK storescu), these places cost more than storing the instance:

- ``AssociationSocket.recv`` reads a PDU in 4 KiB ``recv`` calls: 128 system calls and
  ``bytearray.extend`` rounds per instance (~1 ms). :class:`NodeAssociationSocket` reads into
  one preallocated buffer, so a PDU takes as many calls as the kernel needs (a few).
- ``DIMSEServiceProvider.send_msg`` builds every C-STORE response as a pydicom dataset and
  encodes it twice (once for the group length): ~1 ms per instance, as much as the rest of the
  handler. :func:`encode_store_response` writes the same bytes directly (PS3.7 E.1, 9.3.1.2).
- Every received C-STORE request goes through pydicom twice (the command set decoded as a
  dataset, then copied attribute by attribute into the primitive) and each data fragment is
  copied twice: ~0.6 ms per instance. :func:`parse_store_request` reads the few command
  elements directly and the fragments are joined once.
- pynetdicom's standard debug handlers format every received PDU and DIMSE message even when
  nothing is logged at DEBUG; the node's server and associations unbind them unless the
  ``pynetdicom`` logger is at DEBUG.
- ``Association._run_reactor`` sleeps 1 ms before each look at the DIMSE message queue, so a
  complete C-STORE request waits 0.5 ms on average (up to 1 ms) before the handler runs, and
  storescu waits for the response before it sends the next instance.
  :class:`NodeAssociation` blocks on the queue instead: a request is served when it is complete.
- The network (DUL) thread sleeps between looks at the socket and at the queue of PDUs to send
  (1 ms in pynetdicom), so the C-STORE response and the next request each wait for the end of
  a sleep. :class:`node.ingest.dul.NodeDUL` waits in ``select`` on the socket and on a wake-up
  pipe written when a PDU is queued: it acts as soon as either has something.
- Each P-DATA-TF PDU is copied three times and passed through the event queue and the state
  machine (~0.1 ms per PDU, 6 PDUs per instance); ``NodeDUL`` hands one received in Sta6 to
  the DIMSE provider directly, its fragments as views of the received buffer.
- ``StorageServiceClass.SCP`` builds and validates a response primitive around the handler
  (~0.3 ms); :meth:`NodeAssociation._serve_store` sends the handler's status in a response
  encoded by :func:`store_response` (a status data set or anything unusual: pynetdicom's way).

- pynetdicom hands a C-STORE data set over when it is complete, so its whole write, hash
  and sync come after the last byte arrived, one after the other, while storescu waits. With
  a ``sink_factory`` (:func:`start_server`) each fragment goes to a :class:`StoreSink` as it
  arrives, on the network thread (writing it while the peer sends the next), and after the
  last one that thread syncs the sink while the handler thread checks the data set; the
  request carries its sink as ``request._node_sink``.

Everything else (state machine, events, checks for release / abort / network timeout) is
pynetdicom's; the two reactor loops and the PDU reader are copies of 3.0.4's with only the
waits and the P-DATA-TF path changed, which is why ``pyproject.toml`` pins that version (a
test checks the pin).
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any, Protocol, cast

import pynetdicom
from pydicom import config
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from node.ingest.dul import NodeAssociationSocket, NodeDUL, pdata_tf
from node.ingest.part10 import is_valid_uid, padded

logger = logging.getLogger(__name__)

PYNETDICOM_VERSION = "3.0.4"
"""The pynetdicom release whose acceptor reactor :class:`NodeAssociation` copies."""

REACTOR_WAIT = 0.1
"""Seconds the reactor waits for a DIMSE message before it checks the network timeout and
whether it was killed (pynetdicom sleeps 1 ms unconditionally); a release request, an abort,
a closed connection or the end of the network thread wake it at once
(:meth:`node.ingest.dul.NodeDUL._wake_reactor`)."""

class StoreSink(Protocol):
    """Where the fragments of one C-STORE data set go as they arrive (network thread)."""

    def write(self, data: memoryview) -> None:
        """Append a fragment; must not raise (keep errors for whoever uses the sink)."""

    def finish(self) -> None:
        """All fragments were written (make them durable); must not raise."""

    def discard(self) -> None:
        """The request will not be served (abort, lost connection): drop what was written."""


SinkFactory = Callable[[Association, C_STORE, str], "StoreSink | None"]
"""Makes the sink of a C-STORE request: (association, request, transfer syntax UID)."""


def _element(tag: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian command element (group 0000, PS3.7 E.1)."""
    return struct.pack("<HHI", 0x0000, tag, len(value)) + value


def store_response(message_id: int, status: int, sop_class: str | None,
                   sop_instance: str | None) -> bytes:
    """The command set of a C-STORE-RSP without Error Comment or Offending Element
    (PS3.7 9.3.1.2); the UIDs are left out when empty."""
    elements = b"".join((
        _element(0x0002, padded(sop_class, b"\x00")) if sop_class else b"",
        _element(0x0100, struct.pack("<H", 0x8001)),  # Command Field: C-STORE-RSP
        _element(0x0120, struct.pack("<H", message_id)),
        _element(0x0800, struct.pack("<H", 0x0101)),  # Command Data Set Type: no data set
        _element(0x0900, struct.pack("<H", status)),
        _element(0x1000, padded(sop_instance, b"\x00")) if sop_instance else b"",
    ))
    return _element(0x0000, struct.pack("<I", len(elements))) + elements


def encode_store_response(rsp: C_STORE) -> bytes | None:
    """The command set of a C-STORE-RSP primitive (:func:`store_response`), or None if ``rsp``
    carries an Error Comment or Offending Element (left to pynetdicom's general encoder)."""
    if (rsp.MessageIDBeingRespondedTo is None or rsp.ErrorComment is not None
            or rsp.OffendingElement is not None or not isinstance(rsp.Status, int)):
        return None
    return store_response(
        rsp.MessageIDBeingRespondedTo, rsp.Status,
        str(rsp.AffectedSOPClassUID) if rsp.AffectedSOPClassUID else None,
        str(rsp.AffectedSOPInstanceUID) if rsp.AffectedSOPInstanceUID else None)


#: The command elements a C-STORE-RQ may hold (PS3.7 9.3.1.1); any other -> pynetdicom.
_STORE_RQ_ELEMENTS = {0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031}


def _text(value: bytes) -> str:
    return value.decode("ascii").strip(" \x00")


def parse_store_request(command: bytes) -> C_STORE | None:
    """The C-STORE primitive of a C-STORE-RQ command set (Implicit VR Little Endian), or None
    if it is another command, has no data set or holds anything unexpected (then pynetdicom's
    general decoder handles it, and refuses it if it is malformed)."""
    fields: dict[int, bytes] = {}
    offset = 0
    try:
        while offset < len(command):
            group, element, length = struct.unpack_from("<HHI", command, offset)
            offset += 8
            if group != 0x0000 or element not in _STORE_RQ_ELEMENTS or element in fields:
                return None
            fields[element] = command[offset:offset + length]
            offset += length
        if (offset != len(command) or fields.get(0x0100) != b"\x01\x00"  # C-STORE-RQ
                or fields.get(0x0800, b"\x01\x01") == b"\x01\x01"  # no data set
                or not {0x0002, 0x0110, 0x1000} <= fields.keys()):
            return None
        sop_class, sop_instance = _text(fields[0x0002]), _text(fields[0x1000])
        if not (is_valid_uid(sop_class) and is_valid_uid(sop_instance)):
            return None  # pynetdicom decides what an invalid or odd UID means, as before
        rq = C_STORE()
        rq.MessageID = struct.unpack("<H", fields[0x0110])[0]
        # Set past the properties: they run three regular expressions per UID (~0.1 ms per
        # request), all of which a UID passing is_valid_uid passes (PS3.5 9.1).
        rq._affected_sop_class_uid = UID(sop_class, validation_mode=config.IGNORE)
        rq._affected_sop_instance_uid = UID(sop_instance, validation_mode=config.IGNORE)
        if 0x0700 in fields:
            rq.Priority = struct.unpack("<H", fields[0x0700])[0]
        if 0x1030 in fields:
            rq.MoveOriginatorApplicationEntityTitle = _text(fields[0x1030])
        if 0x1031 in fields:
            rq.MoveOriginatorMessageID = struct.unpack("<H", fields[0x1031])[0]
    except (struct.error, ValueError, TypeError, UnicodeDecodeError):
        return None
    return rq


class NodeDIMSEServiceProvider(DIMSEServiceProvider):
    """Receives C-STORE requests with :func:`parse_store_request` and sends their responses
    encoded by :func:`encode_store_response`; every other message goes through pynetdicom."""

    _store: C_STORE | None = None
    _store_context: int = 0
    _store_parts: list[memoryview]
    _store_sink: StoreSink | None = None
    sink_factory: SinkFactory | None = None

    def receive_primitive(self, primitive: P_DATA) -> None:
        pdvs = primitive.presentation_data_value_list
        first = 0
        if self._store is None:
            if not self._start_store(pdvs):
                super().receive_primitive(primitive)
                return
            first = 1  # the command set's PDV
        for context_id, data in pdvs[first:]:
            if context_id != self._store_context or data[0] & 1:
                logger.error("C-STORE data fragment with a command or another context")
                self.dul.event_queue.put("Evt19")  # abort, as pynetdicom does
                self.drop_partial()
                return
            fragment = memoryview(data)[1:]
            self._store_parts.append(fragment)
            sink = self._store_sink
            if sink is not None:
                sink.write(fragment)
            if data[0] & 2:  # the last fragment of the data set
                rq, self._store = cast(C_STORE, self._store), None
                rq.DataSet = BytesIO(b"".join(self._store_parts))
                rq._context_id = context_id
                rq._node_sink = sink  # type: ignore[attr-defined]
                self._store_parts, self._store_sink = [], None
                self.msg_queue.put((context_id, rq))
                if sink is not None:
                    sink.finish()  # while the handler checks the data set
                return

    def drop_partial(self) -> None:
        """Forget a C-STORE request whose data set did not arrive in full."""
        sink, self._store, self._store_sink, self._store_parts = self._store_sink, None, None, []
        if sink is not None:
            sink.discard()

    def drop_unserved(self) -> None:
        """Discard the sinks of complete requests the association will never serve."""
        while True:
            try:
                _, msg = self.msg_queue.get(block=False)
            except queue.Empty:
                return
            sink = getattr(msg, "_node_sink", None)
            if sink is not None:
                sink.discard()

    def _start_store(self, pdvs: list[tuple[int, bytes]]) -> bool:
        """Begin a fast C-STORE-RQ if the first PDV is a whole C-STORE-RQ command set."""
        if (self.message is not None or not pdvs or pdvs[0][1][:1] != b"\x03"
                or self.assoc.get_handlers(evt.EVT_DIMSE_RECV)):
            return False
        rq = parse_store_request(pdvs[0][1][1:])
        if rq is None:
            return False
        self._store, self._store_context, self._store_parts = rq, pdvs[0][0], []
        self._store_sink = self._make_sink(rq, pdvs[0][0])
        return True

    def _make_sink(self, rq: C_STORE, context_id: int) -> StoreSink | None:
        context = self.assoc._accepted_cx.get(context_id)
        if self.sink_factory is None or context is None:
            return None
        try:
            return self.sink_factory(self.assoc, rq, str(context.transfer_syntax[0]))
        except Exception:  # the handler then stores the data set itself
            logger.exception("C-STORE %s: no sink for its data set", rq.AffectedSOPInstanceUID)
            return None

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = (encode_store_response(primitive) if isinstance(primitive, C_STORE)
                   and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT) else None)
        if command is None or not self.send_command(command, context_id):
            super().send_msg(primitive, context_id)

    def send_command(self, command: bytes, context_id: int) -> bool:
        """Send an encoded command set without data set in one P-DATA-TF (on the calling
        thread if it can, see :meth:`NodeDUL.send_now`); False if it exceeds the peer's
        maximum PDU length (nothing sent)."""
        if 0 < self.maximum_pdu_size < len(command) + 6:
            return False
        # Message control header 0x03: command fragment, the last one (PS3.8 E.2).
        pdv = b"\x03" + command
        dul = self.dul
        if isinstance(dul, NodeDUL) and dul.send_now(pdata_tf(context_id, pdv)):
            return True
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, pdv))
        dul.send_pdu(pdata)
        return True


class NodeAssociation(Association):
    """An acceptor :class:`Association` that serves a DIMSE request as soon as it is complete."""

    def _next_message(self) -> tuple[int | None, Any]:
        try:
            return cast(tuple[int | None, Any], self.dimse.msg_queue.get(timeout=REACTOR_WAIT))
        except queue.Empty:
            return None, None

    def _serve_request(self, msg: Any, context_id: int) -> None:
        """A C-STORE the node's receiver decoded is served by :meth:`_serve_store`; every
        other request by pynetdicom."""
        if (isinstance(msg, C_STORE) and hasattr(msg, "_node_sink") and not self._sent_release
                and context_id in self._accepted_cx and msg.is_valid_request
                and msg.AffectedSOPClassUID not in self.acceptor.accepted_common_extended
                and issubclass(uid_to_service_class(str(msg.AffectedSOPClassUID)),
                               StorageServiceClass)):
            try:
                self._serve_store(msg, context_id)
            except Exception as exc:  # as upstream: log, abort
                logger.exception(exc)
                self.abort()
            return
        super()._serve_request(msg, context_id)

    def _serve_store(self, rq: C_STORE, context_id: int) -> None:
        """pynetdicom's Storage SCP (``StorageServiceClass.SCP``) for a C-STORE request:
        the bound EVT_C_STORE handler's status goes back in a response encoded directly,
        without building and validating a response primitive (~0.3 ms per instance)."""
        context = self._accepted_cx[context_id]
        dimse = cast(NodeDIMSEServiceProvider, self.dimse)
        dimse.cancel_req = {}
        self._is_paused = True  # the handler may call send_*(), as upstream allows
        try:
            try:
                status = evt.trigger(self, evt.EVT_C_STORE,
                                     {"request": rq, "context": context.as_tuple})
            except Exception:
                logger.exception("Exception in handler bound to 'evt.EVT_C_STORE'")
                status = 0xC211  # as upstream: Cannot understand
            if not self.is_established:
                return
            if (isinstance(status, int) and 0 <= status <= 0xFFFF
                    and not self.get_handlers(evt.EVT_DIMSE_SENT)
                    and dimse.send_command(store_response(
                        cast(int, rq.MessageID), status, rq.AffectedSOPClassUID,
                        rq.AffectedSOPInstanceUID), context_id)):
                return
            rsp = C_STORE()
            rsp.MessageID = rsp.MessageIDBeingRespondedTo = rq.MessageID
            rsp.AffectedSOPInstanceUID = rq.AffectedSOPInstanceUID
            rsp.AffectedSOPClassUID = rq.AffectedSOPClassUID
            rsp = StorageServiceClass(self).validate_status(cast(Any, status), rsp)
            dimse.send_msg(rsp, context_id)
        finally:
            self._is_paused = False
            dimse.cancel_req = {}

    def _run_reactor(self) -> None:
        try:
            self._reactor_loop()
        finally:
            dimse = self.dimse
            if isinstance(dimse, NodeDIMSEServiceProvider):
                dimse.drop_unserved()

    def _reactor_loop(self) -> None:
        """pynetdicom 3.0.4's acceptor loop, waiting on the message queue instead of sleeping."""
        self._is_paused = False
        while not self._kill:
            # The pause protocol of the send_*() methods, as upstream.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self._next_message()
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                logger.debug("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires, as upstream
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                logger.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


_DEBUG_HANDLERS = ((evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
                   (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
                   (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
                   (evt.EVT_PDU_SENT, standard_pdu_sent_handler))


def drop_debug_handlers(target: Association | ThreadedAssociationServer) -> None:
    """Unbind pynetdicom's standard logging handlers (both the server and each association
    bind them) unless the ``pynetdicom`` logger is at DEBUG."""
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        for event, handler in _DEBUG_HANDLERS:
            target.unbind(event, handler)


class NodeRequestHandler(RequestHandler):
    """Builds pynetdicom's acceptor association, then gives it the node's faster parts.

    The class switch keeps every attribute pynetdicom set up (both subclasses add no state).
    """

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.__class__ = NodeAssociation
        assoc.dimse.__class__ = NodeDIMSEServiceProvider
        assoc.dul.socket.__class__ = NodeAssociationSocket  # type: ignore[union-attr]
        assoc.dul.__class__ = NodeDUL
        cast(NodeDUL, assoc.dul)._send_lock = threading.Lock()
        # The thread's target was bound to the stock loop when the DUL was made.
        assoc.dul._target = make_target(assoc.dul.run_reactor)  # type: ignore[attr-defined]
        cast(NodeDIMSEServiceProvider, assoc.dimse).sink_factory = getattr(
            self.server, "node_sink_factory", None)
        drop_debug_handlers(assoc)
        return assoc


def start_server(ae: AE, address: tuple[str, int], evt_handlers: Sequence[Any],
                 ssl_context: Any = None, sink_factory: SinkFactory | None = None,
                 server_class: type[ThreadedAssociationServer] = ThreadedAssociationServer,
                 serve: bool = True) -> ThreadedAssociationServer:
    """Like ``ae.start_server(address, block=False, ...)`` with :class:`NodeRequestHandler`;
    ``sink_factory`` gives each C-STORE data set a :class:`StoreSink`.

    ``serve=False``: the server accepts nothing itself (its socket is closed at once); its
    owner hands it connections with ``server.process_request(socket, address)``.

    Raises OSError if the address cannot be bound.
    """
    if pynetdicom.__version__ != PYNETDICOM_VERSION:
        logger.warning("pynetdicom %s: the node's acceptor reactor is copied from %s",
                       pynetdicom.__version__, PYNETDICOM_VERSION)
    server = cast(ThreadedAssociationServer, ae.make_server(
        address, evt_handlers=list(evt_handlers), ssl_context=ssl_context,
        server_class=server_class, request_handler=NodeRequestHandler,
    ))
    drop_debug_handlers(server)
    server.node_sink_factory = sink_factory  # type: ignore[attr-defined]
    if not serve:
        server.server_close()
        return server
    thread = threading.Thread(target=make_target(server.serve_forever), name="NodeAcceptor",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # so that ae.shutdown() stops it, as for ae.start_server()
    return server
