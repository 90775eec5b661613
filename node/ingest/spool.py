"""The durable spool: instance files on disk plus an index of instances and studies.

Layout: ``<spool_dir>/studies/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
(DICOM Part 10 files, PS3.10) and, with the default index, ``<spool_dir>/index.sqlite3``
(:mod:`node.ingest.index`). An instance is written to a temporary file in
``<spool_dir>/incoming/`` (:class:`Incoming`: the listener appends each network fragment as it
arrives; the empty file was made ahead in ``<spool_dir>/ready/``), fdatasync'ed, renamed to
its final name and the directory fsync'ed, then indexed; only then is the instance
acknowledged, so an acknowledged instance survives a crash or power loss. The files are the
truth: :meth:`Spool.recover` deletes unfinished temporary files (never acknowledged) and
indexes any instance file whose index entry was lost.

Study states: ``pending`` (receiving; becomes complete after ``stable_seconds`` of silence),
``queued``, ``processing``, ``done``, ``failed``. Any new instance puts a study back to
``pending``, so a study that grows after it was processed is processed again.
"""

from __future__ import annotations

import enum
import hashlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread

from node.errors import IngestError
from node.ingest.incoming import FilePool, Incoming, write_all
from node.ingest.index import (
    InstanceRecord,
    SpoolIndex,
    SQLiteIndex,
    StudyRecord,
    StudyState,
)
from node.ingest.part10 import is_valid_uid

#: The default index's file name in the spool directory.
INDEX_NAME = "index.sqlite3"

__all__ = ["INDEX_NAME", "Incoming", "InstanceRecord", "SQLiteIndex", "Spool", "SpoolIndex",
           "StoreOutcome", "StudyRecord", "StudyState", "is_valid_uid", "request_analysis",
           "study_record", "write_durably"]

logger = logging.getLogger(__name__)


class StoreOutcome(enum.Enum):
    """What :meth:`Spool.store` did with an instance."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: nothing changed
    REPLACED = "replaced"  # same SOP Instance UID, different bytes: the new one wins


CLEAN_MARKER = "clean-shutdown"
"""File in the spool root written by a clean stop, removed by the next start's recovery."""


INCOMING = "incoming"
"""Directory in the spool root holding instances still being received or synced."""
READY = "ready"
"""Directory in the spool root holding empty files made ahead for ``incoming/``
(:class:`node.ingest.incoming.FilePool`)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durable(path: Path, root: Path) -> None:
    """Create ``path`` (below ``root``) and fsync every parent whose entry list changed."""
    missing: list[Path] = []
    p = path
    while not p.exists() and p != root:
        missing.append(p)
        p = p.parent
    if not missing and path != root:  # it exists (the loop looked)
        return  # the common case, once per instance: no failing mkdir
    path.mkdir(parents=True, exist_ok=True)
    for created in missing:
        _fsync_dir(created.parent)


def _ensure_dir(directory: Path, root: Path, sync: bool) -> None:
    """Create ``directory`` (below ``root``); ``sync``: durably (:func:`_make_dirs_durable`)."""
    if sync:
        _make_dirs_durable(directory, root)
    else:
        directory.mkdir(parents=True, exist_ok=True)


def write_durably(path: Path, data: bytes | Sequence[bytes], root: Path,
                  sync: bool = True) -> None:
    """Write ``data`` (bytes, or parts written one after the other, never joined in memory)
    to ``path`` atomically and durably (temp file, fsync, rename, fsync dir).

    ``sync=False`` skips the two fsyncs: still atomic, but after a power loss (not after a
    crash of the process) the file may be missing or hold zeros."""
    _ensure_dir(path.parent, root, sync)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            write_all(fd, [data] if isinstance(data, bytes) else data)
            if sync:  # fdatasync also flushes the size, all reading the data back needs (POSIX)
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync:
        _fsync_dir(path.parent)


class Spool:
    """Durable instance files plus an index (:class:`SpoolIndex`); safe to use from many threads.

    Parameters
    ----------
    root:
        The spool directory; created if missing.
    index:
        The index to use (default: :class:`SQLiteIndex` in ``<root>/index.sqlite3``).
    sync:
        fsync every instance before it is indexed and acknowledged (the default). False trades
        power-loss safety for speed, like Orthanc's ``SyncStorageArea: false``: a crash of the
        node still loses nothing, a power loss may lose or zero the last instances received.
    """

    def __init__(self, root: Path, index: SpoolIndex | None = None, sync: bool = True) -> None:
        self.root = Path(root).resolve()
        self.sync = sync
        self.studies_dir = self.root / "studies"
        self.studies_dir.mkdir(parents=True, exist_ok=True)
        self.incoming_dir = self.root / INCOMING
        self.incoming_dir.mkdir(exist_ok=True)
        (self.root / READY).mkdir(exist_ok=True)
        self.file_pool = FilePool(self.root / READY)
        self.index: SpoolIndex = index or SQLiteIndex(self.root / INDEX_NAME)

    def recover(self) -> list[str]:
        """Make the spool consistent after a stop or crash; call once, before serving.

        Temporary files of writes that never finished are deleted (they were never
        acknowledged); instance files the index does not know (their index commit was lost to a
        power failure, or never made) are indexed again, and unreadable ones quarantined;
        studies that were ``queued`` or ``processing`` become ``pending`` and complete at once,
        so they are processed again (at-least-once; output UIDs are derived deterministically,
        so a re-run adds no duplicates to the archive).

        After a clean stop (``close(clean=True)`` left its marker) the walk over every spool
        file is skipped: nothing was half-written and the closed index is on disk. The marker
        is removed (durably) first, so any later crash leads to the full walk again.

        Returns
        -------
        list of str
            The Study Instance UIDs that were interrupted.
        """
        marker = self.root / CLEAN_MARKER
        reindexed: set[str] = set()
        for tmp in self.incoming_dir.iterdir():
            logger.warning("spool recovery: removing unfinished write %s", tmp)
            tmp.unlink(missing_ok=True)
        for tmp in (self.root / READY).iterdir():
            tmp.unlink(missing_ok=True)  # empty, made ahead by a file pool
        if marker.exists():
            marker.unlink()
            _fsync_dir(self.root)
            logger.info("spool recovery: clean shutdown, no spool walk")
        else:
            for tmp in self.studies_dir.glob("*/*/.*.tmp"):  # left by earlier versions
                logger.warning("spool recovery: removing unfinished write %s", tmp)
                tmp.unlink(missing_ok=True)
            reindexed = self._index_unknown_files()
        interrupted = self.index.requeue_interrupted()
        for uid in interrupted:
            logger.warning("spool recovery: study %s was interrupted, processing it again", uid)
        return sorted(set(interrupted) | reindexed)

    def _index_unknown_files(self) -> set[str]:
        """Index every instance file that has no index entry; returns their studies."""
        known = self.index.indexed_paths()
        studies: set[str] = set()
        for path in sorted(self.studies_dir.glob("*/*/*.dcm")):
            if str(path) in known:
                continue
            try:
                record = read_instance_record(path)
            except (OSError, ValueError) as exc:
                target = self.root / "quarantine" / f"unindexed-{path.name}"
                logger.error("spool recovery: unreadable unindexed file %s (%s): moved to %s",
                             path, exc, target)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
                continue
            logger.warning("spool recovery: indexing %s again (its index entry was lost)", path)
            self.index.add(record, calling_aet="")
            studies.add(record.study_instance_uid)
        return studies

    def close(self, clean: bool = False) -> None:
        """Stop the file pool (its unused files are deleted) and close the index; ``clean``: no
        write is in flight, so the next :meth:`recover` may skip its walk over every file
        (linear in the spool size)."""
        self.file_pool.close()
        self.index.close()
        if clean:
            write_durably(self.root / CLEAN_MARKER, b"clean shutdown\n", self.root,
                          sync=self.sync)

    def study_dir(self, study_instance_uid: str) -> Path:
        """The directory holding a study's series directories."""
        if not is_valid_uid(study_instance_uid):
            raise IngestError(f"invalid Study Instance UID {study_instance_uid!r}")
        return self.studies_dir / study_instance_uid

    def incoming(self, header: bytes = b"", max_bytes: int = 2**62,
                 hashed: bool = True) -> Incoming:
        """A new :class:`Incoming` instance file, starting with ``header`` (Part 10 meta).

        Raises
        ------
        OSError
            The temporary file could not be created.
        """
        return Incoming(self.incoming_dir, self.sync, header, max_bytes, hashed, self.file_pool)

    def store(
        self,
        data: bytes | Sequence[bytes],
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        calling_aet: str = "",
    ) -> StoreOutcome:
        """Write one Part 10 file durably and index it; the study becomes pending.

        ``data``: the file's bytes, or parts written one after the other (never joined in
        memory). ``calling_aet`` (the sender) selects the study's stable-time rule.

        Raises
        ------
        IngestError
            A UID is malformed (it would not be a safe path component).
        OSError, sqlite3.Error
            The file or the index could not be written.
        """
        incoming = self.incoming()
        try:
            for part in [data] if isinstance(data, bytes) else data:
                incoming.write(part)
            incoming.finish()
        except BaseException:
            incoming.discard()
            raise
        return self.commit(incoming, study_instance_uid, series_instance_uid,
                           sop_instance_uid, sop_class_uid, calling_aet)

    def commit(self, incoming: Incoming, study_instance_uid: str, series_instance_uid: str,
               sop_instance_uid: str, sop_class_uid: str, calling_aet: str = "",
               sha256: str | None = None) -> StoreOutcome:
        """Move a finished :class:`Incoming` file into place and index it (see :meth:`store`).

        ``sha256``: the hash of the file's bytes, for an :class:`Incoming` made without
        hashing. Waits until the file is synced. The temporary file is gone afterwards,
        whatever the outcome (renamed, or deleted for a duplicate or a failure).

        Raises
        ------
        IngestError
            A UID is malformed (it would not be a safe path component).
        OSError, sqlite3.Error
            The file could not be written, synced or moved, or the index not updated.
        """
        try:
            return self._commit(incoming, study_instance_uid, series_instance_uid,
                                sop_instance_uid, sop_class_uid, calling_aet, sha256)
        finally:
            incoming.discard()

    def _commit(self, incoming: Incoming, study_instance_uid: str, series_instance_uid: str,
                sop_instance_uid: str, sop_class_uid: str, calling_aet: str,
                sha256: str | None) -> StoreOutcome:
        for name, uid in [
            ("Study Instance UID", study_instance_uid),
            ("Series Instance UID", series_instance_uid),
            ("SOP Instance UID", sop_instance_uid),
        ]:
            if not is_valid_uid(uid):  # only such UIDs become path components: no traversal
                raise IngestError(f"invalid {name} {uid!r}")
        path = self.studies_dir / study_instance_uid / series_instance_uid
        path = path / f"{sop_instance_uid}.dcm"
        old = self.index.instance(sop_instance_uid)
        incoming.wait()
        digest, size = sha256 or incoming.sha256, incoming.size
        if old is not None and old.sha256 == digest and old.path == path and path.exists():
            return StoreOutcome.DUPLICATE
        _ensure_dir(path.parent, self.studies_dir, self.sync)
        incoming.move_to(path)
        if self.sync:
            _fsync_dir(path.parent)
        record = InstanceRecord(sop_instance_uid, study_instance_uid, series_instance_uid,
                                sop_class_uid, path, size, digest, time.time())
        self.index.add(record, calling_aet)
        if old is None:
            return StoreOutcome.STORED
        if old.path != path:
            # Same SOP instance now filed under another study/series: drop the stale copy.
            old.path.unlink(missing_ok=True)
        return StoreOutcome.REPLACED

    # The index's queries, so callers need only the spool.
    def instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        """The indexed instance with this SOP Instance UID, if any."""
        return self.index.instance(sop_instance_uid)

    def instances(self, study_instance_uid: str) -> list[InstanceRecord]:
        """Every indexed instance of a study, by series then SOP Instance UID."""
        return self.index.instances(study_instance_uid)

    def study(self, study_instance_uid: str) -> StudyRecord | None:
        """The index entry of a study, if any."""
        return self.index.study(study_instance_uid)

    def studies(self, state: StudyState | None = None) -> list[StudyRecord]:
        """All studies, or those in ``state``, oldest activity first."""
        return self.index.studies(state)

    def set_state(self, study_instance_uid: str, state: StudyState, *,
                  expect: StudyState | None = None, error: str = "") -> bool:
        """Move a study to ``state`` (only from ``expect`` if given); True if it moved.

        The compare-and-set keeps a study that received new instances during processing
        pending instead of marking it done.
        """
        return self.index.set_state(study_instance_uid, state, expect=expect, error=error)


def read_instance_record(path: Path) -> InstanceRecord:
    """The index record of a spool file, read from the file itself (for recovery).

    Raises
    ------
    ValueError
        The file is not a readable DICOM instance with the UIDs an index entry needs.
    """
    data = path.read_bytes()
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for damaged files
        raise ValueError(f"not readable as DICOM: {exc}") from exc
    uids = [str(ds.get(k, "")) for k in
            ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID")]
    if not all(uids) or not all(is_valid_uid(u) for u in uids[:3]):
        raise ValueError("missing or malformed UIDs")
    return InstanceRecord(uids[0], uids[1], uids[2], uids[3], path, len(data),
                          hashlib.sha256(data).hexdigest(), path.stat().st_mtime)


def request_analysis(spool_dir: Path, study_instance_uid: str) -> bool:
    """Ask for a study of the spool to be analysed now (``liver-node analyze --study UID``).

    Safe while the node runs in another process: it only updates the study's entry in the
    index, making it ``pending`` with ``last_received`` 0, which the node's monitor treats as
    complete at its next scan (or, if the node is down, at its next start). A study that is
    queued or processing is left alone.

    Returns
    -------
    bool
        True if the study was marked; False if it is already queued or processing.

    Raises
    ------
    IngestError
        The spool index does not exist or does not know the study.
    """
    index = SQLiteIndex(Path(spool_dir) / INDEX_NAME, create=False)
    try:
        return index.request_analysis(study_instance_uid)
    finally:
        index.close()


def study_record(spool_dir: Path, study_instance_uid: str) -> StudyRecord | None:
    """Read a study's index entry from any process (e.g. the study callback, the CLI).

    ``processed_count > 0`` when the study callback runs means an earlier analysis of this
    study exists (a late-arriving series): the new SR should reference its predecessor.
    """
    index = SQLiteIndex(Path(spool_dir) / INDEX_NAME, create=False)
    try:
        return index.study(study_instance_uid)
    finally:
        index.close()
