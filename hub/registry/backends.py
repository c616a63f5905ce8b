"""The one place that picks the registry's backend from `registry_url`, for hub and CLI.

Empty: the SQLite file in the state directory (`ThreadedSQLiteRegistry` for the hub, the
engine itself for the commands). A `postgresql://` URL (checked by hub.registry.url when the
settings were read): PostgreSQL, the hub as node `node_id`.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from hub.registry.operator import OperatorRegistry
from hub.registry.ports import HubRegistry
from hub.registry.postgres.backend import PostgresRegistry
from hub.registry.postgres.operator import PostgresOperator
from hub.registry.sqlite_operator import SQLiteOperator
from hub.registry.thread import ThreadedSQLiteRegistry


async def open_hub_registry(
    registry_url: str, sqlite_path: Path, poll_s: float, node_id: str, address: str
) -> HubRegistry:
    """The hub's registry: PostgreSQL at `registry_url` as node `node_id` (devices connect
    to `address`), or, with no URL, SQLite at `sqlite_path` watched every `poll_s`."""
    if registry_url:
        return await PostgresRegistry.open(registry_url, node_id, address)
    return await ThreadedSQLiteRegistry.open(sqlite_path, poll_s)


async def open_operator(registry_url: str, sqlite_path: Path) -> OperatorRegistry:
    """The operator's registry: PostgreSQL at `registry_url`, or SQLite at `sqlite_path`."""
    if registry_url:
        return await PostgresOperator.open(registry_url)
    return SQLiteOperator.open(sqlite_path)


def default_node_id(port: int) -> str:
    """HOSTNAME:PORT, the node id of a hub not given one (`node_id`); on port 0 (any free
    one, known only once listening) the process id stands in for the port."""
    return f"{socket.gethostname()}:{port if port else f'pid{os.getpid()}'}"
