"""The node's faster pynetdicom acceptor parts (node/ingest/fastpath.py).

The listener tests (test_ingest*.py) run every C-STORE, release, abort and network timeout
through them (storescu checks every response it gets); these tests pin what those cannot see:
reads split across TCP segments, a peer that closes mid-PDU, C-STORE responses byte for byte
as pynetdicom encodes them, P-DATA-TF items read as pynetdicom reads them and invalid ones
aborting the association, the class switch of every accepted association and the pinned
version.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import cast

import pynetdicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from node.ingest import dul, fastpath
from node.ingest.dul import NodeAssociationSocket, NodeDUL, pdata_tf, pdv_items
from node.ingest.fastpath import (
    PYNETDICOM_VERSION,
    NodeAssociation,
    NodeDIMSEServiceProvider,
    drop_debug_handlers,
    encode_store_response,
    parse_store_request,
    start_server,
    store_response,
)
from node.ingest.server import NodeServer
from tests.conftest import NodeFactory, make_ct_series, wait_until

ROOT = Path(__file__).resolve().parents[1]


def _wrapped_pair() -> tuple[NodeAssociationSocket, socket.socket]:
    ours, peer = socket.socketpair()
    return NodeAssociationSocket(Association(AE(), "acceptor"), client_socket=ours), peer


def test_recv_joins_pieces_sent_with_pauses() -> None:
    sock, peer = _wrapped_pair()
    payload = bytes(range(256)) * 2048  # 512 KiB, more than one socket buffer
    pieces = [payload[i:i + 70001] for i in range(0, len(payload), 70001)]

    def send_slowly() -> None:
        for piece in pieces:
            peer.sendall(piece)
            time.sleep(0.005)

    sender = threading.Thread(target=send_slowly)
    sender.start()
    try:
        assert sock.recv(6) == payload[:6]
        assert sock.recv(len(payload) - 6) == payload[6:]
    finally:
        sender.join()
        peer.close()
        sock.close()


def test_recv_returns_what_arrived_when_the_peer_closes() -> None:
    sock, peer = _wrapped_pair()
    peer.sendall(b"0123456789")
    peer.close()
    try:
        got = sock.recv(100)
        assert bytes(got) == b"0123456789"
        assert sock.recv(5) == b""
    finally:
        sock.close()


def test_accepted_associations_use_the_fast_parts(start_node: NodeFactory) -> None:
    node = start_node(lambda uid, path: None)
    seen: list[tuple[type, type, type, type, bool]] = []
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    try:
        assert assoc.is_established
        for acceptor in node.ae.active_associations:
            dul = cast(NodeDUL, acceptor.dul)
            seen.append((type(acceptor), type(acceptor.dul.socket), type(acceptor.dimse),
                         type(dul), dul._wake_r >= 0))  # its thread runs the node's loop
            # pynetdicom's per-message debug formatting is off (its logger is not at DEBUG)
            assert not acceptor.get_handlers(evt.EVT_DIMSE_SENT)
            assert not acceptor.get_handlers(evt.EVT_DIMSE_RECV)
        status = assoc.send_c_echo()
        assert status.Status == 0x0000
    finally:
        assoc.release()
    assert seen and all(a is NodeAssociation and s is NodeAssociationSocket
                        and p is NodeDIMSEServiceProvider and d is NodeDUL and waking
                        for a, s, p, d, waking in seen), seen


@pytest.mark.parametrize(("status", "sop_class", "sop_instance"), [
    (0x0000, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5"),            # odd-length UIDs
    (0xA700, "1.2.840.10008.5.1.4.1.1.66.4", "1.2.826.0.1.3680043.8.498.10"),
    (0xC210, "1.2.840.10008.5.1.4.1.1.2.1", "2.25.1234567890123456789012345678901234"),
    (0x0000, None, None),                                             # both optional UIDs absent
])
def test_store_response_bytes_equal_pynetdicoms(status: int, sop_class: str | None,
                                                sop_instance: str | None) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 65535
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = sop_class, sop_instance
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = message.encode_msg(1, 16384)
    (context_id, pdv), = pdata.presentation_data_value_list
    assert pdv[:1] == b"\x03" and encode_store_response(rsp) == pdv[1:]
    assert pdata_tf(context_id, pdv) == P_DATA_TF(pdata).encode()  # the PDU sent directly


def test_store_response_with_error_comment_is_left_to_pynetdicom() -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 1, 0xC000
    rsp.ErrorComment = "bad UID"
    assert encode_store_response(rsp) is None


def _open_association(node: NodeServer) -> Association:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert assoc.is_established
    assert wait_until(lambda: len(node.ae.active_associations) == 1)
    return assoc


def test_reactor_ends_an_idle_association_at_the_network_timeout(
        start_node: NodeFactory) -> None:
    node = start_node(lambda uid, path: None, network_timeout=1.0)
    assoc = _open_association(node)
    try:
        assert wait_until(lambda: not node.ae.active_associations, timeout=5.0)
        assert wait_until(lambda: not assoc.is_established, timeout=5.0)
    finally:
        if assoc.is_established:
            assoc.abort()


def test_reactor_ends_an_aborted_association_and_keeps_serving(
        start_node: NodeFactory) -> None:
    node = start_node(lambda uid, path: None)
    _open_association(node).abort()
    assert wait_until(lambda: not node.ae.active_associations, timeout=3.0)
    _assert_serves(node)
    assert wait_until(lambda: not node.ae.active_associations, timeout=3.0)


def _assert_serves(node: NodeServer) -> None:
    """A new association is accepted and its C-ECHO answered."""
    assoc = _open_association(node)
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_pynetdicom_is_pinned_to_the_copied_reactor() -> None:
    """fastpath copies 3.0.4's acceptor loop: the pin, the install and the copy must agree."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"pynetdicom==([0-9.]+)"', pyproject)
    assert pin is not None and pin.group(1) == PYNETDICOM_VERSION
    assert pynetdicom.__version__ == PYNETDICOM_VERSION


def _node_dimse() -> NodeDIMSEServiceProvider:
    """The DIMSE provider of an acceptor set up as the node's request handler does it."""
    assoc = Association(AE(), "acceptor")
    drop_debug_handlers(assoc)
    assoc.dimse.__class__ = NodeDIMSEServiceProvider
    return cast(NodeDIMSEServiceProvider, assoc.dimse)


def _store_request_pdatas(max_pdu: int, **fields: object) -> tuple[C_STORE, list[P_DATA]]:
    rq = C_STORE()
    rq.MessageID, rq.Priority = 17, 2
    rq.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rq.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.123"
    for name, value in fields.items():
        setattr(rq, name, value)
    rq.DataSet = BytesIO(bytes(range(256)) * 1025)  # 262,400 bytes: several fragments
    message = C_STORE_RQ()
    message.primitive_to_message(rq)
    return rq, list(message.encode_msg(3, max_pdu))


@pytest.mark.parametrize("fields", [
    {},
    {"Priority": 1, "MoveOriginatorApplicationEntityTitle": "ORTHANC",
     "MoveOriginatorMessageID": 65535},
    {"AffectedSOPInstanceUID": "1.2.3.4"},  # even length: no padding
])
def test_store_request_decoded_as_pynetdicom_does(fields: dict[str, object]) -> None:
    """Fed P-DATA by P-DATA, the fast receiver queues the same C-STORE primitive (every
    parameter, the data set bytes, the context) as pynetdicom's decoder."""
    sent, pdatas = _store_request_pdatas(16384, **fields)
    ours = _node_dimse()
    theirs = Association(AE(), "acceptor").dimse
    for i, pdata in enumerate(pdatas):
        ours.receive_primitive(pdata)
        theirs.receive_primitive(pdata)
        if i == 0:  # the fast path took the command set; pynetdicom's decoder did not
            assert ours._store is not None and ours.message is None
    (cx1, got), (cx2, expected) = ours.msg_queue.get_nowait(), theirs.msg_queue.get_nowait()
    assert cx1 == cx2 == 3 and got._context_id == expected._context_id == 3
    for name in ("MessageID", "Priority", "AffectedSOPClassUID", "AffectedSOPInstanceUID",
                 "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID"):
        assert getattr(got, name) == getattr(expected, name), name
    assert got.DataSet.getvalue() == expected.DataSet.getvalue() == sent.DataSet.getvalue()
    assert ours.message is None and ours.msg_queue.empty()


def test_other_commands_go_through_pynetdicom() -> None:
    echo = C_ECHO()
    echo.MessageID, echo.AffectedSOPClassUID = 5, "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(echo)
    ours = _node_dimse()
    for pdata in message.encode_msg(1, 16384):
        ours.receive_primitive(pdata)
    _, got = ours.msg_queue.get_nowait()
    assert isinstance(got, C_ECHO) and got.MessageID == 5


@pytest.mark.parametrize("command", [
    b"",
    b"\x00\x00\x00\x01\x02\x00\x00\x00\x00\x00",  # C-ECHO-RQ's command field only
    bytes.fromhex("0000000004000000ffffffff"),  # a length running past the end
])
def test_unexpected_command_sets_are_left_to_pynetdicom(command: bytes) -> None:
    assert parse_store_request(command) is None


def test_a_command_in_the_middle_of_a_data_set_aborts() -> None:
    """A peer that interleaves another command into a C-STORE data set breaks PS3.8 E.2:
    the association is aborted (event 19, as pynetdicom does for an invalid message)."""
    _, pdatas = _store_request_pdatas(16384)
    dimse = _node_dimse()
    dimse.receive_primitive(pdatas[0])  # the command set
    dimse.receive_primitive(pdatas[1])  # a first data fragment
    dimse.receive_primitive(pdatas[0])  # a command again
    assert dimse.dul.event_queue.get_nowait() == "Evt19"
    assert dimse.msg_queue.empty()


def _pdata_tf_bytes(*items: tuple[int, bytes]) -> bytes:
    pdata = P_DATA()
    for item in items:
        pdata.presentation_data_value_list.append(item)
    pdu = P_DATA_TF()
    pdu.from_primitive(pdata)
    return bytes(pdu.encode())


def test_pdv_items_match_pynetdicoms_decoder() -> None:
    items = [(1, b"\x03" + b"c" * 30), (3, b"\x00" + bytes(range(256)) * 9), (5, b"\x02x")]
    encoded = _pdata_tf_bytes(*items)
    pdu = P_DATA_TF()
    pdu.decode(encoded)
    expected = [(c, bytes(v)) for c, v in pdu.to_primitive().presentation_data_value_list]
    got = pdv_items(encoded[6:])
    assert got is not None
    assert [(c, bytes(v)) for c, v in got] == expected == items
    assert pdv_items(b"") == []


@pytest.mark.parametrize("variable", [
    bytes.fromhex("00000001") + b"\x01",             # an item of its context ID alone
    bytes.fromhex("00000010") + b"\x01\x03abc",      # an item running past the PDU's end
    bytes.fromhex("000000030103ff") + b"\x00\x00",   # a cut-off item header after a good item
])
def test_pdv_items_refuses_invalid_items(variable: bytes) -> None:
    assert pdv_items(variable) is None


def _ct_association(node: NodeServer) -> Association:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert assoc.is_established
    assert wait_until(lambda: len(node.ae.active_associations) == 1)
    return assoc


def test_command_and_data_set_in_one_pdu_are_stored(start_node: NodeFactory) -> None:
    """PS3.8 allows several PDVs in one P-DATA-TF: a whole C-STORE (command set and every data
    fragment) in one PDU, taken by the DUL's direct P-DATA path, is stored and answered."""
    node = start_node(lambda uid, path: None)
    ds = make_ct_series(n=1, size=16)[0]
    body = encode(ds, False, True)
    rq = C_STORE()
    rq.MessageID, rq.Priority = 7, 2
    rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = CTImageStorage, ds.SOPInstanceUID
    rq.DataSet = BytesIO(body)
    message = C_STORE_RQ()
    message.primitive_to_message(rq)
    pdvs = [pdv for pdata in message.encode_msg(1, 200)
            for pdv in pdata.presentation_data_value_list]
    assert len(pdvs) > 3  # the command set and several data fragments
    assoc = _ct_association(node)
    try:
        context_id = assoc.accepted_contexts[0].context_id
        pdvs = [(context_id, data) for _, data in pdvs]
        # Pause the requestor's reactor as its send_*() methods do, or it takes the response.
        assoc._reactor_checkpoint.clear()
        assert wait_until(lambda: assoc._is_paused)
        cast(socket.socket, assoc.dul.socket.socket).sendall(_pdata_tf_bytes(*pdvs))
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert isinstance(rsp, C_STORE) and rsp.Status == 0x0000
        assert rsp.MessageIDBeingRespondedTo == 7
    finally:
        assoc.release()
    record = node.spool.instance(ds.SOPInstanceUID)
    assert record is not None and record.path.read_bytes().endswith(body)


@pytest.mark.parametrize("variable", [
    bytes.fromhex("00000001") + b"\x01",
    bytes.fromhex("00000010") + b"\x01\x03abc",
])
def test_invalid_pdata_aborts_the_association_and_the_node_serves_on(
        start_node: NodeFactory, variable: bytes) -> None:
    node = start_node(lambda uid, path: None)
    assoc = _ct_association(node)
    pdu = struct.pack(">BBI", 0x04, 0, len(variable)) + variable
    cast(socket.socket, assoc.dul.socket.socket).sendall(pdu)
    assert wait_until(lambda: assoc.is_aborted, timeout=5.0)  # the node sent A-ABORT
    assert wait_until(lambda: not node.ae.active_associations, timeout=5.0)
    _assert_serves(node)
    assert not any(node.spool.incoming_dir.iterdir())


def _scp_with(handler: object, free_port: object) -> tuple[AE, int]:
    """An SCP on the node's acceptor whose C-STORE handler is ``handler``."""
    ae = AE(ae_title="SCP")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    port = cast(int, free_port())  # type: ignore[operator]
    start_server(ae, ("127.0.0.1", port), [(evt.EVT_C_STORE, handler)])
    return ae, port


def _store_one(port: int) -> Dataset:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="SCP")
    assert assoc.is_established
    try:
        return assoc.send_c_store(make_ct_series(n=1, size=16)[0])
    finally:
        assoc.release()


def _status_with_comment(event: evt.Event) -> Dataset:
    status = Dataset()
    status.Status, status.ErrorComment = 0xC000, "refused for the test"
    return status


@pytest.mark.parametrize(("handler", "status", "comment"), [
    (lambda event: 0xB007, 0xB007, None),                # Warning: coercion, sent directly
    (lambda event: 1 / 0, 0xC211, None),                 # the handler raised: as upstream
    (_status_with_comment, 0xC000, "refused for the test"),  # a status data set: pynetdicom
    (lambda event: "nonsense", 0xC002, None),            # not a status: as upstream
])
def test_the_store_handlers_status_is_answered_as_pynetdicom_does(
        free_port: object, handler: object, status: int, comment: str | None) -> None:
    ae, port = _scp_with(handler, free_port)
    try:
        rsp = _store_one(port)
    finally:
        ae.shutdown()
    assert rsp.Status == status
    assert rsp.get("ErrorComment") == comment


def test_store_response_without_uids_equals_pynetdicoms() -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 9, 0xA700
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = list(message.encode_msg(1, 16384))
    assert store_response(9, 0xA700, None, None) == pdata.presentation_data_value_list[0][1][1:]


@pytest.mark.parametrize("sop_instance", ["1.02.3", "1.2.3.", "1." + "2" * 70])
def test_store_requests_with_nonconformant_uids_are_left_to_pynetdicom(
        sop_instance: str) -> None:
    """The fast parser sets UIDs past pynetdicom's validation only when they conform to
    PS3.5 9.1; anything else takes pynetdicom's path, as before."""
    _, pdatas = _store_request_pdatas(16384)
    command = pdatas[0].presentation_data_value_list[0][1][1:]
    good = parse_store_request(command)
    assert good is not None
    uid = b"1.2.826.0.1.3680043.8.498.123\x00"
    value = sop_instance.encode() + (b"\x00" if len(sop_instance) % 2 else b"")
    element = struct.pack("<HHI", 0x0000, 0x1000, len(uid)) + uid
    changed = command.replace(element, struct.pack("<HHI", 0x0000, 0x1000, len(value)) + value)
    group_length = struct.pack("<HHII", 0, 0, 4, len(changed) - 12)
    assert changed != command
    assert parse_store_request(group_length + changed[12:]) is None


def test_a_release_is_answered_without_waiting_out_the_reactors_wait(
        start_node: NodeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The network thread wakes the association thread when an A-RELEASE-RQ arrives: with
    the reactor's wait made 5 s, releases still take well under a second (they would take up
    to 5 s if the reactor only looked at the end of its wait)."""
    monkeypatch.setattr(fastpath, "REACTOR_WAIT", 5.0)
    node = start_node(lambda uid, path: None)
    for _ in range(3):
        assoc = _open_association(node)
        assert assoc.send_c_echo().Status == 0x0000
        start = time.monotonic()
        assoc.release()
        assert assoc.is_released and time.monotonic() - start < 1.0


@pytest.mark.parametrize("end", ["release", "abort", "hang up"])
def test_ended_associations_free_their_threads_without_waiting_out_the_waits(
        start_node: NodeFactory, monkeypatch: pytest.MonkeyPatch, end: str) -> None:
    """Stopping the network thread wakes it, and its end wakes the association thread: with
    both waits made 5 s, an ended association's threads are gone well within 2 s."""
    monkeypatch.setattr(fastpath, "REACTOR_WAIT", 5.0)
    monkeypatch.setattr(dul, "DUL_WAIT", 5.0)
    node = start_node(lambda uid, path: None)
    assoc = _open_association(node)
    assert assoc.send_c_echo().Status == 0x0000
    (acceptor,) = node.ae.active_associations
    if end == "release":
        assoc.release()
    elif end == "abort":
        assoc.abort()
    else:
        cast(socket.socket, assoc.dul.socket.socket).shutdown(socket.SHUT_RDWR)
    assert wait_until(lambda: not acceptor.is_alive() and not acceptor.dul.is_alive(),
                      timeout=2.0)
    assert not node.ae.active_associations
    if end == "hang up":
        assoc.abort()
