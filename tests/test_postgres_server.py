"""The test suite's PostgreSQL launcher: fresh databases, freeze, kill, restart, stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from device_sim.servers.postgres import PostgresDatabase, PostgresServer
from device_sim.servers.processes import kill_tree, process_tree, stop_tree

pytestmark = pytest.mark.integration

# Bounds for what a frozen server must not do and a live one must: far from both sides.
FROZEN_QUERY_WAIT_S = 1.0
ANSWER_WAIT_S = 20.0


async def _settled_states(pid: int, wanted: set[str]) -> dict[int, str]:
    """The tree's process states once they are all in `wanted` (signals land a bit later)."""
    deadline = time.monotonic() + ANSWER_WAIT_S
    while set((states := process_tree(pid)).values()) - wanted:
        assert time.monotonic() < deadline, states
        await asyncio.sleep(0.01)
    return states


async def test_fresh_database_belongs_to_a_non_superuser(pg: asyncpg.Connection) -> None:
    """Each test gets an empty database owned by a login role that is not a superuser."""
    row = await pg.fetchrow(
        "SELECT current_user AS me, current_database() AS db,"
        " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser,"
        " (SELECT pg_get_userbyid(datdba) FROM pg_database"
        "  WHERE datname = current_database()) AS owner,"
        " (SELECT count(*) FROM pg_tables WHERE schemaname = 'public') AS tables"
    )
    assert row["me"].startswith("hub_") and row["db"].startswith("hub_test_")
    assert row["superuser"] is False
    assert row["owner"] == row["me"]
    assert row["tables"] == 0


def test_each_test_gets_its_own_database(postgres_db: PostgresDatabase) -> None:
    """The per-test database exists on the session server while the test runs."""
    names = postgres_db.server.psql("SELECT datname FROM pg_database").split()
    assert postgres_db.name in names


def test_server_runs_as_postgres_in_its_own_process_group(postgres: PostgresServer) -> None:
    """The postmaster leads its own process group and, under root, runs as `postgres`."""
    assert os.getpgid(postgres.pid) == postgres.pid
    uid = Path(f"/proc/{postgres.pid}").stat().st_uid
    if os.geteuid() == 0:
        assert uid != 0
    assert postgres.psql("SELECT setting FROM pg_settings WHERE name = 'listen_addresses'") == (
        "127.0.0.1"
    )


async def test_freeze_stops_every_backend_and_resume_answers_again(
    own_postgres: PostgresServer,
) -> None:
    """pause() freezes the postmaster and its backends: an open connection gets no answer."""
    conn = await asyncpg.connect(own_postgres.dsn())
    try:
        assert await conn.fetchval("SELECT 1") == 1
        own_postgres.pause()
        try:
            states = await _settled_states(own_postgres.pid, {"T"})
            assert len(states) > 2, states  # postmaster, its workers and this backend
            query = asyncio.ensure_future(conn.fetchval("SELECT 2"))
            done, _ = await asyncio.wait({query}, timeout=FROZEN_QUERY_WAIT_S)
            assert not done, "a frozen server answered"
        finally:
            own_postgres.resume()
        started = time.monotonic()
        assert await asyncio.wait_for(query, ANSWER_WAIT_S) == 2
        print(f"query answered {time.monotonic() - started:.3f} s after resume")
    finally:
        await conn.close()


async def test_kill_leaves_no_process_and_restart_keeps_port_and_data(
    own_postgres: PostgresServer,
) -> None:
    """kill() ends the whole group like a crash; restart() recovers on the same port and data."""
    conn = await asyncpg.connect(own_postgres.dsn())
    await conn.execute("CREATE TABLE kept (value text); INSERT INTO kept VALUES ('before')")
    old_pid, port = own_postgres.pid, own_postgres.port
    own_postgres.kill()
    assert not own_postgres.running
    assert process_tree(old_pid) == {}
    with pytest.raises((ConnectionError, asyncpg.PostgresError, OSError)):
        await conn.fetchval("SELECT 1")
    conn.terminate()
    own_postgres.restart()
    assert own_postgres.port == port and own_postgres.pid != old_pid
    assert "automatic recovery in progress" in own_postgres.log_tail()
    conn = await asyncpg.connect(own_postgres.dsn())
    try:
        assert await conn.fetchval("SELECT value FROM kept") == "before"
    finally:
        await conn.close()


async def test_stop_is_a_fast_shutdown_even_with_a_client_connected(
    own_postgres: PostgresServer,
) -> None:
    """stop() does not wait for clients to leave: it ends well inside its bound, no SIGKILL."""
    conn = await asyncpg.connect(own_postgres.dsn())
    try:
        pid = own_postgres.pid
        started = time.monotonic()
        own_postgres.stop(timeout=30)
        elapsed = time.monotonic() - started
        print(f"stopped in {elapsed:.3f} s with a client connected")
        assert not own_postgres.running
        assert process_tree(pid) == {}
        assert "received fast shutdown request" in own_postgres.log_tail()
        assert "database system is shut down" in own_postgres.log_tail()
        assert elapsed < 30
    finally:
        conn.terminate()


def test_stop_falls_back_to_sigkill_of_the_group_when_the_signal_is_ignored() -> None:
    """A process group that ignores the graceful signal is SIGKILLed, children too."""
    ignore_and_fork = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "child = os.fork()\n"
        "if child:\n"
        "    print(child, flush=True)\n"
        "while True:\n"
        "    time.sleep(1)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", ignore_and_fork], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        assert set(process_tree(proc.pid)) == {proc.pid, child}
        started = time.monotonic()
        stop_tree(proc, signal.SIGINT, timeout=0.5)
        print(f"killed after {time.monotonic() - started:.3f} s")
        assert proc.returncode == -signal.SIGKILL
        assert process_tree(proc.pid) == {}
    finally:
        kill_tree(proc)
