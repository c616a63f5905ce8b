"""Opening the registry's SQLite files (hub.registry.sqlite_files) while another connection
holds the new file: workers starting together, a CLI beside a starting hub."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from hub.registry.schema import MIGRATIONS
from hub.registry.sqlite_files import open_database

pytestmark = pytest.mark.unit

HOLD_S = 0.3


def test_opening_waits_for_a_writer_holding_a_new_file(tmp_path: Path) -> None:
    """A file not yet in WAL mode, its write lock held by another connection: switching
    to WAL is refused at once by SQLite (no busy handler), so the open must wait for the
    lock itself rather than fail with "database is locked" (a worker of two started at
    once died of it)."""
    path = tmp_path / "registry.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE placeholder (x)")
    holder.execute("BEGIN IMMEDIATE")
    released = threading.Timer(HOLD_S, lambda: holder.execute("ROLLBACK"))
    started = time.monotonic()
    released.start()
    try:
        db = open_database(path, MIGRATIONS, busy_timeout_s=10.0)
    finally:
        released.join()
        holder.close()
    waited_s = time.monotonic() - started
    try:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
    finally:
        db.close()
    assert waited_s >= HOLD_S * 0.9


def test_opening_still_gives_up_after_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE placeholder (x)")
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            open_database(path, MIGRATIONS, busy_timeout_s=0.2)
        assert time.monotonic() - started >= 0.2
    finally:
        holder.execute("ROLLBACK")
        holder.close()
