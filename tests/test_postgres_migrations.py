"""The PostgreSQL schema's migration runner, against a real PostgreSQL 15."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import asyncpg
import pytest

from device_sim.servers.postgres import PostgresDatabase
from hub.registry.postgres.migrations import (
    MIGRATION_LOCK_KEY,
    Migration,
    MigrationError,
    bundled_migrations,
    check_sequence,
    migrate,
)

pytestmark = pytest.mark.integration

RUNNERS = 8
PROCESS_RUNNERS = 4
PROCESS_TIMEOUT_S = 60.0
WAIT_S = 30.0
REGISTRY_TABLES = {
    "changes",
    "change_seq",
    "connections",
    "device_counters",
    "devices",
    "nodes",
    "retired_tokens",
    "schema_migrations",
}

# What the catalog says about the schema: every column of every table, every index and
# function. Two runs that leave these equal left the same schema.
_SCHEMA_SHAPE = """
SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'index ' || indexname || ' ' || indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'function ' || p.proname FROM pg_proc AS p
JOIN pg_namespace AS n ON n.oid = p.pronamespace WHERE n.nspname = 'public'
UNION ALL
SELECT 'trigger ' || tgname FROM pg_trigger WHERE NOT tgisinternal
ORDER BY 1
"""


async def _shape(conn: asyncpg.Connection) -> list[str]:
    return [row[0] for row in await conn.fetch(_SCHEMA_SHAPE)]


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row[0] for row in rows}


def test_bundled_files_are_numbered_from_one_without_gaps() -> None:
    """The package ships its SQL files, found by importlib.resources, numbered 1..N."""
    migrations = bundled_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "registry"
    assert all(m.sql.strip() for m in migrations)


def test_a_gap_or_a_repeat_in_the_numbers_is_refused() -> None:
    """Versions 1, 3 or 1, 1 are refused before anything touches a database."""
    one, three = Migration(1, "a", "SELECT 1"), Migration(3, "c", "SELECT 3")
    with pytest.raises(MigrationError, match="without gaps"):
        check_sequence([one, three])
    with pytest.raises(MigrationError, match="without gaps"):
        check_sequence([one, one])
    assert check_sequence([Migration(2, "b", "SELECT 2"), one])[0] is one


async def test_migrating_an_empty_database_creates_the_schema(pg: asyncpg.Connection) -> None:
    """From nothing, every file is applied once and recorded with its checksum."""
    result = await migrate(pg)
    migrations = bundled_migrations()
    assert result.applied == tuple(m.version for m in migrations)
    assert result.version == len(migrations)
    assert await _tables(pg) == REGISTRY_TABLES
    rows = await pg.fetch("SELECT version, name, checksum FROM schema_migrations ORDER BY 1")
    assert [(r["version"], r["name"], r["checksum"]) for r in rows] == [
        (m.version, m.name, m.checksum) for m in migrations
    ]


async def test_running_again_is_a_no_op(pg: asyncpg.Connection) -> None:
    """A second run applies nothing and leaves the schema exactly as it was."""
    await migrate(pg)
    before = await _shape(pg)
    applied_at = await pg.fetch("SELECT applied_at FROM schema_migrations ORDER BY version")
    again = await migrate(pg)
    assert again.applied == ()
    assert await _shape(pg) == before
    assert await pg.fetch("SELECT applied_at FROM schema_migrations ORDER BY version") == applied_at


async def test_concurrent_runners_on_one_database_apply_each_file_once(
    postgres_db: PostgresDatabase,
) -> None:
    """Several connections migrating at once: no error, each file applied by exactly one."""
    conns = [await postgres_db.connect() for _ in range(RUNNERS)]
    try:
        results = await asyncio.gather(*(migrate(conn) for conn in conns))
        applied = sorted(v for result in results for v in result.applied)
        assert applied == [m.version for m in bundled_migrations()]
        assert {result.version for result in results} == {len(bundled_migrations())}
        count = await conns[0].fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(bundled_migrations())
        assert await _tables(conns[0]) == REGISTRY_TABLES
    finally:
        await asyncio.gather(*(conn.close() for conn in conns))


_RUN_ONE = """
import asyncio, sys
import asyncpg
from hub.registry.postgres.migrations import migrate

async def main() -> None:
    conn = await asyncpg.connect(sys.argv[1])
    try:
        result = await migrate(conn)
    finally:
        await conn.close()
    print(",".join(map(str, result.applied)))

asyncio.run(main())
"""


def test_concurrent_processes_apply_each_file_once(postgres_db: PostgresDatabase) -> None:
    """Several hub processes starting at once end with one schema and no error."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RUN_ONE, postgres_db.dsn],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESS_RUNNERS)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=PROCESS_TIMEOUT_S)
        assert proc.returncode == 0, err
        outputs.append(out.strip())
    applied = sorted(int(v) for out in outputs for v in out.split(",") if v)
    assert applied == [m.version for m in bundled_migrations()]
    tables = postgres_db.server.psql(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'", postgres_db.name
    )
    assert set(tables.split()) == REGISTRY_TABLES


async def test_a_failing_file_leaves_nothing_behind(pg: asyncpg.Connection) -> None:
    """A file that fails halfway is rolled back whole and not recorded; a fixed one applies."""
    first = Migration(1, "first", "CREATE TABLE first_table (id int)")
    broken = Migration(2, "second", "CREATE TABLE half_done (id int); SELECT no_such_column")
    with pytest.raises(MigrationError, match=r"0002_second\.sql failed"):
        await migrate(pg, [first, broken])
    assert await _tables(pg) == {"first_table", "schema_migrations"}
    assert await pg.fetchval("SELECT array_agg(version) FROM schema_migrations") == [1]
    fixed = Migration(2, "second", "CREATE TABLE half_done (id int)")
    assert (await migrate(pg, [first, fixed])).applied == (2,)
    assert await _tables(pg) == {"first_table", "half_done", "schema_migrations"}


async def test_an_applied_file_that_changed_is_refused(pg: asyncpg.Connection) -> None:
    """Editing a file after it was applied is an error, not a silent skip."""
    await migrate(pg, [Migration(1, "first", "CREATE TABLE t (id int)")])
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(pg, [Migration(1, "first", "CREATE TABLE t (id bigint)")])


async def test_a_database_from_a_newer_hub_is_refused(pg: asyncpg.Connection) -> None:
    """A hub that does not know every applied version refuses to run on that schema."""
    one = Migration(1, "first", "CREATE TABLE t (id int)")
    two = Migration(2, "second", "CREATE TABLE u (id int)")
    await migrate(pg, [one, two])
    with pytest.raises(MigrationError, match=r"versions \[2\].*upgrade this one"):
        await migrate(pg, [one])


async def test_waiting_for_the_lock_is_bounded(postgres_db: PostgresDatabase) -> None:
    """A runner gives up with a clear error when another holds the lock past the bound."""
    holder, waiter = await postgres_db.connect(), await postgres_db.connect()
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        with pytest.raises(MigrationError, match="held the schema migration lock"):
            await migrate(waiter, lock_timeout_s=0.3)
        assert await _tables(waiter) == set()
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        assert (await migrate(waiter, lock_timeout_s=0.3)).version == len(bundled_migrations())
    finally:
        await holder.close()
        await waiter.close()


async def test_the_lock_is_released_after_a_failure(pg: asyncpg.Connection) -> None:
    """A failed run leaves no advisory lock behind for the next hub to wait on."""
    with pytest.raises(MigrationError):
        await migrate(pg, [Migration(1, "bad", "SELECT no_such_column")])
    held = await pg.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
    )
    assert held == 0


async def test_a_runner_that_dies_holding_the_lock_does_not_block_the_next(
    postgres_db: PostgresDatabase,
) -> None:
    """The lock is the session's: a hub whose connection dies mid-migration frees it."""
    holder, waiter, admin = [await postgres_db.connect() for _ in range(3)]
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        await holder.execute("BEGIN; CREATE TABLE half_done (id int)")
        running = asyncio.ensure_future(migrate(waiter, lock_timeout_s=WAIT_S))
        tried = (
            "SELECT count(*) > 0 FROM pg_stat_activity"
            " WHERE pid = $1 AND query LIKE '%pg_try_advisory_lock%'"
        )
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while not await admin.fetchval(tried, waiter.get_server_pid()):
            assert asyncio.get_running_loop().time() < deadline, "the runner never tried the lock"
            await asyncio.sleep(0.02)
        assert not running.done()
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", holder.get_server_pid())
        result = await asyncio.wait_for(running, WAIT_S)
        assert result.applied == tuple(m.version for m in bundled_migrations())
        assert "half_done" not in await _tables(admin)
    finally:
        holder.terminate()
        await waiter.close()
        await admin.close()
