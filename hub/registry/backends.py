"""The one place that picks the registry's backend from `registry_url`, for hub and CLI.

Empty: the SQLite file in the state directory (`ThreadedSQLiteRegistry` for the hub, the
engine itself for the commands). A `postgresql://` URL (checked by hub.registry.url when the
settings were read): PostgreSQL, the hub as node `node_id`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

from hub.registry import sqlite_claims
from hub.registry.operator import OperatorRegistry
from hub.registry.ports import HubRegistry
from hub.registry.postgres.backend import PostgresRegistry
from hub.registry.postgres.operator import PostgresOperator
from hub.registry.schema import CONNECTIONS_MIGRATIONS
from hub.registry.sqlite import BUSY_TIMEOUT_S
from hub.registry.sqlite_files import open_database, transaction
from hub.registry.sqlite_operator import SQLiteOperator
from hub.registry.thread import ThreadedSQLiteRegistry


async def open_hub_registry(
    registry_url: str, sqlite_path: Path, poll_s: float, node_id: str, address: str
) -> HubRegistry:
    """The hub's registry as node `node_id`: PostgreSQL at `registry_url` (devices connect
    to `address`), or, with no URL, SQLite at `sqlite_path` watched every `poll_s`."""
    if registry_url:
        return await PostgresRegistry.open(registry_url, node_id, address)
    return await ThreadedSQLiteRegistry.open(sqlite_path, poll_s, node_id)


async def open_operator(registry_url: str, sqlite_path: Path) -> OperatorRegistry:
    """The operator's registry: PostgreSQL at `registry_url`, or SQLite at `sqlite_path`."""
    if registry_url:
        return await PostgresOperator.open(registry_url)
    return SQLiteOperator.open(sqlite_path)


def release_host_claims(
    registry_url: str, sqlite_path: Path, node_ids: Sequence[str] | None
) -> None:
    """For the supervisor of `hub serve --workers N`: the claims of its worker processes
    that are gone end, so their devices show offline. `node_ids`: those workers' node ids
    (one just reaped); None at the supervisor's start, before any worker runs: every claim.
    Blocking (a short SQLite write); the supervisor runs it on a thread.

    SQLite: done here. The file belongs to this host alone, so at start every claim in it is
    a dead process's, and a reaped worker's node id names its claims exactly.

    PostgreSQL: nothing to do, on purpose. The registry is shared with other hubs, and
    what a dead worker held is already taken care of without the supervisor: a device is
    online only while its owner's lease is live, so a dead worker's devices show offline
    within the lease (`hub.registry.postgres.lease.LEASE_S`, 5 s) with nothing written; and a
    worker's registration at its start releases whatever its node id held before it takes
    a device. Releasing them here too would be a second writer of the same rows racing the
    restarted worker's first claims, for at most a lease's difference.
    """
    if registry_url:
        return
    # The connections file alone: an operator's transaction on the registry file, however
    # long, does not hold this up.
    path = sqlite_path.parent / sqlite_claims.CONNECTIONS_FILE
    db = open_database(path, CONNECTIONS_MIGRATIONS, BUSY_TIMEOUT_S)
    try:
        with transaction(db):
            sqlite_claims.release_nodes(db, node_ids)
    finally:
        db.close()


def default_node_id(port: int) -> str:
    """HOSTNAME:PORT, the node id of a hub not given one (`node_id`); on port 0 (any free
    one, known only once listening) the process id stands in for the port."""
    return f"{socket.gethostname()}:{port if port else f'pid{os.getpid()}'}"
