"""Bad input against the real listener: each refusal a named status, a quarantined copy with
the reason, and the listener keeps serving; then a hypothesis fuzz of mutated datasets and raw
PDUs, after which every acknowledged instance must be intact."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
)
from pynetdicom import AE, build_context, evt
from pynetdicom import _config as pynetdicom_config

from node.archive.dimse import echo, set_nodelay
from node.config import Settings
from node.errors import ArchiveError
from node.ingest import NodeServer
from tests.conftest import make_ct_series, wait_until


@pytest.fixture
def node(tmp_path: Path, free_port: Callable[[], int]) -> Iterator[NodeServer]:
    settings = Settings(port=free_port(), spool_dir=tmp_path / "spool", stable_seconds=60.0)
    # A short network timeout: the fuzz's half PDUs must not hold association slots long.
    settings = replace(settings, min_free_bytes=0, network_timeout=1.0)
    with NodeServer(settings, lambda *_: None) as server:
        yield server


def _body(ds: Dataset) -> bytes:
    """The dataset encoded as Explicit VR Little Endian, without file meta."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _file(path: Path, body: bytes, syntax: str, sop_uid: str) -> Path:
    """A Part 10 file whose meta declares ``syntax`` whatever ``body`` really is."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop_uid
    meta.TransferSyntaxUID, meta.ImplementationClassUID = syntax, PYDICOM_IMPLEMENTATION_UID
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta)
    path.write_bytes(fp.getvalue() + body)
    return path


def _send_files(port: int, paths: list[tuple[Path, str]]) -> list[int]:
    """Send files as their bytes are (chunked), each in its declared syntax; -1: no answer."""
    contexts = {syntax for _, syntax in paths}
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, [build_context(CTImageStorage, s) for s in contexts],
                         ae_title="LIVERNODE", evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    assert assoc.is_established
    statuses = []
    try:
        for path, _ in paths:
            rsp = assoc.send_c_store(path) if assoc.is_established else Dataset()
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


@pytest.fixture
def chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's bytes as they are instead of re-encoding the dataset."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


def _cases(tmp_path: Path) -> list[tuple[str, Path, str, int]]:
    """(name, file, declared syntax, expected status) of each kind of bad input."""
    ds = make_ct_series(n=6)
    ex = ExplicitVRLittleEndian
    truncated, mr, wrong_vr, lie_native, lie_codec, good = ds
    truncated.PixelData = truncated.PixelData[:1000]
    mr.Modality = "MR"
    wrong_vr[0x00280010] = DataElement(0x00280010, "LO", "sixty-four")  # Rows must be US
    jls = [(name, b) for name, b in [("lie_native", _body(lie_native))]]
    out = [
        ("truncated", _file(tmp_path / "t.dcm", _body(truncated), ex, truncated.SOPInstanceUID),
         ex, 0xC212),  # Cannot understand: truncated pixel data
        ("modality", _file(tmp_path / "m.dcm", _body(mr), ex, mr.SOPInstanceUID),
         ex, 0xA900),  # Data Set does not match SOP Class
        ("wrong-vr", _file(tmp_path / "v.dcm", _body(wrong_vr), ex, wrong_vr.SOPInstanceUID),
         ex, 0xC211),  # Cannot understand: image pixel module unreadable
        ("native-declared-jpeg",
         _file(tmp_path / "n.dcm", jls[0][1], JPEGBaseline8Bit, lie_native.SOPInstanceUID),
         JPEGBaseline8Bit, 0xC213),  # Cannot understand: data not in the declared syntax
        ("good", _file(tmp_path / "g.dcm", _body(good), ex, good.SOPInstanceUID), ex, 0x0000),
    ]
    # JPEG-LS declared, a JPEG 2000 codestream inside.
    lie_codec.compress("1.2.840.10008.1.2.4.90", encoding_plugin="pylibjpeg",
                       generate_instance_uid=False)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, lie_codec)
    out.append(("j2k-declared-jpegls",
                _file(tmp_path / "c.dcm", fp.getvalue(), JPEGLSLossless, lie_codec.SOPInstanceUID),
                JPEGLSLossless, 0xC213))  # Cannot understand: data not in the declared syntax
    return out


def test_bad_input_is_refused_quarantined_and_listener_serves(
    node: NodeServer, tmp_path: Path, chunked: None
) -> None:
    cases = _cases(tmp_path)
    statuses = _send_files(node.port, [(path, syntax) for _, path, syntax, _ in cases])
    assert statuses == [expected for *_, expected in cases], [c[0] for c in cases]
    reasons = sorted((node.spool.root / "quarantine").glob("*.txt"))
    assert len(reasons) == len(cases) - 1
    text = " ".join(r.read_text() for r in reasons)
    for fragment in ("0xC212", "0xA900", "0xC211", "0xC213", "modality 'MR'"):
        assert fragment in text
    assert echo(ae_title="LIVERNODE", host="127.0.0.1", port=node.port, calling_aet="X") == 0
    assert node.metrics.refused == {0xC212: 1, 0xA900: 1, 0xC211: 1, 0xC213: 2}
    assert not any(node.spool.incoming_dir.iterdir())  # refused: no temporary file left


def _assert_answers_echo(node: NodeServer) -> None:
    """The listener answers C-ECHO again once stale peers' slots are freed.

    A peer that sent half a PDU holds an association slot until ``network_timeout`` (1 s
    here); under load several such slots can be held at once and a new association is then
    refused with "local limit exceeded" for that long. Within the timeout plus a margin the
    listener must answer.
    """
    deadline = time.monotonic() + node.settings.network_timeout + 4.0
    while True:
        try:
            assert echo(ae_title="LIVERNODE", host="127.0.0.1", port=node.port,
                        calling_aet="X") == 0
            return
        except ArchiveError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


_GOOD = make_ct_series(n=1, size=16)[0]
_GOOD_BODY = _body(_GOOD)
_ASSOCIATE_RQ_HEAD = bytes.fromhex("01000000") + b"\x00\x00\x00\xcc"  # A-ASSOCIATE-RQ, length


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    flips=st.lists(st.tuples(st.integers(0, len(_GOOD_BODY) - 1), st.integers(0, 255)),
                   max_size=6),
    cut=st.integers(0, len(_GOOD_BODY)),
    raw_pdu=st.binary(max_size=300),
    pdu_prefix=st.booleans(),
)
def test_fuzz_listener_survives_and_acknowledged_instances_are_intact(
    node: NodeServer, tmp_path: Path, chunked: None,
    flips: list[tuple[int, int]], cut: int, raw_pdu: bytes, pdu_prefix: bool,
) -> None:
    body = bytearray(_GOOD_BODY)
    for position, value in flips:
        body[position] = value
    body = body[: max(cut, 8)]
    sop = _GOOD.SOPInstanceUID
    path = _file(tmp_path / "fuzz.dcm", bytes(body), ExplicitVRLittleEndian, sop)
    status = _send_files(node.port, [(path, ExplicitVRLittleEndian)])[0]
    if status == 0x0000:
        record = node.spool.instance(sop)
        if record is not None:  # acknowledged under its own UIDs: stored byte for byte
            stored = record.path.read_bytes()
            assert hashlib.sha256(stored).hexdigest() == record.sha256
    # Raw bytes straight onto the socket: a garbage or half PDU, then hang up.
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall((_ASSOCIATE_RQ_HEAD if pdu_prefix else b"") + raw_pdu)
    _assert_answers_echo(node)
    for record in node.spool.instances(_GOOD.StudyInstanceUID):
        assert hashlib.sha256(record.path.read_bytes()).hexdigest() == record.sha256
    assert wait_until(lambda: not any(node.spool.incoming_dir.iterdir()), 5.0)
