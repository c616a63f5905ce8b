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
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self, TypeVar

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
from hub.registry.sqlite import BUSY_TIMEOUT_S, Registry
from hub.registry.worker import OwningThread

T = TypeVar("T")

WRITE_ATTEMPT_S = 0.02
"""How long one write attempt waits on the thread for another process's write lock."""
WRITE_RETRY_S = 0.02
"""The pause, on the event loop, between write attempts while the lock is held."""


class ThreadedSQLiteRegistry:
    """`HubRegistry` on a SQLite file: every query on the one thread owning the connection.

    Open it with `await ThreadedSQLiteRegistry.open(path, poll_s)`. Between queries the
    thread looks at `PRAGMA data_version` every `poll_s` (it moves only when another
    connection commits) and wakes `wait_for_change` when it moved.
    """

    def __init__(self, path: Path, poll_s: float) -> None:
        """Use `open`: the thread is started there."""
        self._seen_version: int | None = None
        self._changed = asyncio.Event()
        self._thread = OwningThread(
            "registry", lambda: self._open_engine(path), self._look_for_change, poll_s
        )

    @classmethod
    async def open(cls, path: Path, poll_s: float) -> Self:
        """Open (creating if needed) the registry at `path` on a new thread of its own."""
        registry = cls(path, poll_s)
        await registry._thread.start()
        return registry

    async def close(self) -> None:
        """Close the connection once the queries already asked for are done."""
        await self._thread.stop(Registry.close)

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

    # OwnershipStore: one process owns every connection of a SQLite registry, so its own
    # session table is the whole story (a second connection replaces the first there).

    async def claim(self, device_id: str, remote_address: str) -> Claim | None:
        """See `OwnershipStore.claim`: nothing to claim from anyone, epoch 0."""
        return Claim(0)

    async def record_claimed_config_ack(
        self, device_id: str, epoch: int, version: int, ok: bool, error: str | None
    ) -> bool:
        """See `OwnershipStore.record_claimed_config_ack`: as `record_config_ack`."""
        return await self.record_config_ack(device_id, version, ok, error)

    async def release(self, device_id: str, epoch: int) -> None:
        """See `OwnershipStore.release`: nothing was claimed."""

    def watch_takeovers(
        self, listener: Callable[[str, int], None], missed: Callable[[], None]
    ) -> None:
        """See `OwnershipStore.watch_takeovers`: no other hub ever takes a device over."""

    async def stale_sessions(self, sessions: Sequence[HeldSession]) -> list[StaleSession]:
        """See `OwnershipStore.stale_sessions`: the watcher sees every change at once."""
        return []

    # PresenceStore

    async def record_presence(self, states: Sequence[Presence]) -> None:
        """See `PresenceStore.record_presence`."""
        rows = list(states)  # the caller may change its collections while the thread works
        await self._write(lambda engine: engine.record_presence(rows))

    async def mark_all_offline(self) -> None:
        """See `PresenceStore.mark_all_offline`."""
        await self._write(Registry.mark_all_offline)

    async def presence(self) -> dict[str, Presence]:
        """See `PresenceStore.presence`."""
        return await self._run(Registry.presence)

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
