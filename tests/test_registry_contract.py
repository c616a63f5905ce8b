"""The registry contract (tests/registry_contract.py), run against every backend.

SQLite: the hub's ports on their own thread (`ThreadedSQLiteRegistry`), the operator the
CLI's port on the synchronous engine (`SQLiteOperator`) on a second connection to the same
file, as in production; other hubs (peers) are more connections to it, as the workers of one
host are, ringing each other on UNIX sockets; a temporary directory, no network: unit tests.

PostgreSQL: the hub's ports as one node (`PostgresRegistry`, a pool, its heartbeat and its
doorbell), the operator the CLI's `PostgresOperator` on a connection of its own, both on a
fresh database of the real PostgreSQL 15 the suite starts (integration tests).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from device_sim.servers.postgres import PostgresDatabase
from hub.registry.operator import OperatorRegistry
from hub.registry.ports import HubRegistry
from hub.registry.postgres.backend import PostgresRegistry
from hub.registry.postgres.operator import PostgresOperator
from hub.registry.sqlite_operator import SQLiteOperator
from hub.registry.thread import ThreadedSQLiteRegistry
from tests.registry_contract import WAIT_S, Backend, RegistryContract

POLL_S = 0.01


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.unit),
        pytest.param("postgres", marks=pytest.mark.integration),
    ]
)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """A fresh, empty registry of the backend named by the param."""
    reopen: Callable[[], Awaitable[HubRegistry]]
    open_peer: Callable[[str], Awaitable[HubRegistry]]
    operator: OperatorRegistry
    if request.param == "sqlite":
        path = tmp_path / "state" / "registry.sqlite3"

        async def reopen() -> HubRegistry:
            return await ThreadedSQLiteRegistry.open(path, POLL_S)

        async def open_peer(node_id: str) -> HubRegistry:
            return await ThreadedSQLiteRegistry.open(path, POLL_S, node_id)

        ports = await reopen()
        operator = SQLiteOperator.open(path)
    else:
        assert request.param == "postgres"
        database: PostgresDatabase = request.getfixturevalue("postgres_db")
        node_id = f"contract-{uuid.uuid4().hex[:8]}"

        async def reopen() -> HubRegistry:
            return await PostgresRegistry.open(database.dsn, node_id, "127.0.0.1:8765")

        async def open_peer(node_id: str) -> HubRegistry:
            peer = await PostgresRegistry.open(database.dsn, node_id, "127.0.0.1:8766")
            await asyncio.wait_for(peer.listening(), WAIT_S)  # its doorbell hears claims
            return peer

        ports = await reopen()
        operator = await PostgresOperator.open(database.dsn)
    try:
        yield Backend(ports, operator, reopen, open_peer)
    finally:
        await operator.close()
        await ports.close()


class TestRegistryContract(RegistryContract):
    """Every backend, every port method."""
