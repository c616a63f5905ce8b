"""Opening the registry's SQLite files: one way for each (pragmas, migrations, mode 0600).

The registry is two files in the state directory: `registry.sqlite3`, which operators
change from the CLI, and `connections.sqlite3`, which only hub processes write (claims:
hub.registry.sqlite_claims). SQLite locks a whole file for a write, so a CLI transaction
holding the first for seconds (`token add --count 10000`) never holds up a handshake's
claim in the second.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def open_database(
    path: Path, migrations: Sequence[str], busy_timeout_s: float
) -> sqlite3.Connection:
    """Open (creating and upgrading if needed) the SQLite file at `path`, built by
    `migrations` (`PRAGMA user_version` counts those it had); mode 0600."""
    # Autocommit mode: every change goes through `transaction`. WAL lets the CLI write
    # while the hub reads.
    db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
    try:
        _switch_to_wal(db, busy_timeout_s)
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        with transaction(db):
            (version,) = db.execute("PRAGMA user_version").fetchone()
            for number, script in enumerate(migrations[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")
        path.chmod(0o600)
    except BaseException:
        db.close()
        raise
    return db


def _switch_to_wal(db: sqlite3.Connection, busy_timeout_s: float) -> None:
    """Put the file in WAL mode (a no-op once it is: the mode is kept in the file).

    Switching takes the file's exclusive lock, and SQLite answers "database is locked" at
    once, without its busy handler, when another connection is switching the same new file
    (workers starting together, a CLI beside a starting hub): so wait here, as the busy
    timeout would, up to `busy_timeout_s`."""
    deadline = time.monotonic() + busy_timeout_s
    pause_s = 0.001
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
        time.sleep(pause_s)
        pause_s = min(pause_s * 2, 0.05)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction (`BEGIN IMMEDIATE`: the file's write lock from the start), rolled
    back on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
