"""An instance on its way into the spool: written as it arrives, synced, then committed.

:class:`Incoming` is the temporary file in ``<spool>/incoming/`` that the listener writes each
network fragment into while the rest arrives; :meth:`node.ingest.spool.Spool.commit` moves it
into place once it is synced and checked. Only the spool makes them
(:meth:`node.ingest.spool.Spool.incoming`), from empty files its :class:`FilePool` made ahead
in ``<spool>/ready/``.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

SYNC_WAIT = 120.0
"""Seconds a commit waits for the network thread to have synced an instance."""


class Incoming:
    """One instance on its way into the spool: a temporary file in ``<spool>/incoming/``.

    The listener appends each network fragment as it arrives (:meth:`write`: written while
    the peer sends the next one) and, after the last, syncs the file on the association's
    network thread (:meth:`finish`) while the handler thread checks the data set and hashes it;
    :meth:`Spool.commit` waits for the sync, then moves the file into place, or :meth:`discard`
    deletes it. It starts with ``header`` (the Part 10 meta information); ``max_bytes`` bounds
    what may follow; ``hashed``: also hash what is written (else the committer passes the
    hash); ``pool``: where the empty file comes from. Made by :meth:`Spool.incoming`.
    """

    def __init__(self, directory: Path, sync: bool, header: bytes, max_bytes: int,
                 hashed: bool, pool: FilePool) -> None:
        fd, self.path = pool.take(directory)
        self._fd: int | None = fd
        self._sync = sync
        self._max_bytes = max_bytes + len(header)
        self._sha = hashlib.sha256() if hashed else None
        self.header = header
        self._finished = threading.Event()
        self.size = 0
        self.error: OSError | None = None
        self.overflow = False  # more than max_bytes arrived: the rest is not written
        self._moved = False
        if header:
            self.write(header)

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``; a failure is kept in :attr:`error` and raised by :meth:`wait`."""
        self.size += len(data)
        if self.size > self._max_bytes:
            self.overflow = True
        if self.overflow or self.error is not None or self._fd is None:
            return
        try:
            write_all(self._fd, [data])
        except OSError as exc:
            self.error = exc
        if self._sha is not None:
            self._sha.update(data)

    def finish(self) -> None:
        """Every part was written: fdatasync them (if the spool syncs); a failure is kept in
        :attr:`error` and raised by :meth:`wait`."""
        try:
            fd = self._fd
            if self._sync and fd is not None and self.error is None and not self.overflow:
                os.fdatasync(fd)
        except OSError as exc:
            self.error = exc
        finally:
            self._finished.set()

    @property
    def sha256(self) -> str:
        """SHA-256 of what was written (only if made ``hashed``)."""
        if self._sha is None:
            raise ValueError(f"{self.path.name} was made without hashing")
        return self._sha.hexdigest()

    def wait(self, timeout: float = SYNC_WAIT) -> None:
        """Until :meth:`finish` is done; raises the write or sync error, if any."""
        if not self._finished.wait(timeout):
            raise OSError(f"{self.path.name} was not synced within {timeout:.0f} s")
        if self.error is not None:
            raise self.error
        if self.overflow:
            raise OSError(f"{self.path.name} exceeds {self._max_bytes} bytes")

    def close(self) -> None:
        """Close the file (it stays, for :meth:`Spool.commit` to rename)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def move_to(self, path: Path) -> None:
        """Close the file and rename it to ``path`` (its final name); :meth:`discard` is a
        no-op afterwards (a new temporary file may have taken the old name by then)."""
        self.close()
        os.replace(self.path, path)
        self._moved = True

    def discard(self) -> None:
        """Close and delete the temporary file (no-op once moved into place)."""
        self.close()
        if not self._moved:
            self.path.unlink(missing_ok=True)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16


def write_all(fd: int, parts: Sequence[bytes | memoryview]) -> None:
    """Write ``parts`` one after the other (``writev``: one system call for most instances)."""
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    while views:
        done = os.writev(fd, views[:_IOV_MAX])
        while views and done >= len(views[0]):
            done -= len(views.pop(0))
        if done:
            views[0] = views[0][done:]


class FilePool:
    """Empty files made ahead of need in ``directory`` by a background thread.

    Creating a file costs 0.2-1.7 ms of kernel time on a busy ext4 file system (the inode
    allocator reads inode table blocks to skip recently deleted inodes; measured with perf on
    the benchmark machine), on the network thread while the peer waits for the response. The
    pool's thread keeps ``size`` files ready; :meth:`take` renames one into the directory
    asked for (no allocation) or, if none is ready, creates one there itself. Files left in
    ``directory`` by a crash are empty and never acknowledged: recovery deletes them.
    """

    def __init__(self, directory: Path, size: int = 8) -> None:
        self.directory = directory
        self.size = size
        self._ready: collections.deque[tuple[int, Path]] = collections.deque()
        self._wanted = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._prefix = f"{os.getpid()}-{secrets.token_hex(4)}-"
        self._counter = itertools.count()

    @property
    def ready(self) -> int:
        """How many files are ready now."""
        with self._wanted:
            return len(self._ready)

    def take(self, directory: Path) -> tuple[int, Path]:
        """An open empty file (descriptor, path) in ``directory``, ``.tmp`` named."""
        with self._wanted:
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._fill, name="FilePool",
                                                daemon=True)
                self._thread.start()
            ready = self._ready.popleft() if self._ready else None
            self._wanted.notify()
        if ready is not None:
            fd, path = ready
            target = directory / path.name
            try:
                os.rename(path, target)
                return fd, target
            except OSError:
                os.close(fd)
                path.unlink(missing_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, suffix=".tmp")
        return fd, Path(name)

    def _fill(self) -> None:
        failing = False
        while True:
            with self._wanted:
                while not self._stopped and len(self._ready) >= self.size:
                    self._wanted.wait()
                if self._stopped:
                    return
            try:
                fd, path = self._create()
            except OSError as exc:  # e.g. no inodes left: take() creates its own
                if not failing:  # once per streak, not every second
                    logger.warning("file pool in %s cannot make files: %s", self.directory, exc)
                failing = True
                with self._wanted:
                    self._wanted.wait(1.0)
                continue
            failing = False
            with self._wanted:
                self._ready.append((fd, path))

    def _create(self) -> tuple[int, Path]:
        """A new empty file in the pool's directory: a counter-based name (tempfile's random
        names cost ~0.1 ms of Python per file, holding the GIL the network thread needs)."""
        while True:
            path = self.directory / f"{self._prefix}{next(self._counter)}.tmp"
            try:
                return os.open(path, _CREATE, 0o600), path
            except FileExistsError:  # left by an earlier process with the same prefix
                continue

    def close(self) -> None:
        """Stop the thread and delete the files not taken."""
        with self._wanted:
            self._stopped = True
            self._wanted.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        while self._ready:
            fd, path = self._ready.popleft()
            os.close(fd)
            path.unlink(missing_ok=True)
