"""The store handler's raw header read (node/ingest/validate.py ``read_header``) against
pydicom's decoder: wherever the raw read answers, the handler must decide as it would on the
pydicom dataset (same UIDs, same refusal), on good data sets and on hypothesis-mutated ones;
and it must answer for the plain data sets scanners send, or the listener gains nothing."""

from __future__ import annotations

import struct
import warnings
from io import BytesIO
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from pynetdicom.dsutils import decode, encode

from node.ingest.handlers import _required_uids
from node.ingest.validate import check_dataset, read_header
from tests.conftest import make_ct_series


def _outcome(ds: Any) -> tuple[Any, ...]:
    """What the store handler decides from ``ds``: its UIDs and the refusal, if any."""
    try:
        uids = _required_uids(ds)
    except Exception:
        return ("undecodable",)
    if uids is None:
        return ("no uids",)
    refusal = check_dataset(ds, uids[3], SYNTAX[0])
    return (uids, refusal.status if refusal else 0)


SYNTAX: list[UID] = [ExplicitVRLittleEndian]


def _pydicom(body: bytes, syntax: UID) -> Any:
    return decode(BytesIO(body), syntax.is_implicit_VR, syntax.is_little_endian,
                  syntax.is_deflated)


def _compare(body: bytes, syntax: UID) -> bool:
    """Assert both reads decide alike; True if the raw read answered."""
    SYNTAX[0] = syntax
    raw = read_header(body, syntax)
    if raw is None:
        return False
    # As the node runs: pydicom's default validation (warn), not this session's strict mode.
    mode = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.WARN
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                expected = _outcome(_pydicom(body, syntax))
            except Exception:
                expected = ("undecodable",)
    finally:
        config.settings.reading_validation_mode = mode
    assert _outcome(raw) == expected
    return True


def _enhanced() -> Dataset:
    ds = make_ct_series(n=1, size=16)[0]
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.NumberOfFrames = "3"
    ds.PixelData = np.zeros((3, 16, 16), np.int16).tobytes()
    return ds


def _bases() -> list[tuple[str, bytes, UID]]:
    explicit = make_ct_series(n=1, size=32)[0]
    no_pixels = make_ct_series(n=1, size=16)[0]
    del no_pixels.PixelData
    jpeg2000 = make_ct_series(n=1, size=32)[0]
    jpeg2000.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg",
                      generate_instance_uid=False)
    rle = make_ct_series(n=1, size=32)[0]
    rle.compress(RLELossless, generate_instance_uid=False)
    return [
        ("explicit", encode(explicit, False, True), ExplicitVRLittleEndian),
        ("implicit", encode(explicit, True, True), ImplicitVRLittleEndian),
        ("enhanced", encode(_enhanced(), False, True), ExplicitVRLittleEndian),
        ("no pixel data", encode(no_pixels, False, True), ExplicitVRLittleEndian),
        ("jpeg2000", encode(jpeg2000, False, True), JPEG2000Lossless),
        ("rle", encode(rle, False, True), RLELossless),
    ]


BASES = _bases()


@pytest.mark.parametrize(("name", "body", "syntax"), BASES, ids=[b[0] for b in BASES])
def test_plain_data_sets_are_read_raw_and_decided_as_pydicom_does(
        name: str, body: bytes, syntax: UID) -> None:
    assert _compare(body, syntax), f"{name}: the raw read gave up on a plain data set"


def test_native_pixel_data_is_a_view_not_a_copy() -> None:
    body = BASES[0][1]
    raw = read_header(body, ExplicitVRLittleEndian)
    assert raw is not None and isinstance(raw.PixelData, memoryview)
    assert raw.PixelData.obj is body and len(raw.PixelData) == 32 * 32 * 2


def _edited(**changes: Any) -> bytes:
    """A small CT data set (Explicit VR Little Endian) with ``changes``; a ``bytes`` value is
    put in encoded as is (invalid values too, as peers send them)."""
    ds = make_ct_series(n=1, size=16)[0]
    raw: dict[int, bytes] = {}
    for keyword, value in changes.items():
        if isinstance(value, DataElement):
            ds[value.tag] = value
        elif value is None:
            delattr(ds, keyword)
        elif isinstance(value, bytes):
            tag = tag_for_keyword(keyword)
            assert tag is not None
            ds[tag] = DataElement(tag, dictionary_VR(tag), None)  # empty: replaced below
            raw[tag] = value
        else:
            setattr(ds, keyword, value)
    body = bytes(encode(ds, False, True))
    for tag, value in raw.items():
        vr = dictionary_VR(tag).encode()
        empty = struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, 0)
        assert body.count(empty) == 1
        body = body.replace(empty, struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr,
                                               len(value)) + value)
    return body


def _padded_uid() -> bytes:
    body = _edited()
    uid = _pydicom(body, ExplicitVRLittleEndian).SOPInstanceUID
    return body.replace(uid.encode(), b" " + uid[2:].encode() + b" ")


@pytest.mark.parametrize("body", [
    _edited(Modality="MR"),                                  # refused 0xA900 by both
    _edited(Modality=["CT", "MR"]),                          # multi-valued: pydicom decides
    _edited(Rows=DataElement(0x00280010, "LO", "sixty")),    # another VR: pydicom decides
    _edited(Columns=DataElement(0x00280011, "US", [16, 16])),  # multi-valued number
    _edited(StudyInstanceUID=None),                          # no study UID
    _padded_uid(),                                           # spaces around a UID
    _edited(NumberOfFrames=b"1.5 "),                         # not an integer
    _edited(NumberOfFrames=b"+3"),                           # signed
    _edited(NumberOfFrames=b""),                             # empty
    _edited(Modality=b" CT "),                               # padded both sides
    _edited(StudyInstanceUID=b"1.2.3\x00\x00\x00"),            # NUL padding run
    _edited(PixelData=DataElement(0x7FE00010, "OW", bytes(100))),  # truncated
])
def test_edge_cases_are_decided_as_pydicom_does(body: bytes) -> None:
    _compare(body, ExplicitVRLittleEndian)


def test_deflated_and_big_endian_are_left_to_pydicom() -> None:
    body = BASES[0][1]
    assert read_header(body, DeflatedExplicitVRLittleEndian) is None
    assert read_header(body, UID("1.2.840.10008.1.2.2")) is None  # Explicit VR Big Endian
    assert read_header(body, UID("1.2.3.4.999")) is None  # unknown (private) syntax


@settings(max_examples=300, deadline=None, database=None)
@given(
    base=st.integers(0, len(BASES) - 1),
    flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 3000),
)
def test_mutated_data_sets_are_decided_as_pydicom_does(
        base: int, flips: list[tuple[int, int]], cut: int) -> None:
    _, body, syntax = BASES[base]
    mutated = bytearray(body)
    for position, value in flips:  # the header region: tags, VRs, lengths, UIDs
        mutated[position % len(mutated)] = value
    if cut < len(mutated) and cut % 2:
        del mutated[cut:]
    _compare(bytes(mutated), syntax)
