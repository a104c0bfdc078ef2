"""One writer per spool and per database: an exclusive lock taken before anything else.

Two `dipnode serve` processes on one spool or one database would each recover the other's
running jobs at start-up and delete each other's outputs while sending. Each process therefore
takes an exclusive ``fcntl.flock`` on ``<spool_dir>/dipnode.lock`` and on ``<database>.lock``
before it opens, recovers or listens; a second process fails at once with
:class:`NodeLocked`, naming the holder's PID. The kernel drops a flock when its process
exits, so a crash (SIGKILL) never leaves a stale lock behind. The PID written into the file
is for the message only; the lock itself is the flock.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["NodeLocked", "WriterLock"]


class NodeLocked(RuntimeError):
    """Another process holds the spool's or the database's lock."""


class WriterLock:
    """Exclusive locks on the given lock files, held until :meth:`release`."""

    def __init__(self, locks: list[tuple[Path, str]]) -> None:
        """``locks``: (lock file, what it guards, for the message)."""
        self._fds: list[int] = []
        try:
            for path, what in locks:
                self._take(Path(path), what)
        except BaseException:
            self.release()
            raise

    @classmethod
    def for_node(cls, spool_dir: Path, database: Path) -> "WriterLock":
        """The locks of a node: its spool folder and its database file."""
        spool_dir, database = Path(spool_dir), Path(database)
        spool_dir.mkdir(parents=True, exist_ok=True)
        database.parent.mkdir(parents=True, exist_ok=True)
        return cls([(spool_dir / "dipnode.lock", f"spool {spool_dir}"),
                    (database.with_name(database.name + ".lock"), f"database {database}")])

    def _take(self, path: Path, what: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise NodeLocked(f"{what} is already in use by another dipnode (pid {holder}, lock "
                             f"{path}); one node per spool and database") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fds.append(fd)

    def release(self) -> None:
        """Drop the locks (closing the descriptors releases the flocks); idempotent."""
        while self._fds:
            os.close(self._fds.pop())
