"""The durable spool: instance files on disk plus a SQLite (WAL) index of instances and studies.

Layout: ``<spool_dir>/studies/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
(DICOM Part 10 files, PS3.10) and ``<spool_dir>/index.sqlite3``. A file is written to a temporary
name in its final directory, fsync'ed, renamed over the final name and the directory fsync'ed,
then indexed; only then is the instance acknowledged, so an acknowledged instance survives a
crash or power loss.

Study states: ``pending`` (receiving; becomes complete after ``stable_seconds`` of silence),
``queued``, ``processing``, ``done``, ``failed``. Any new instance puts a study back to
``pending``, so a study that grows after it was processed is processed again.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import IngestError

logger = logging.getLogger(__name__)

# PS3.5 9.1: a UID is at most 64 characters of digits and dots, components without leading
# zeros. Only such strings become path components, which also rules out path traversal.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    last_received REAL NOT NULL,
    processed_count INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
"""


class StudyState(enum.Enum):
    """Where a study is in its life cycle in the node."""

    PENDING = "pending"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class StoreOutcome(enum.Enum):
    """What :meth:`Spool.store` did with an instance."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: nothing changed
    REPLACED = "replaced"  # same SOP Instance UID, different bytes: the new one wins


@dataclass(frozen=True)
class InstanceRecord:
    """One indexed instance."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    path: Path
    size: int
    sha256: str
    received_at: float


@dataclass(frozen=True)
class StudyRecord:
    """One indexed study."""

    study_instance_uid: str
    state: StudyState
    last_received: float
    processed_count: int  # analyses already run: > 0 means this is a late arrival
    error: str
    calling_aet: str = ""  # who sent the last instance (selects the stable-time rule)


def is_valid_uid(uid: str) -> bool:
    """True if ``uid`` is a well-formed DICOM UID (PS3.5 9.1)."""
    return len(uid) <= 64 and _UID_RE.match(uid) is not None


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
    path.mkdir(parents=True, exist_ok=True)
    for created in missing:
        _fsync_dir(created.parent)


def write_durably(path: Path, data: bytes | Sequence[bytes], root: Path) -> None:
    """Write ``data`` (bytes, or parts written one after the other, never joined in memory)
    to ``path`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    _make_dirs_durable(path.parent, root)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            for part in [data] if isinstance(data, bytes) else data:
                view = memoryview(part)
                while view:  # unbuffered: no copy through a Python buffer
                    view = view[os.write(fd, view):]
            # fdatasync also flushes the size, all that reading the data back needs (POSIX).
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class Spool:
    """Durable instance store with a SQLite index; safe to use from many threads.

    Parameters
    ----------
    root:
        The spool directory; created if missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.studies_dir = self.root / "studies"
        self.studies_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.root / "index.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the C-STORE response goes out.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(studies)")}
        if "calling_aet" not in columns:  # spools made before per-AE stable times
            self._db.execute("ALTER TABLE studies ADD COLUMN calling_aet TEXT NOT NULL DEFAULT ''")

    def recover(self) -> list[str]:
        """Make the spool consistent after a stop or crash; call once, before serving.

        Temporary files of writes that never finished are deleted (they were never
        acknowledged), and studies that were ``queued`` or ``processing`` become ``pending``
        with ``last_received`` 0, so they are processed again at once (at-least-once; output
        UIDs are derived deterministically, so a re-run adds no duplicates to the archive).

        Returns
        -------
        list of str
            The Study Instance UIDs that were interrupted.
        """
        for tmp in self.studies_dir.glob("*/*/.*.tmp"):
            logger.warning("spool recovery: removing unfinished write %s", tmp)
            tmp.unlink(missing_ok=True)
        with self._lock:
            rows = self._db.execute(
                "SELECT study_instance_uid FROM studies WHERE state IN (?, ?)",
                (StudyState.QUEUED.value, StudyState.PROCESSING.value),
            ).fetchall()
            self._db.execute(
                "UPDATE studies SET state=?, last_received=0, updated_at=? WHERE state IN (?, ?)",
                (StudyState.PENDING.value, time.time(), StudyState.QUEUED.value,
                 StudyState.PROCESSING.value),
            )
        interrupted = [str(r[0]) for r in rows]
        for uid in interrupted:
            logger.warning("spool recovery: study %s was interrupted, processing it again", uid)
        return interrupted

    def close(self) -> None:
        """Close the index."""
        with self._lock:
            self._db.close()

    def study_dir(self, study_instance_uid: str) -> Path:
        """The directory holding a study's series directories."""
        if not is_valid_uid(study_instance_uid):
            raise IngestError(f"invalid Study Instance UID {study_instance_uid!r}")
        return self.studies_dir / study_instance_uid

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

        ``calling_aet`` (the sender) selects the study's stable-time rule.

        Raises
        ------
        IngestError
            A UID is malformed (it would not be a safe path component).
        OSError, sqlite3.Error
            The file or the index could not be written.
        """
        for name, uid in [
            ("Study Instance UID", study_instance_uid),
            ("Series Instance UID", series_instance_uid),
            ("SOP Instance UID", sop_instance_uid),
        ]:
            if not is_valid_uid(uid):
                raise IngestError(f"invalid {name} {uid!r}")
        parts = [data] if isinstance(data, bytes) else list(data)
        sha = hashlib.sha256()
        for part in parts:
            sha.update(part)
        digest, size = sha.hexdigest(), sum(len(part) for part in parts)
        path = self.studies_dir / study_instance_uid / series_instance_uid
        path = path / f"{sop_instance_uid}.dcm"
        old = self.instance(sop_instance_uid)
        if old is not None and old.sha256 == digest and old.path == path and path.exists():
            return StoreOutcome.DUPLICATE
        write_durably(path, parts, self.studies_dir)
        record = InstanceRecord(sop_instance_uid, study_instance_uid, series_instance_uid,
                                sop_class_uid, path, size, digest, time.time())
        self._index(record, calling_aet)
        if old is None:
            return StoreOutcome.STORED
        if old.path != path:
            # Same SOP instance now filed under another study/series: drop the stale copy.
            old.path.unlink(missing_ok=True)
        return StoreOutcome.REPLACED

    def _index(self, r: InstanceRecord, calling_aet: str) -> None:
        """Index one written instance and make its study pending, in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (r.sop_instance_uid, r.study_instance_uid, r.series_instance_uid,
                     r.sop_class_uid, str(r.path), r.size, r.sha256, r.received_at),
                )
                self._db.execute(
                    "INSERT INTO studies (study_instance_uid, state, last_received, updated_at,"
                    " calling_aet) VALUES (?, ?, ?, ?, ?) ON CONFLICT (study_instance_uid)"
                    " DO UPDATE SET state=excluded.state, last_received=excluded.last_received,"
                    " updated_at=excluded.updated_at, calling_aet=excluded.calling_aet",
                    (r.study_instance_uid, StudyState.PENDING.value, r.received_at,
                     r.received_at, calling_aet),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        """The indexed instance with this SOP Instance UID, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)
            ).fetchone()
        return None if row is None else _instance(row)

    def instances(self, study_instance_uid: str) -> list[InstanceRecord]:
        """Every indexed instance of a study, by series then SOP Instance UID."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM instances WHERE study_instance_uid=?"
                " ORDER BY series_instance_uid, sop_instance_uid",
                (study_instance_uid,),
            ).fetchall()
        return [_instance(r) for r in rows]

    def study(self, study_instance_uid: str) -> StudyRecord | None:
        """The index entry of a study, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT study_instance_uid, state, last_received, processed_count, error,"
                " calling_aet FROM studies WHERE study_instance_uid=?",
                (study_instance_uid,),
            ).fetchone()
        return None if row is None else _study(row)

    def studies(self, state: StudyState | None = None) -> list[StudyRecord]:
        """All studies, or those in ``state``, oldest activity first."""
        query = (
            "SELECT study_instance_uid, state, last_received, processed_count, error,"
            " calling_aet FROM studies"
        )
        args: tuple[str, ...] = ()
        if state is not None:
            query += " WHERE state=?"
            args = (state.value,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY last_received", args).fetchall()
        return [_study(r) for r in rows]

    def set_state(
        self,
        study_instance_uid: str,
        state: StudyState,
        *,
        expect: StudyState | None = None,
        error: str = "",
    ) -> bool:
        """Move a study to ``state`` (only from ``expect`` if given); True if it moved.

        The compare-and-set keeps a study that received new instances during processing
        pending instead of marking it done.
        """
        query = "UPDATE studies SET state=?, error=?, updated_at=?"
        args: list[object] = [state.value, error, time.time()]
        if state in (StudyState.DONE, StudyState.FAILED):
            query += ", processed_count=processed_count+1"
        query += " WHERE study_instance_uid=?"
        args.append(study_instance_uid)
        if expect is not None:
            query += " AND state=?"
            args.append(expect.value)
        with self._lock:
            cur = self._db.execute(query, args)
        return cur.rowcount == 1


def _instance(row: tuple[Any, ...]) -> InstanceRecord:
    sop, study, series, sop_class, path, size, digest, received = row
    return InstanceRecord(
        str(sop), str(study), str(series), str(sop_class), Path(str(path)),
        int(size), str(digest), float(received),
    )


def _study(row: tuple[Any, ...]) -> StudyRecord:
    uid, state, last, count, error, calling_aet = row
    return StudyRecord(
        str(uid), StudyState(state), float(last), int(count), str(error), str(calling_aet)
    )


def request_analysis(spool_dir: Path, study_instance_uid: str) -> bool:
    """Ask for a study of the spool to be analysed now (``liver-node analyze --study UID``).

    Safe while the node runs in another process: it only updates the study's row in the WAL
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
    index = Path(spool_dir) / "index.sqlite3"
    if not index.is_file():
        raise IngestError(f"no spool index at {index}")
    db = sqlite3.connect(index, isolation_level=None, timeout=30.0)
    try:
        row = db.execute(
            "SELECT state FROM studies WHERE study_instance_uid=?", (study_instance_uid,)
        ).fetchone()
        if row is None:
            raise IngestError(f"study {study_instance_uid} is not in the spool {spool_dir}")
        cur = db.execute(
            "UPDATE studies SET state=?, last_received=0, updated_at=?"
            " WHERE study_instance_uid=? AND state NOT IN (?, ?)",
            (StudyState.PENDING.value, time.time(), study_instance_uid,
             StudyState.QUEUED.value, StudyState.PROCESSING.value),
        )
        return cur.rowcount == 1
    finally:
        db.close()


def study_record(spool_dir: Path, study_instance_uid: str) -> StudyRecord | None:
    """Read a study's index entry from any process (e.g. the study callback, the CLI).

    ``processed_count > 0`` when the study callback runs means an earlier analysis of this
    study exists (a late-arriving series): the new SR should reference its predecessor.
    """
    index = Path(spool_dir) / "index.sqlite3"
    if not index.is_file():
        raise IngestError(f"no spool index at {index}")
    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=30.0)
    try:
        row = db.execute(
            "SELECT study_instance_uid, state, last_received, processed_count, error,"
            " calling_aet FROM studies WHERE study_instance_uid=?",
            (study_instance_uid,),
        ).fetchone()
    finally:
        db.close()
    return None if row is None else _study(row)
