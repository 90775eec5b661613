"""Checks an incoming dataset must pass before it is stored, each failure a named status.

Cheap by design (no pixel decoding on the network thread): the identifiers, the modality
against the SOP class, the length of native pixel data, and the first bytes of encapsulated
pixel data against the codec its transfer syntax declares (PS3.5 A.4), which catches a
dataset whose declared syntax lies.

:func:`read_header` reads the few attributes checked straight from the encoded data set
(pydicom's element reader, values converted here): a decoded pydicom dataset costs ~0.4 ms
per instance in value conversion and validation the checks do not need. Anything it does not
read plainly (another VR than the standard one, a multi-valued number, a deflated or big
endian syntax, a read error) makes it give up, and the caller decodes with pydicom: both
read the same values (tests/test_ingest_validate.py compares them on mutated data sets).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Protocol

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.filereader import data_element_generator
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    SegmentationStorage,
)

#: Modalities allowed per SOP class (PS3.3 C.7.3.1.1.1); SR classes accept "SR" only.
_MODALITY: dict[str, tuple[str, ...]] = {
    CTImageStorage: ("CT",),
    EnhancedCTImageStorage: ("CT",),
    SegmentationStorage: ("SEG",),
}
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # Structured Report Storage SOP classes

#: Leading bytes of the first fragment per encapsulated transfer syntax (PS3.5 A.4).
_JPEG = (b"\xff\xd8",)  # SOI marker (ISO/IEC 10918-1, 14495-1)
_J2K = (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ")  # SOC+SIZ codestream, or JP2 signature
_MAGIC: dict[str, tuple[bytes, ...]] = {
    "1.2.840.10008.1.2.4.50": _JPEG,
    "1.2.840.10008.1.2.4.51": _JPEG,
    "1.2.840.10008.1.2.4.57": _JPEG,
    "1.2.840.10008.1.2.4.70": _JPEG,
    "1.2.840.10008.1.2.4.80": _JPEG,
    "1.2.840.10008.1.2.4.81": _JPEG,
    "1.2.840.10008.1.2.4.90": _J2K,
    "1.2.840.10008.1.2.4.91": _J2K,
}
_RLE = "1.2.840.10008.1.2.5"


class Attributes(Protocol):
    """What the checks read: a pydicom :class:`Dataset` or a :class:`RawHeader`."""

    def get(self, keyword: str, default: Any = None) -> Any: ...

    def __contains__(self, keyword: Any) -> bool: ...

    def __getattr__(self, keyword: str) -> Any: ...


#: The attributes :func:`read_header` reads: tag -> (keyword, VR).
_READ: dict[int, tuple[str, str]] = {
    0x00080016: ("SOPClassUID", "UI"),
    0x00080018: ("SOPInstanceUID", "UI"),
    0x00080060: ("Modality", "CS"),
    0x0020000D: ("StudyInstanceUID", "UI"),
    0x0020000E: ("SeriesInstanceUID", "UI"),
    0x00280002: ("SamplesPerPixel", "US"),
    0x00280008: ("NumberOfFrames", "IS"),
    0x00280010: ("Rows", "US"),
    0x00280011: ("Columns", "US"),
    0x00280100: ("BitsAllocated", "US"),
    0x7FE00010: ("PixelData", "OB/OW"),
}
_READ_TAGS = list(_READ)


class RawHeader:
    """The attributes :func:`read_header` read, accessed as on a pydicom :class:`Dataset`
    (``get``, ``in``, attribute access; an absent one raises AttributeError)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def get(self, keyword: str, default: Any = None) -> Any:
        return self._values.get(keyword, default)

    def __contains__(self, keyword: Any) -> bool:
        return keyword in self._values

    def __getattr__(self, keyword: str) -> Any:
        if keyword.startswith("_"):  # never the values (e.g. _values before __init__)
            raise AttributeError(keyword)
        try:
            return self._values[keyword]
        except KeyError:
            raise AttributeError(keyword) from None


class _Unplain(Exception):
    """A value :func:`read_header` leaves to pydicom."""


def _value(raw: Any, body: memoryview, vr: str) -> Any:
    """The value of one raw element, or raise _Unplain."""
    if raw.VR is not None and raw.VR not in vr.split("/"):
        raise _Unplain
    data = raw.value
    if vr == "OB/OW":
        if data is not None:
            return data  # undefined length (encapsulated) or small: read by pydicom
        return body[raw.value_tell:raw.value_tell + raw.length]  # deferred: a view
    if data is None or b"\\" in data:
        raise _Unplain  # multi-valued: pydicom's conversion decides
    if vr == "US":
        if len(data) != 2:
            raise _Unplain
        return struct.unpack("<H", data)[0]
    text = data.decode("ascii").rstrip(" \x00")  # padding, as pydicom drops it
    if vr == "CS":
        return text
    text = text.strip()  # as pydicom's UID and IS do
    if vr == "IS":
        if not text.lstrip("+-").isdigit():
            raise _Unplain  # empty, or not a plain integer
        return int(text)
    return text


def read_header(body: bytes, transfer_syntax: UID) -> RawHeader | None:
    """The attributes :func:`check_dataset` and the store handler read, from the encoded data
    set ``body``; None if any is not plain enough (decode with pydicom then)."""
    if (not transfer_syntax.is_transfer_syntax or transfer_syntax.is_deflated
            or not transfer_syntax.is_little_endian):
        return None  # unknown (private): its encoding is pydicom's guess
    implicit = transfer_syntax.is_implicit_VR
    if len(body) >= 6 and implicit == (0x40 < body[4] < 0x5B and 0x40 < body[5] < 0x5B):
        return None  # the first VR says the other VR encoding: pydicom switches to it
    view = memoryview(body)
    values: dict[str, Any] = {}
    try:  # BytesIO shares a bytes object's buffer: no copy
        for raw in data_element_generator(BytesIO(body), implicit, True,
                                          defer_size=1024, specific_tags=_READ_TAGS):
            read = _READ.get(int(raw.tag))
            if read is None:
                continue  # Specific Character Set, always returned
            keyword, vr = read
            if keyword in values or not isinstance(raw, RawDataElement):
                raise _Unplain  # repeated, or a sequence where a value belongs
            values[keyword] = _value(raw, view, vr)
    except Exception:  # _Unplain, or a read error pydicom's decoder reports itself
        return None
    return RawHeader(values)


@dataclass(frozen=True)
class Refusal:
    """Why an instance is refused: the C-STORE status (PS3.4 B.2.3) and a reason to log."""

    status: int
    reason: str


def check_dataset(ds: Dataset | Attributes, sop_class_uid: str,
                  transfer_syntax: UID) -> Refusal | None:
    """Return why ``ds`` must be refused, or None if it may be stored.

    Parameters
    ----------
    ds:
        The decoded dataset of the C-STORE request, or its :func:`read_header`.
    sop_class_uid:
        Its SOP Class UID (already checked against the request).
    transfer_syntax:
        The transfer syntax of the presentation context it arrived in.
    """
    modality = str(ds.get("Modality", "") or "")
    allowed = _MODALITY.get(sop_class_uid, ("SR",) if sop_class_uid.startswith(_SR_PREFIX) else ())
    if allowed and modality not in allowed:
        # 0xA900 Error: Data Set does not match SOP Class
        return Refusal(0xA900, f"modality {modality!r} for SOP class {sop_class_uid}")
    if "PixelData" not in ds:
        if sop_class_uid in (CTImageStorage, EnhancedCTImageStorage):
            return Refusal(0xA900, "image without Pixel Data")  # Data Set does not match
        return None
    try:
        return _check_pixels(ds, transfer_syntax)
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        # 0xC211 Cannot understand: Image Pixel module unreadable
        return Refusal(0xC211, f"image pixel module unreadable: {type(exc).__name__}: {exc}")


def _check_pixels(ds: Dataset | Attributes, transfer_syntax: UID) -> Refusal | None:
    pixel_data = ds.PixelData
    if not isinstance(pixel_data, (bytes, memoryview)):
        return Refusal(0xC211, "Pixel Data is not a byte string")  # Cannot understand
    if not transfer_syntax.is_encapsulated:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.SamplesPerPixel), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = (rows * columns * samples * frames * bits + 7) // 8
        if len(pixel_data) < expected:
            # 0xC212 Cannot understand: truncated pixel data
            return Refusal(0xC212, f"Pixel Data has {len(pixel_data)} bytes, expected {expected}")
        return None
    try:
        items = generate_fragments(bytes(pixel_data))  # a view only if defined length: rare
        next(items)  # the Basic Offset Table item (PS3.5 A.4), possibly empty
        first = next(items)
    except (ValueError, StopIteration) as exc:
        # 0xC213 Cannot understand: the declared syntax is encapsulated, the data are not
        return Refusal(0xC213, f"encapsulated Pixel Data unreadable for {transfer_syntax}: {exc}")
    magic = _MAGIC.get(str(transfer_syntax))
    if magic is not None and not first.startswith(magic):
        # 0xC213 Cannot understand: the pixel data are not in the declared syntax
        return Refusal(0xC213, f"first fragment is not {transfer_syntax.name} data")
    if str(transfer_syntax) == _RLE:
        segments = int.from_bytes(first[:4], "little") if len(first) >= 64 else 0
        if not 1 <= segments <= 15:
            return Refusal(0xC213, "first fragment has no valid RLE header")  # Cannot understand
    return None
