"""One process per spool (hub.ingest.spoollock): the lock, its holder, and the Spool."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hub.errors import SpoolInUse
from hub.ingest.spool import Spool, read_status
from hub.ingest.spoollock import SpoolLock, holder_in, holder_of

pytestmark = pytest.mark.unit


def test_a_second_lock_on_a_spool_is_refused_naming_the_holder(tmp_path: Path) -> None:
    """While one holds it, another gets SpoolInUse with the holder's pid and the path."""
    first = SpoolLock(tmp_path)
    with pytest.raises(SpoolInUse) as refused:
        SpoolLock(tmp_path)
    assert refused.value.pid == os.getpid()
    assert refused.value.path == str(tmp_path)
    assert f"in use by process {os.getpid()}" in str(refused.value)
    first.release()
    assert not first.held
    SpoolLock(tmp_path).release()  # free again


def test_two_spools_never_share_a_directory(tmp_path: Path) -> None:
    """A Spool holds its directory from open to close: a second one is refused until then."""
    spool = Spool(tmp_path / "spool", max_bytes=2**20)
    spool.append(b"m f=1 1", 1)
    with pytest.raises(SpoolInUse):
        Spool(tmp_path / "spool", max_bytes=2**20)
    assert read_status(tmp_path / "spool").points == 1  # reading needs no lock
    spool.close()
    reopened = Spool(tmp_path / "spool", max_bytes=2**20)
    assert reopened.status().points == 1
    reopened.close()


def test_a_lock_forgotten_unreleased_is_freed_with_its_object(tmp_path: Path) -> None:
    """Dropping the last reference closes the file and so frees the flock."""
    SpoolLock(tmp_path)  # not kept
    SpoolLock(tmp_path).release()


def test_the_holder_is_read_from_the_kernels_table(tmp_path: Path) -> None:
    """holder_of names this process while it holds the lock, and nobody after."""
    assert holder_of(tmp_path) is None  # no lock file yet
    lock = SpoolLock(tmp_path)
    assert holder_of(tmp_path) == os.getpid()
    lock.release()
    assert holder_of(tmp_path) is None


def test_holder_lines_match_device_and_inode_only() -> None:
    """/proc/locks lines: a FLOCK on (major, minor, inode) in hex:hex:decimal; POSIX locks
    and waiters (`->`) hold nothing of ours."""
    table = (
        "1: POSIX  ADVISORY  WRITE 10 fe:00:42 0 EOF\n"
        "2: FLOCK  ADVISORY  WRITE 1234 fe:01:42 0 EOF\n"
        "2: -> FLOCK  ADVISORY  WRITE 99 fe:01:42 0 EOF\n"
        "3: FLOCK  ADVISORY  WRITE 77 fe:01:43 0 EOF\n"
    )
    assert holder_in(table, 254, 1, 42) == 1234
    assert holder_in(table, 254, 0, 42) is None
    assert holder_in(table, 254, 1, 44) is None
