"""Checks an incoming dataset must pass before it is stored, each failure a named status.

Cheap by design (no pixel decoding on the network thread): the identifiers, the modality
against the SOP class, the length of native pixel data, and the first bytes of encapsulated
pixel data against the codec its transfer syntax declares (PS3.5 A.4), which catches a
dataset whose declared syntax lies.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
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


@dataclass(frozen=True)
class Refusal:
    """Why an instance is refused: the C-STORE status (PS3.4 B.2.3) and a reason to log."""

    status: int
    reason: str


def check_dataset(ds: Dataset, sop_class_uid: str, transfer_syntax: UID) -> Refusal | None:
    """Return why ``ds`` must be refused, or None if it may be stored.

    Parameters
    ----------
    ds:
        The decoded dataset of the C-STORE request.
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


def _check_pixels(ds: Dataset, transfer_syntax: UID) -> Refusal | None:
    pixel_data = ds.PixelData
    if not isinstance(pixel_data, bytes):
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
        items = generate_fragments(pixel_data)
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
