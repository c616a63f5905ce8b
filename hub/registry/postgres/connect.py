"""Connections to the PostgreSQL registry: opened with the schema migrated, errors made clear.

Every connection the hub or a command opens goes through here, so each decodes `jsonb` to
Python objects the same way, waits a bounded time for the server, and turns "cannot connect"
(refused, unreachable, unknown database or role, wrong password, a frozen server) into one
`RegistryUnavailable` whose message names the URL without its password. The schema is brought
up to date (`migrations.migrate`) on every open: it is a no-op when nothing is missing, and
safe when several hubs start at once.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import asyncpg

from hub.errors import RegistryUnavailable
from hub.registry.postgres.migrations import migrate
from hub.registry.url import display_url

CONNECT_TIMEOUT_S = 10.0
"""How long opening one connection may take (TCP, TLS, authentication)."""
COMMAND_TIMEOUT_S = 30.0
"""How long one statement may take before the call raises: a frozen server fails calls
instead of hanging them (a bulk chunk of `CHUNK` devices takes well under a second)."""
APPLICATION_NAME = "sensor-hub"
"""How the hub's connections show in `pg_stat_activity` (its listener's: with " doorbell")."""
SERVER_SETTINGS = {
    # The fleet statements' CTEs look expensive to the planner (a push of 1000 devices was
    # estimated at millions of rows) and JIT compilation took 780 of its 860 ms; every
    # statement here is short, indexed OLTP, which JIT never speeds up.
    "jit": "off",
}
POOL_SIZE = 8
"""Connections of a hub's pool: handshakes of a connect storm look tokens up in parallel."""

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
"""What asyncpg raises when a server cannot be reached or refuses the connection."""


async def _prepare(conn: asyncpg.Connection) -> None:
    # jsonb as Python objects both ways: labels and configs are dicts in and out.
    await conn.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog", format="text"
    )


def unavailable(url: str, exc: BaseException) -> RegistryUnavailable:
    """The error saying the registry at `url` cannot be used, and why (no password shown)."""
    reason = str(exc).strip() or type(exc).__name__
    if isinstance(exc, TimeoutError):
        reason = f"no answer within {CONNECT_TIMEOUT_S:g} s"
    return RegistryUnavailable(
        f"cannot use the PostgreSQL registry at {display_url(url)} (registry_url): {reason}"
    )


async def connect(
    url: str, *, migrate_schema: bool = True, name: str = APPLICATION_NAME
) -> asyncpg.Connection:
    """One connection to the registry at `url`, its schema migrated unless told not to (a
    listener's connection: the pool's opening did it), named `name` in `pg_stat_activity`."""
    try:
        conn = await asyncpg.connect(
            url,
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=COMMAND_TIMEOUT_S,
            server_settings={**SERVER_SETTINGS, "application_name": name},
        )
    except CONNECTION_ERRORS as exc:
        raise unavailable(url, exc) from None
    try:
        await _prepare(conn)
        if migrate_schema:
            await migrate(conn)
    except CONNECTION_ERRORS as exc:
        conn.terminate()
        raise unavailable(url, exc) from None
    except BaseException:
        conn.terminate()
        raise
    return conn


async def open_pool(url: str, size: int = POOL_SIZE) -> asyncpg.Pool:
    """A pool of connections to the registry at `url`, its schema migrated first."""
    first = await connect(url)  # migrates, with the errors made clear
    await first.close()
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            url,
            # No floor: after an outage asyncpg would restore it with a traceback a try, in a
            # loop; the next call opens what it needs (the pool keeps idle ones 5 min).
            min_size=0,
            max_size=size,
            init=_prepare,
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=COMMAND_TIMEOUT_S,
            server_settings={**SERVER_SETTINGS, "application_name": APPLICATION_NAME},
        )
    except CONNECTION_ERRORS as exc:
        raise unavailable(url, exc) from None
    return pool


def seconds(moment: datetime | None) -> float | None:
    """A `timestamptz` as Unix seconds, as the records carry times."""
    return None if moment is None else moment.timestamp()


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    """`items` in consecutive slices of at most `size`."""
    return [items[start : start + size] for start in range(0, len(items), size)]
