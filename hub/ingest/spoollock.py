"""One process per spool directory: an exclusive `flock` on `.lock` inside it.

Whoever writes or replays a spool holds its lock for as long as it has the spool open: the
hub (or one worker slot, `STATE_DIR/workers/K/spool`) from start to stop, `hub spool replay`
while it replays. A second process gets `SpoolInUse` naming the holder's pid, read from the
kernel's table of locks. The kernel drops a `flock` when its holder dies, however it dies,
so a crashed hub never leaves a stale lock behind. The file stays empty: the spool's size
is its segments'.

A lock file is never deleted: deleting it while another process waits to lock it would let
two processes each lock a different file of the same name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

from hub.errors import SpoolInUse

LOCK_NAME = ".lock"


class SpoolLock:
    """The held lock of one spool directory; `release` (or the process's end) frees it."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        # A file object, not a bare descriptor: a lock forgotten unreleased is freed when its
        # object is collected, not when the process ends.
        handle: IO[str] = open(  # noqa: SIM115 (held for the lock's lifetime)
            os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), "r+"
        )
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SpoolInUse(str(directory), holder_of(directory)) from None
        except BaseException:
            handle.close()
            raise
        self._handle: IO[str] | None = handle

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._handle is not None

    def release(self) -> None:
        """Let another process take the spool."""
        if self._handle is not None:
            self._handle.close()  # closing the file releases the flock
            self._handle = None


def holder_of(directory: Path, locks: Path = Path("/proc/locks")) -> int | None:
    """The pid of the live process holding `directory`'s lock, or None when none does.

    Read from the kernel's table of locks, without touching the lock: a status command
    probing it could make a hub starting at that moment fail to take its spool."""
    try:
        status = (directory / LOCK_NAME).stat()
        table = locks.read_text()
    except OSError:
        return None
    return holder_in(table, os.major(status.st_dev), os.minor(status.st_dev), status.st_ino)


def holder_in(table: str, major: int, minor: int, inode: int) -> int | None:
    """The pid holding a `flock` on the file (major, minor, inode), by the lines of
    /proc/locks (`1: FLOCK ADVISORY WRITE 1234 08:01:5678 0 EOF`). Pure."""
    wanted = f"{major:02x}:{minor:02x}:{inode}"
    for line in table.splitlines():
        fields = line.split()
        # A waiter's line starts "1: -> FLOCK ...": it holds nothing.
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            with contextlib.suppress(ValueError):
                return int(fields[4])
    return None
