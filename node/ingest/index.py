"""The spool's index of instances and studies: one small interface, SQLite behind it.

The files in the spool are the truth; the index makes them findable and carries each study's
state. :class:`SpoolIndex` is all the rest of the node uses, so a site with many nodes or very
large archives can put another database (e.g. PostgreSQL) behind it. :class:`SQLiteIndex` is the
default: one file, WAL journal, many reader processes and one writer.

Durability: the index runs with ``synchronous=NORMAL``. A commit survives a crash of the node
(kill -9) at once; after a power loss the last commits may be missing, never half-applied.
That loses no instance, because an instance file is fsync'ed before it is indexed and
:meth:`node.ingest.spool.Spool.recover` indexes again every file the index does not know; a
study whose last state change was lost is analysed again (at-least-once; output UIDs are
deterministic, so the archive gets no duplicates).
"""

from __future__ import annotations

import enum
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from node.errors import IngestError

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
_STUDY_COLUMNS = "study_instance_uid, state, last_received, processed_count, error, calling_aet"


class StudyState(enum.Enum):
    """Where a study is in its life cycle in the node."""

    PENDING = "pending"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


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


class SpoolIndex(Protocol):
    """What the node needs from an index; every method is safe to call from many threads."""

    def add(self, record: InstanceRecord, calling_aet: str) -> None:
        """Index (or re-index) an instance and make its study pending, atomically."""

    def instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        """The instance with this SOP Instance UID, if indexed."""

    def instances(self, study_instance_uid: str) -> list[InstanceRecord]:
        """A study's instances, by series then SOP Instance UID."""

    def indexed_paths(self) -> set[str]:
        """The file paths of every indexed instance (for recovery)."""

    def study(self, study_instance_uid: str) -> StudyRecord | None:
        """A study's record, if any."""

    def studies(self, state: StudyState | None = None) -> list[StudyRecord]:
        """All studies, or those in ``state``, oldest activity first."""

    def set_state(self, study_instance_uid: str, state: StudyState, *,
                  expect: StudyState | None = None, error: str = "") -> bool:
        """Move a study to ``state`` (only from ``expect`` if given); True if it moved.
        DONE and FAILED count one more analysis of the study."""

    def request_analysis(self, study_instance_uid: str) -> bool:
        """Make a study complete at once unless it is queued or processing; True if marked.
        Raises IngestError if the study is unknown."""

    def requeue_interrupted(self) -> list[str]:
        """Studies left queued or processing by a stop: back to pending and complete at once.
        Returns their UIDs."""

    def close(self) -> None:
        """Release the index."""


class SQLiteIndex:
    """:class:`SpoolIndex` in a SQLite file (WAL); other processes may open the same file.

    Parameters
    ----------
    path:
        The database file; created with the schema if missing unless ``create`` is False.
    create:
        False to open an existing index only (the CLI acting on a running node's spool).

    Raises
    ------
    IngestError
        ``create`` is False and there is no index at ``path``.
    """

    def __init__(self, path: Path, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise IngestError(f"no spool index at {self.path}")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # see the module docstring
        if create:
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(studies)")}
            if "calling_aet" not in columns:  # spools made before per-AE stable times
                self._db.execute(
                    "ALTER TABLE studies ADD COLUMN calling_aet TEXT NOT NULL DEFAULT ''")

    def add(self, record: InstanceRecord, calling_aet: str) -> None:
        r = record
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
        row = self._one("SELECT * FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,))
        return None if row is None else _instance(row)

    def instances(self, study_instance_uid: str) -> list[InstanceRecord]:
        rows = self._all("SELECT * FROM instances WHERE study_instance_uid=?"
                         " ORDER BY series_instance_uid, sop_instance_uid", (study_instance_uid,))
        return [_instance(r) for r in rows]

    def indexed_paths(self) -> set[str]:
        return {str(r[0]) for r in self._all("SELECT path FROM instances", ())}

    def study(self, study_instance_uid: str) -> StudyRecord | None:
        row = self._one(f"SELECT {_STUDY_COLUMNS} FROM studies WHERE study_instance_uid=?",
                        (study_instance_uid,))
        return None if row is None else _study(row)

    def studies(self, state: StudyState | None = None) -> list[StudyRecord]:
        query = f"SELECT {_STUDY_COLUMNS} FROM studies"
        args: tuple[str, ...] = ()
        if state is not None:
            query, args = query + " WHERE state=?", (state.value,)
        return [_study(r) for r in self._all(query + " ORDER BY last_received", args)]

    def set_state(self, study_instance_uid: str, state: StudyState, *,
                  expect: StudyState | None = None, error: str = "") -> bool:
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

    def request_analysis(self, study_instance_uid: str) -> bool:
        if self.study(study_instance_uid) is None:
            raise IngestError(f"study {study_instance_uid} is not in the spool index {self.path}")
        with self._lock:
            cur = self._db.execute(
                "UPDATE studies SET state=?, last_received=0, updated_at=?"
                " WHERE study_instance_uid=? AND state NOT IN (?, ?)",
                (StudyState.PENDING.value, time.time(), study_instance_uid,
                 StudyState.QUEUED.value, StudyState.PROCESSING.value),
            )
        return cur.rowcount == 1

    def requeue_interrupted(self) -> list[str]:
        busy = (StudyState.QUEUED.value, StudyState.PROCESSING.value)
        with self._lock:
            rows = self._db.execute(
                "SELECT study_instance_uid FROM studies WHERE state IN (?, ?)", busy).fetchall()
            self._db.execute(
                "UPDATE studies SET state=?, last_received=0, updated_at=? WHERE state IN (?, ?)",
                (StudyState.PENDING.value, time.time(), *busy))
        return [str(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, query: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
        with self._lock:
            row: tuple[Any, ...] | None = self._db.execute(query, args).fetchone()
        return row

    def _all(self, query: str, args: tuple[object, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(query, args).fetchall())


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
