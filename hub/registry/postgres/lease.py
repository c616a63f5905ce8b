"""A hub's node row in the registry: registered at start, kept alive by a heartbeat lease.

A device is online while a node whose lease has not expired holds its connection
(`queries.DEVICE_PRESENCE`), so a hub that dies, freezes or loses the database has its
devices shown offline once its lease runs out, with nothing to clean up. The lease is
renewed every `HEARTBEAT_S` for `LEASE_S`, a few heartbeats: one slow round trip does not
take a live hub's devices offline. All times are the database's clock.

The heartbeat also keeps the change log short: every `PRUNE_EVERY_S` it forgets changes
older than `CHANGE_RETENTION_S` (a hub reads the log seconds behind its writers; one whose
listener stayed away longer than that misses what was pruned).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from uuid import UUID

import asyncpg

from hub.registry.postgres import queries as q
from hub.registry.postgres.connect import CONNECTION_ERRORS

log = logging.getLogger("hub.registry")

HEARTBEAT_S = 1.0
LEASE_S = 5.0
PRUNE_EVERY_S = 3600.0
CHANGE_RETENTION_S = 7 * 86400.0


class NodeLease:
    """Node `node_id`'s row: `register` once, then `start` the heartbeat until `close`."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        node_id: str,
        address: str,
        live_connections: Callable[[], int],
        heartbeat_s: float = HEARTBEAT_S,
        lease_s: float = LEASE_S,
    ) -> None:
        """`live_connections()` is reported with every heartbeat."""
        self.node_id = node_id
        self._pool = pool
        self._address = address
        self._live_connections = live_connections
        self._heartbeat_s = heartbeat_s
        self._lease_s = lease_s
        self._incarnation: UUID | None = None
        self._task: asyncio.Task[None] | None = None

    async def register(self) -> None:
        """Register (or take over) the node id; whatever it held before is released."""
        row = await self._pool.fetchrow(
            q.REGISTER_NODE, self.node_id, self._address[:300], self._lease_s
        )
        self._incarnation = row["incarnation"]

    def start(self) -> None:
        """Renew the lease every `heartbeat_s` in a task of its own."""
        self._task = asyncio.create_task(self._beat(), name="registry-heartbeat")

    async def close(self) -> None:
        """Stop renewing (the lease then runs out by itself)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _beat(self) -> None:
        failing = False
        superseded = False
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        while True:
            await asyncio.sleep(self._heartbeat_s)
            if loop.time() >= next_prune:
                next_prune = loop.time() + PRUNE_EVERY_S
                with contextlib.suppress(*CONNECTION_ERRORS):  # the heartbeat says so
                    await self._pool.execute(q.PRUNE_CHANGES, CHANGE_RETENTION_S)
            try:
                # Bounded: asyncpg (0.32) can wait without end to hand back a connection
                # whose cancelled query the server never acknowledged (the server died), and
                # a lease that stops renewing takes the node's devices offline for good.
                async with asyncio.timeout(self._lease_s):
                    row = await self._pool.fetchrow(
                        q.HEARTBEAT,
                        self.node_id,
                        self._incarnation,
                        self._lease_s,
                        self._live_connections(),
                    )
            except Exception as exc:  # CONNECTION_ERRORS, the timeout, and asyncpg's own
                # Anything but our own cancel retries: a heartbeat task that ended on an
                # unexpected error would leave the node's lease to run out silently.
                if not failing:  # once per outage
                    log.warning(
                        "registry heartbeat of node %s failed (%s); its devices show offline "
                        "once its lease of %g s runs out",
                        self.node_id,
                        str(exc).strip() or type(exc).__name__,
                        self._lease_s,
                    )
                failing = True
                continue
            if failing:
                log.info("registry heartbeat of node %s works again", self.node_id)
                failing = False
            if row is None and not superseded:
                log.error(
                    "node id %s was registered by another process since this hub started: "
                    "two hubs must not share a node id",
                    self.node_id,
                )
            superseded = row is None
