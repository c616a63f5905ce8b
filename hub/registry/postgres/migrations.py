"""Create and upgrade the registry's PostgreSQL schema from the numbered SQL files beside this.

`migrations/NNNN_name.sql` are applied in number order, each in its own transaction together
with its row in `schema_migrations` (version, name, SHA-256 of the file): a file that fails
leaves nothing behind, and a file applied once is never applied again. Several hubs starting
at once take turns through one session-level advisory lock, so exactly one of them applies
what is missing and the others find it done. An applied file whose text changed since, or a
database that has versions this hub does not know (a newer hub migrated it), is an error
rather than a guess.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass
from importlib import resources

import asyncpg

from hub.errors import RegistryError

# pg_advisory_lock takes a bigint: the first 8 bytes of a hash of a name no one else uses.
MIGRATION_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"sensor-hub schema migrations").digest()[:8], "big", signed=True
)
LOCK_TIMEOUT_S = 60.0
_LOCK_POLL_S = 0.05
_FILE_NAME = re.compile(r"(?P<version>[0-9]{4})_(?P<name>[a-z0-9_]+)\.sql")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RegistryError):
    """The schema cannot be brought to this hub's version; the message says why."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text, stored when applied and compared on every start."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """What one run did: the versions it applied (often none) and the schema's version now."""

    applied: tuple[int, ...]
    version: int


def bundled_migrations() -> list[Migration]:
    """The SQL files shipped in the package, checked to be numbered 1, 2, 3... without gaps."""
    folder = resources.files("hub.registry.postgres").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.fullmatch(entry.name)
        if match is None:
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match["version"]), match["name"], entry.read_text("utf-8")))
    return check_sequence(found)


def check_sequence(migrations: list[Migration]) -> list[Migration]:
    """Return `migrations` in order if their versions are exactly 1..N, else raise."""
    ordered = sorted(migrations, key=lambda m: m.version)
    versions = [m.version for m in ordered]
    if versions != list(range(1, len(ordered) + 1)):
        raise MigrationError(f"migration versions must be 1..N without gaps, found {versions}")
    return ordered


async def migrate(
    conn: asyncpg.Connection,
    migrations: list[Migration] | None = None,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
) -> MigrationResult:
    """Bring the database `conn` is connected to up to the newest migration; safe to race."""
    wanted = check_sequence(migrations if migrations is not None else bundled_migrations())
    await _lock(conn, lock_timeout_s)
    try:
        await conn.execute(_CREATE_TABLE)
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        done = {int(row["version"]): str(row["checksum"]) for row in rows}
        _check_applied(done, wanted)
        applied = []
        for migration in wanted:
            if migration.version in done:
                continue
            async with conn.transaction():
                try:
                    await conn.execute(migration.sql)
                except asyncpg.PostgresError as exc:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name}.sql failed: {exc}"
                    ) from exc
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied.append(migration.version)
        return MigrationResult(tuple(applied), len(wanted))
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


def _check_applied(done: dict[int, str], wanted: list[Migration]) -> None:
    unknown = sorted(set(done) - {m.version for m in wanted})
    if unknown:
        raise MigrationError(
            f"the database has schema versions {unknown} that this hub does not know "
            f"(it knows 1..{len(wanted)}): a newer hub migrated it; upgrade this one"
        )
    for migration in wanted:
        checksum = done.get(migration.version)
        if checksum is not None and checksum != migration.checksum:
            raise MigrationError(
                f"migration {migration.version:04d}_{migration.name}.sql changed after it "
                "was applied; applied migrations are never edited, add a new one instead"
            )


async def _lock(conn: asyncpg.Connection, timeout_s: float) -> None:
    # A try-lock in a loop rather than pg_advisory_lock: the wait is bounded and says why it
    # gave up, and a cancelled start leaves no lock request queued on the server.
    deadline = time.monotonic() + timeout_s
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_KEY):
        if time.monotonic() > deadline:
            raise MigrationError(
                f"another process held the schema migration lock for over {timeout_s:g} s"
            )
        await asyncio.sleep(_LOCK_POLL_S)
