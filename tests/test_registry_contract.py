"""The registry contract (tests/registry_contract.py), run against every backend.

Today the one backend is SQLite: the hub's ports on their own thread
(`ThreadedSQLiteRegistry`), the operator the CLI's synchronous `Registry` on a second
connection to the same file, as in production. A temporary file and a thread: no network,
so these are unit tests. PostgreSQL joins as another param of `backend`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hub.registry.ports import HubRegistry
from hub.registry.sqlite import Registry
from hub.registry.thread import ThreadedSQLiteRegistry
from tests.registry_contract import Backend, RegistryContract

POLL_S = 0.01


@pytest.fixture(params=[pytest.param("sqlite", marks=pytest.mark.unit)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """A fresh, empty registry of the backend named by the param."""
    assert request.param == "sqlite"
    path = tmp_path / "state" / "registry.sqlite3"

    async def reopen() -> HubRegistry:
        return await ThreadedSQLiteRegistry.open(path, POLL_S)

    ports = await reopen()
    operator = Registry(path)
    try:
        yield Backend(ports, operator, reopen)
    finally:
        operator.close()
        await ports.close()


class TestRegistryContract(RegistryContract):
    """Every backend, every port method."""
