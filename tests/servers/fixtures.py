"""pytest fixtures for PostgreSQL and HAProxy, loaded for every module by tests/conftest.py
(`pytest_plugins`); the session-scoped server starts only for a test that asks for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from device_sim.servers.haproxy import ConfigFor, HAProxyServer, start_haproxy
from device_sim.servers.postgres import PostgresDatabase, PostgresServer, start_postgres
from tests.packages import ensure_haproxy, ensure_postgres


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A real PostgreSQL 15 for the whole session; never stop or freeze it in a test."""
    ensure_postgres()
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_db(postgres: PostgresServer) -> Iterator[PostgresDatabase]:
    """A new, empty database on the session's server, dropped after the test."""
    role, name = postgres.new_database()
    yield PostgresDatabase(postgres, role, name)
    if postgres.running:
        postgres.drop_database(role, name)


@pytest.fixture
async def pg(postgres_db: PostgresDatabase) -> AsyncIterator[asyncpg.Connection]:
    """A connection to `postgres_db` as its owner."""
    conn = await postgres_db.connect()
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL for this test alone, to freeze, kill and restart; stopped after it."""
    ensure_postgres()
    server = start_postgres(tmp_path / "own-postgres")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[ConfigFor], HAProxyServer]]:
    """Start HAProxy with a config made for this test: call it with port -> config text.

    Every one started is stopped after the test.
    """
    ensure_haproxy()
    started: list[HAProxyServer] = []

    def start(config_for: ConfigFor) -> HAProxyServer:
        server = start_haproxy(tmp_path / f"haproxy-{len(started)}", config_for)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
