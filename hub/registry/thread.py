"""The SQLite registry behind the async ports, for the hub process: one thread owns it.

Every query runs on one dedicated thread (hub.registry.worker) that owns the SQLite
connection, so no registry call blocks the event loop: while a CLI command holds SQLite's
write lock (`token add --count`, `config set --all`), devices keep streaming and being
acked. The SQL itself stays in one place, `hub.registry.sqlite.Registry`, the engine this
thread drives and the CLI calls directly.

A write does not wait for the lock on the thread: the engine gives up after
`WRITE_ATTEMPT_S` and the write is tried again from the event loop, so that the handshakes'
credential lookups queued behind it still run (WAL readers need no lock) while a CLI holds
the lock. A write gives up, as before, after the engine's `BUSY_TIMEOUT_S` in all.

Several processes of one host may share the file (the workers of `hub serve --workers N`),
each as a node of its own: claims, presence and counts follow PostgreSQL's rules
(hub.registry.sqlite_claims), and a claim rings the previous owner's doorbell socket
(hub.registry.host_doorbell).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self, TypeVar

from hub.registry import sqlite_claims
from hub.registry.host_doorbell import HostDoorbell
from hub.registry.records import (
    Claim,
    ConfigState,
    Credential,
    Device,
    DeviceChange,
    HeldSession,
    Presence,
    StaleSession,
)
from hub.registry.sqlite import BUSY_TIMEOUT_S, Registry, secure_state_dir
from hub.registry.worker import OwningThread

T = TypeVar("T")

WRITE_ATTEMPT_S = 0.02
"""How long one write attempt waits on the thread for another process's write lock."""
WRITE_RETRY_S = 0.02
"""The pause, on the event loop, between write attempts while the lock is held."""
LOCAL_NODE_ID = "local"
"""The node id of a registry opened without one (tests, benchmarks)."""


class ThreadedSQLiteRegistry:
    """`HubRegistry` on a SQLite file: every query on the one thread owning the connection.

    Open it with `await ThreadedSQLiteRegistry.open(path, poll_s, node_id)`. Between queries the
    thread looks at `PRAGMA data_version` every `poll_s` (it moves only when another
    connection commits) and wakes `wait_for_change` when it moved.
    """

    def __init__(self, path: Path, poll_s: float, node_id: str, doorbell: HostDoorbell) -> None:
        """Use `open`: the thread is started there."""
        self.node_id = node_id
        self._doorbell = doorbell
        self._recorded_stored: dict[str, int] = {}
        self._seen_version: int | None = None
        self._changed = asyncio.Event()
        self._thread = OwningThread(
            "registry", lambda: self._open_engine(path), self._look_for_change, poll_s
        )

    @classmethod
    async def open(cls, path: Path, poll_s: float, node_id: str = LOCAL_NODE_ID) -> Self:
        """Open (creating if needed) the registry at `path` on a new thread of its own, as
        node `node_id`: its doorbell bound, and whatever the node id held before released
        (a process opening it is a new one: the last one's sessions are gone)."""
        doorbell = HostDoorbell.open(secure_state_dir(path.parent), node_id)
        registry = cls(path, poll_s, node_id, doorbell)
        try:
            await registry._thread.start()
        except BaseException:
            doorbell.close()
            raise
        try:
            await registry._write(
                lambda engine: engine.write_connections(
                    lambda db: sqlite_claims.release_nodes(db, [node_id])
                )
            )
        except BaseException:
            await registry.close()
            raise
        return registry

    async def close(self) -> None:
        """Close the connection once the queries already asked for are done, and the
        doorbell."""
        try:
            await self._thread.stop(Registry.close)
        finally:
            self._doorbell.close()

    async def _run(self, query: Callable[[Registry], T]) -> T:
        """Run `query(engine)` on the registry's thread."""
        return await self._thread.run(query)

    def _open_engine(self, path: Path) -> Registry:
        # On the registry's thread: sqlite3 refuses a connection used from any other thread
        # than its creator's. Opening waits out a lock for as long as ever (the migration is
        # a write); after that a write attempt gives up after WRITE_ATTEMPT_S and `_write`
        # tries again from the loop.
        engine = Registry(path)
        engine.set_busy_timeout(WRITE_ATTEMPT_S)
        self._seen_version = engine.data_version()
        return engine

    def _look_for_change(self, engine: Registry) -> None:
        # On the registry's thread, between queries: the loop hears of it only on a change.
        version = engine.data_version()
        if version != self._seen_version:
            self._seen_version = version
            self._thread.send(self._changed.set)

    async def _write(self, write: Callable[[Registry], T]) -> T:
        """Run a write on the thread, trying again from the loop while another process
        holds the write lock, for `BUSY_TIMEOUT_S` in all (then the lock error is raised)."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                return await self._run(write)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(WRITE_RETRY_S)

    # CredentialStore

    async def credential(self, token_hash: str) -> Credential | None:
        """See `CredentialStore.credential`."""
        return await self._run(lambda engine: engine.credential(token_hash))

    async def device(self, device_id: str) -> Device | None:
        """See `CredentialStore.device`."""
        return await self._run(lambda engine: engine.get(device_id))

    # ConfigStore

    async def config_state(self, device_id: str) -> ConfigState:
        """See `ConfigStore.config_state`."""
        return await self._run(lambda engine: engine.config_state(device_id))

    async def config_states(self, device_ids: Sequence[str]) -> list[ConfigState]:
        """See `ConfigStore.config_states`: one job on the thread, however many devices."""
        wanted = list(device_ids)  # the caller may change its collection while the thread works
        return await self._run(lambda engine: engine.config_states(wanted))

    async def record_config_ack(
        self, device_id: str, version: int, ok: bool, error: str | None
    ) -> bool:
        """See `ConfigStore.record_config_ack`."""
        return await self._write(
            lambda engine: engine.record_config_ack(device_id, version, ok, error)
        )

    # OwnershipStore: the processes of this host sharing the file (the workers of `hub serve
    # --workers N`) claim devices in it (hub.registry.sqlite_claims) and ring each other's
    # doorbells (hub.registry.host_doorbell).

    async def claim(self, device_id: str, remote_address: str) -> Claim | None:
        """See `OwnershipStore.claim`: one write transaction of the connections file (an
        operator's transaction on the registry file never holds it up), then a ring of the
        node that held the device, if another one."""
        node_id, now = self.node_id, time.time()

        def claim(engine: Registry) -> Claim | None:
            device = engine.get(device_id)
            if device is None or not device.active:
                return None
            return engine.write_connections(
                lambda db: sqlite_claims.claim(db, device_id, node_id, remote_address, now)
            )

        claimed = await self._write(claim)
        owner = None if claimed is None else claimed.previous_owner
        if claimed is not None and owner is not None:
            self._doorbell.ring(owner, device_id, claimed.epoch)
        return claimed

    async def record_claimed_config_ack(
        self, device_id: str, epoch: int, version: int, ok: bool, error: str | None
    ) -> bool:
        """See `OwnershipStore.record_claimed_config_ack` (epoch 0, no claim: by device).
        The claim is checked, then the answer stored, in one job of this thread: a claim
        by another process can fall between the two (the answer, the device's own to that
        version, is then stored all the same)."""
        node_id = self.node_id

        def record(engine: Registry) -> bool:
            if epoch and not engine.read_connections(
                lambda db: sqlite_claims.holds(db, device_id, node_id, epoch)
            ):
                return False
            return engine.record_config_ack(device_id, version, ok, error)

        return await self._write(record)

    async def release(self, device_id: str, epoch: int) -> None:
        """See `OwnershipStore.release`."""
        node_id, now = self.node_id, time.time()
        await self._write(
            lambda engine: engine.write_connections(
                lambda db: sqlite_claims.release(db, device_id, node_id, epoch, now)
            )
        )

    def watch_takeovers(
        self, listener: Callable[[str, int], None], missed: Callable[[], None]
    ) -> None:
        """See `OwnershipStore.watch_takeovers`: heard on this node's doorbell socket. Nothing
        is ever `missed` in a way the listener could notice (a ring to a full queue is
        dropped at its sender): the safety net, every few seconds, bounds that."""
        self._doorbell.listen(listener)

    async def stale_sessions(self, sessions: Sequence[HeldSession]) -> list[StaleSession]:
        """See `OwnershipStore.stale_sessions`: those taken over (`sqlite_claims.taken_over`;
        the fleet watcher sees every other change of the file already)."""
        held, node_id = list(sessions), self.node_id
        return await self._run(
            lambda engine: engine.read_connections(
                lambda db: sqlite_claims.taken_over(db, node_id, held)
            )
        )

    # PresenceStore

    async def record_presence(self, states: Sequence[Presence]) -> None:
        """See `PresenceStore.record_presence`: claimed sessions by their epoch (the
        connections file), and the readings stored since the totals this process last
        recorded, as deltas (the registry file), so the counts of several processes add up."""
        rows = list(states)  # the caller may change its collections while the thread works
        if rows:
            # Two writes, each tried again on its own: the connections file's is never held
            # up by an operator; the counts' may be. A failure of either has the whole flush
            # sent again, which changes nothing the first time did.
            await self._write(lambda engine: self._record_sessions(engine, rows))
            await self._write(lambda engine: self._add_stored(engine, rows))

    def _record_sessions(self, engine: Registry, rows: list[Presence]) -> None:
        unclaimed = [p.device_id for p in rows if p.epoch == 0]
        known = {s.device_id for s in engine.config_states(unclaimed)} if unclaimed else set()
        sessions = [p for p in rows if p.epoch or p.device_id in known]
        engine.write_connections(
            lambda db: sqlite_claims.record_sessions(db, self.node_id, sessions)
        )

    def _add_stored(self, engine: Registry, rows: list[Presence]) -> None:
        # On the registry's thread, like every use of `_recorded_stored`: flushes run one
        # after the other there, so two that overlap on the loop (the last one at a stop)
        # never count the same readings twice.
        totals = {p.device_id: p.readings_stored for p in rows}  # a device's last row counts
        deltas = {d: total - self._recorded_stored.get(d, 0) for d, total in totals.items()}
        if any(delta > 0 for delta in deltas.values()):
            engine.write(lambda db: sqlite_claims.add_stored(db, deltas))
        self._recorded_stored.update(totals)  # only once committed

    async def mark_all_offline(self) -> None:
        """See `PresenceStore.mark_all_offline`: every claim in the file (a hub of its own
        owns the whole file; workers leave it to their supervisor)."""
        await self._write(
            lambda engine: engine.write_connections(
                lambda db: sqlite_claims.release_nodes(db, None)
            )
        )

    async def presence(self) -> dict[str, Presence]:
        """See `PresenceStore.presence`: counts summed over every process."""

        def read(engine: Registry) -> dict[str, Presence]:
            found = engine.presence()
            for device_id, seen in found.items():
                # The baseline of the deltas: what this process's totals start from.
                self._recorded_stored.setdefault(device_id, seen.readings_stored)
            return found

        return await self._run(read)

    # ChangeFeed

    async def change_seq(self) -> int:
        """See `ChangeFeed.change_seq`."""
        return await self._run(Registry.change_seq)

    async def changes_since(self, seq: int) -> tuple[int, list[DeviceChange]]:
        """See `ChangeFeed.changes_since`."""
        return await self._run(lambda engine: engine.changes_since(seq))

    async def wait_for_change(self, timeout_s: float) -> bool:
        """See `ChangeFeed.wait_for_change`: the thread's look at `PRAGMA data_version`
        every `poll_s` wakes it."""
        if not self._changed.is_set():
            try:
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait()
            except TimeoutError:
                return False
        self._changed.clear()
        return True


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused because another connection holds the lock."""
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
