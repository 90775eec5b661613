"""DIMSE service user towards the archive: C-STORE (PS3.4 Annex B) and C-ECHO (Annex A).

TCP_NODELAY is set on the association socket right after connect: pynetdicom never sets it,
and without it every C-STORE waits ~40 ms for Nagle + delayed ACK (the sender's setting is
what counts).
"""

from __future__ import annotations

import copy
import logging
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext

from node.errors import ArchiveError

logger = logging.getLogger(__name__)

#: PS3.7 C.4.2.1.4 / PS3.4 B.2.3: warning statuses of C-STORE; the instance was stored.
STORE_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})
VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class (PS3.4 A.4)
_MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255


def set_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN handler of a requestor: set TCP_NODELAY on its socket."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _prepare(item: Dataset | Path | str) -> tuple[Dataset | Path, UID, UID, str]:
    """(what to send, SOP Class UID, transfer syntax, SOP Instance UID) of one item."""
    if isinstance(item, Dataset):
        ds = item
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", FileMetaDataset()):
            # A dataset built in memory: send it as Explicit VR Little Endian, leave the
            # caller's object untouched.
            ds = copy.copy(item)
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        try:
            return ds, UID(ds.SOPClassUID), UID(ds.file_meta.TransferSyntaxUID), ds.SOPInstanceUID
        except AttributeError as exc:
            raise ArchiveError(f"dataset lacks SOP Class/Instance UID: {exc}") from exc
    path = Path(item)
    try:
        meta = read_file_meta_info(path)
        return (path, UID(meta.MediaStorageSOPClassUID), UID(meta.TransferSyntaxUID),
                str(meta.MediaStorageSOPInstanceUID))
    except (OSError, AttributeError, ValueError) as exc:
        raise ArchiveError(f"cannot read the DICOM file meta of {path}: {exc}") from exc


def presentation_contexts(pairs: Iterable[tuple[UID, UID]]) -> list[PresentationContext]:
    """One context per SOP class and (uncompressed | each compressed) transfer syntax.

    Uncompressed data can be sent in any uncompressed syntax (pynetdicom re-encodes), so they
    share one context proposing Explicit and Implicit VR Little Endian; compressed data must
    go as they are.
    """
    wanted: dict[tuple[UID, str], list[str]] = {}
    for sop_class, syntax in pairs:
        if syntax.is_compressed:
            wanted[(sop_class, syntax)] = [syntax]
        else:
            wanted[(sop_class, "uncompressed")] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    if len(wanted) > _MAX_CONTEXTS:
        raise ArchiveError(f"{len(wanted)} presentation contexts needed, at most 128 allowed")
    return [build_context(sop_class, syntaxes) for (sop_class, _), syntaxes in wanted.items()]


def _associate(
    contexts: Sequence[PresentationContext], ae_title: str, host: str, port: int,
    calling_aet: str, timeout: float,
) -> Association:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(
        host, port, contexts=list(contexts), ae_title=ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
    )
    if not assoc.is_established:
        what = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise ArchiveError(f"association {calling_aet} -> {ae_title}@{host}:{port} {what}")
    return assoc


def store_datasets(
    datasets_or_paths: Iterable[Dataset | Path | str],
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_aet: str,
    timeout: float = 30.0,
) -> list[int]:
    """C-STORE instances to a storage SCP over one association.

    Parameters
    ----------
    datasets_or_paths:
        pydicom datasets (without file meta they are sent as Explicit VR Little Endian) and/or
        paths of Part 10 files (sent as stored).
    ae_title, host, port:
        The called storage SCP.
    calling_aet:
        The calling AE title (the archive must know it to accept stores).
    timeout:
        ACSE, DIMSE and network timeout in seconds.

    Returns
    -------
    list of int
        The C-STORE status of each instance, in order (0x0000 or a warning).

    Raises
    ------
    ArchiveError
        No association, a context was not accepted, or any instance failed (the message names
        every failed SOP Instance UID with its status).
    """
    items = [_prepare(i) for i in datasets_or_paths]
    if not items:
        return []
    contexts = presentation_contexts((sop_class, ts) for _, sop_class, ts, _ in items)
    start = time.monotonic()
    assoc = _associate(contexts, ae_title, host, port, calling_aet, timeout)
    statuses: list[int] = []
    failures: list[str] = []
    try:
        for payload, _, _, sop_uid in items:
            try:
                rsp = assoc.send_c_store(payload)
            except (ValueError, AttributeError, RuntimeError) as exc:
                # No accepted context for this SOP class / syntax, or encoding failed.
                raise ArchiveError(f"cannot send instance {sop_uid}: {exc}") from exc
            status = int(rsp.Status) if "Status" in rsp else -1  # -1: no response (timeout)
            statuses.append(status)
            if status != 0x0000 and status not in STORE_WARNINGS:
                reason = "no response" if status < 0 else f"0x{status:04X}"
                failures.append(f"{sop_uid}: {reason}")
            if not assoc.is_established:
                raise ArchiveError(f"association aborted after {len(statuses)} instances")
    finally:
        if assoc.is_established:
            assoc.release()
    logger.info(
        "c-store peer_ae=%s host=%s port=%d instances=%d failed=%d duration=%.2fs",
        ae_title, host, port, len(statuses), len(failures), time.monotonic() - start,
    )
    if failures:
        raise ArchiveError(f"C-STORE to {ae_title} failed for: {'; '.join(failures)}")
    return statuses


def echo(*, ae_title: str, host: str, port: int, calling_aet: str, timeout: float = 10.0) -> int:
    """C-ECHO the peer; returns the status (0x0000 = success).

    Raises
    ------
    ArchiveError
        No association or no response.
    """
    assoc = _associate([build_context(VERIFICATION)], ae_title, host, port, calling_aet, timeout)
    try:
        rsp = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in rsp:
        raise ArchiveError(f"no C-ECHO response from {ae_title}@{host}:{port}")
    return int(rsp.Status)

