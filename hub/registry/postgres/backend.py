"""`HubRegistry` on PostgreSQL: the hub's ports (hub.registry.ports) over an asyncpg pool.

Every statement is one of `queries`; this module only binds parameters and builds records.
The hub is one node of the fleet (`NodeLease`): a handshake claims its device
(`CLAIM_CONNECTION`), the session's presence, config answers and release name the claim's
epoch and lose to a newer claim, and a device is shown online while its owner's lease is
live. The previous owner hears of a claim on its doorbell (`watch_takeovers`).
`wait_for_change` is the `Doorbell`: LISTEN on the node's channel, with a catch-up by change
sequence after every (re)connection of the listener and every second, since the tables, not
the notifications, are the truth.

The change feed hands a hub the changes of the devices it holds (`CHANGES_SINCE`, by the
connection's owner when read), not the whole fleet's: a push to 10,000 devices over 3 hubs
costs each about a third of the rows. A device connecting while a change is in flight loses
nothing: its claim commits before its session reads its config and token, so a change
committed before the claim is seen by that read, and one committed after it is in the
owner's feed. A session let in from memory during an outage holds no claim (epoch 0): its
device becomes this node's with the presence flush that records it, and its changes until
then are caught up by reading the device as it is then (`DEVICES_AS_CHANGED`) with the
next feed read, rung at once if the feed already passed one of its changes
(`CHANGED_BETWEEN`).

Readings-stored counters add up across hubs: the port hands over each device's total as this
hub knows it (the count it loaded at start plus what it stored since), and this backend turns
that into the delta since the total it last recorded for the device.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable, Sequence
from typing import Self

import asyncpg

from hub.errors import UnknownDevice
from hub.registry.postgres import queries as q
from hub.registry.postgres.answers import ConfigAnswers
from hub.registry.postgres.connect import open_pool, seconds
from hub.registry.postgres.doorbell import CATCH_UP_S, Doorbell
from hub.registry.postgres.lease import NodeLease
from hub.registry.postgres.rows import config_state_of, device_of, presence_of
from hub.registry.records import (
    Claim,
    ConfigState,
    Credential,
    Device,
    DeviceChange,
    HeldSession,
    Presence,
    StaleReason,
    StaleSession,
)

CLOSE_TIMEOUT_S = 5.0
"""How long closing waits for statements still running before the connections are cut."""
_MAX_VERSION = 2**63  # bigint: an answer to a higher version was never sent
SESSIONS_PER_CHECK = 1000
"""Sessions per `STALE_SESSIONS` statement: one statement never carries a whole fleet."""
FEED_PAGE_ROWS = 5000
"""Changes per `CHANGES_SINCE` read: a fleet-wide push is read a page at a time."""


class PostgresRegistry:
    """The hub's registry ports on PostgreSQL, as node `node_id`; open with `open`."""

    def __init__(self, pool: asyncpg.Pool, node_id: str, doorbell: Doorbell, seen: int) -> None:
        """Use `open`: it registers the node and starts listening; changes up to `seen`
        were committed before it opened."""
        self.node_id = node_id
        self._opened_at_seq = seen
        self._fed_up_to = seen
        """The newest sequence the feed has handed out."""
        self._pool = pool
        self._answers = ConfigAnswers(pool, node_id)
        self._doorbell = doorbell
        self._lease: NodeLease | None = None
        self._online: set[str] = set()
        self._recorded_stored: dict[str, int] = {}
        self._presence_flush = asyncio.Lock()
        """One presence flush at a time: each one's deltas are taken from what the one before
        it committed (two at once, the periodic and the last at a stop, counted twice)."""
        self._unclaimed_online: set[str] = set()
        """Devices served without a claim (epoch 0) that presence recorded online here."""
        self._adopted: set[str] = set()
        """Of those, the ones the feed has yet to report as changed (see the docstring)."""

    @classmethod
    async def open(
        cls, url: str, node_id: str, address: str, *, catch_up_s: float = CATCH_UP_S
    ) -> Self:
        """Connect to `url` (migrating the schema), register node `node_id` at `address`
        (the address devices connect to) and start its heartbeat and doorbell.
        `RegistryUnavailable` if the database cannot be used."""
        pool = await open_pool(url)
        try:
            seen = int(await pool.fetchval(q.CHANGE_SEQ))
            registry = cls(pool, node_id, Doorbell(url, node_id, seen, catch_up_s), seen)
            lease = NodeLease(pool, node_id, address, lambda: len(registry._online))
            await lease.register()
        except BaseException:
            pool.terminate()
            raise
        registry._lease = lease
        lease.start()
        registry._doorbell.start()
        return registry

    async def listening(self) -> None:
        """Wait until the doorbell listens and has caught up (tests measure it alone)."""
        await self._doorbell.listening()

    async def close(self) -> None:
        """Record the config answers under way, stop the heartbeat and the doorbell, then
        close the pool (each bounded)."""
        await self._answers.close(CLOSE_TIMEOUT_S)
        await self._doorbell.close()
        if self._lease is not None:
            await self._lease.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._pool.close()
        except TimeoutError:
            self._pool.terminate()

    # CredentialStore

    async def credential(self, token_hash: str) -> Credential | None:
        """See `CredentialStore.credential`."""
        row = await self._pool.fetchrow(q.CREDENTIAL, token_hash)
        if row is None or not hmac.compare_digest(row["token_hash"], token_hash):
            return None
        return Credential(row["device_id"], token_hash, seconds(row["expires_at"]))

    async def device(self, device_id: str) -> Device | None:
        """See `CredentialStore.device`."""
        rows = await self._pool.fetch(q.DEVICES_BY_ID, [device_id])
        return device_of(rows[0]) if rows else None

    # ConfigStore

    async def config_state(self, device_id: str) -> ConfigState:
        """See `ConfigStore.config_state`."""
        states = await self.config_states([device_id])
        if not states:
            raise UnknownDevice(device_id)
        return states[0]

    async def config_states(self, device_ids: Sequence[str]) -> list[ConfigState]:
        """The config states of these devices, by id; unknown ids are left out."""
        rows = await self._pool.fetch(q.CONFIG_STATES, list(dict.fromkeys(device_ids)))
        return [config_state_of(row) for row in rows]

    async def record_config_ack(
        self, device_id: str, version: int, ok: bool, error: str | None
    ) -> bool:
        """See `ConfigStore.record_config_ack`."""
        if not 0 <= version < _MAX_VERSION:
            return False
        row = await self._pool.fetchrow(
            q.RECORD_DEVICE_CONFIG_ACK, device_id, version, ok, _storable(error)
        )
        return row is not None

    # OwnershipStore

    async def claim(self, device_id: str, remote_address: str) -> Claim | None:
        """See `OwnershipStore.claim`: one statement, which also rings the previous owner."""
        row = await self._pool.fetchrow(
            # The schema's bound: one overlong address must not fail the handshake.
            q.CLAIM_CONNECTION,
            device_id,
            self.node_id,
            remote_address[:300],
        )
        if row is None:
            return None
        previous = row["previous_owner"]  # this node itself: a device reconnecting here
        return Claim(int(row["epoch"]), None if previous == self.node_id else previous)

    async def record_claimed_config_ack(
        self, device_id: str, epoch: int, version: int, ok: bool, error: str | None
    ) -> bool:
        """See `OwnershipStore.record_claimed_config_ack`: recorded with the other
        answers of this loop turn, in one statement (hub.registry.postgres.answers)."""
        if not 0 <= version < _MAX_VERSION:
            return False
        return await self._answers.record(device_id, epoch, version, ok, _storable(error))

    async def release(self, device_id: str, epoch: int) -> None:
        """See `OwnershipStore.release`."""
        await self._pool.execute(q.RELEASE_CONNECTION, device_id, self.node_id, epoch)

    def watch_takeovers(
        self, listener: Callable[[str, int], None], missed: Callable[[], None]
    ) -> None:
        """See `OwnershipStore.watch_takeovers`: heard on the doorbell's channel, missed
        while its connection was away."""
        self._doorbell.on_takeover(listener, missed)

    async def stale_sessions(self, sessions: Sequence[HeldSession]) -> list[StaleSession]:
        """See `OwnershipStore.stale_sessions`: `STALE_SESSIONS`, a chunk at a time."""
        found: list[StaleSession] = []
        for start in range(0, len(sessions), SESSIONS_PER_CHECK):
            chunk = sessions[start : start + SESSIONS_PER_CHECK]
            rows = await self._pool.fetch(
                q.STALE_SESSIONS,
                self.node_id,
                [s.device_id for s in chunk],
                [s.epoch for s in chunk],
                [s.config_version for s in chunk],
                [s.token_hash for s in chunk],
            )
            found.extend(
                StaleSession(
                    row["device_id"],
                    int(row["epoch"]),
                    StaleReason(row["reason"]),
                    int(row["config_version"] or 0),
                )
                for row in rows
            )
        return found

    # PresenceStore

    async def record_presence(self, states: Sequence[Presence]) -> None:
        """See `PresenceStore.record_presence`: connections owned by this node, and the
        readings stored since the totals last recorded, in one transaction."""
        async with self._presence_flush:
            await self._record_presence(states)

    async def _record_presence(self, states: Sequence[Presence]) -> None:
        rows = sorted(states, key=lambda p: p.device_id)  # one lock order across hubs
        if not rows:
            return
        ids = [p.device_id for p in rows]
        deltas = [p.readings_stored - self._recorded_stored.get(p.device_id, 0) for p in rows]
        # Claimed sessions name their epoch: a stale owner's flush changes nothing. Rows
        # without one (no claim) are recorded by device, as on SQLite.
        by_device = [p for p in rows if p.epoch == 0]
        touched = [p for p in rows if p.epoch and p.online]
        released = [p for p in rows if p.epoch and not p.online]
        async with self._pool.acquire() as conn, conn.transaction():
            if by_device:
                await conn.execute(
                    q.RECORD_PRESENCE,
                    self.node_id,
                    [p.device_id for p in by_device],
                    [p.online for p in by_device],
                    # The schema's bound: one overlong address must not fail every flush.
                    [None if p.remote_address is None else p.remote_address[:300]
                     for p in by_device],
                    [p.connected_since for p in by_device],
                    [p.last_seen for p in by_device],
                )  # fmt: skip
            for query, sessions in (
                (q.TOUCH_CONNECTIONS, touched),
                (q.RELEASE_CONNECTIONS, released),
            ):
                if sessions:
                    await conn.execute(
                        query,
                        self.node_id,
                        [p.device_id for p in sessions],
                        [p.epoch for p in sessions],
                    )
            await conn.execute(q.ADD_READINGS_STORED, ids, deltas)
        for p in rows:  # only once committed: a failed flush is sent again, whole
            self._recorded_stored[p.device_id] = p.readings_stored
            if p.online:
                self._online.add(p.device_id)
            else:
                self._online.discard(p.device_id)
        await self._adopt([p for p in by_device if p.online], [p for p in rows if not p.online])

    async def _adopt(self, unclaimed: Sequence[Presence], ended: Sequence[Presence]) -> None:
        """Devices now this node's by a presence row of no claim: reported by the next feed
        read once, as they are (the feed left out their changes before this flush); rung
        now if it passed one since this node opened. Not on every flush: not a change."""
        for p in ended:
            self._unclaimed_online.discard(p.device_id)
            self._adopted.discard(p.device_id)
        new = sorted({p.device_id for p in unclaimed} - self._unclaimed_online)
        if not new:
            return
        self._unclaimed_online.update(new)
        self._adopted.update(new)
        if self._fed_up_to <= self._opened_at_seq:
            return
        try:
            missed = await self._pool.fetchval(
                q.CHANGED_BETWEEN, new, self._opened_at_seq, self._fed_up_to
            )
        except Exception:  # the flush is committed; unsure whether one was missed: read
            missed = True
        if missed:
            self._doorbell.ring()

    async def mark_all_offline(self) -> None:
        """See `PresenceStore.mark_all_offline`: this node's connections, no other's."""
        await self._pool.execute(q.RELEASE_NODE, self.node_id)
        self._online.clear()
        self._unclaimed_online.clear()
        self._adopted.clear()

    async def presence(self) -> dict[str, Presence]:
        """See `PresenceStore.presence`: online while a node with a live lease holds the
        device; counts summed over every hub."""
        found = presence_of(await self._pool.fetch(q.DEVICE_PRESENCE))
        for device_id, seen in found.items():
            # The baseline of the deltas: what this hub's totals start from.
            self._recorded_stored.setdefault(device_id, seen.readings_stored)
        return found

    # ChangeFeed

    async def change_seq(self) -> int:
        """See `ChangeFeed.change_seq`."""
        seq = int(await self._pool.fetchval(q.CHANGE_SEQ))
        self._doorbell.saw(seq)
        return seq

    async def changes_since(self, seq: int) -> tuple[int, list[DeviceChange]]:
        """See `ChangeFeed.changes_since`: the changes of the devices this node holds
        (`CHANGES_SINCE`, a page at a time), one `DeviceChange` per device."""
        found: dict[str, DeviceChange] = {}
        position: tuple[int, str | None] = (seq, None)
        while True:
            rows = await self._pool.fetch(q.CHANGES_SINCE, self.node_id, *position, FEED_PAGE_ROWS)
            # Each page's own snapshot: the last, not full, is caught up to its `latest`.
            latest = int(rows[0]["latest"])
            page = [row for row in rows if row["seq"] is not None]
            for row in page:
                _merge(found, row["device_id"], row["kind"], row["config_version"])
            if len(page) < FEED_PAGE_ROWS:
                break
            position = (int(page[-1]["seq"]), page[-1]["device_id"])
        if self._adopted:
            adopted, self._adopted = self._adopted, set()
            try:
                for row in await self._pool.fetch(q.DEVICES_AS_CHANGED, sorted(adopted)):
                    found[row["device_id"]] = DeviceChange(
                        row["device_id"], int(row["config_version"]), bool(row["revoked"])
                    )
            except BaseException:
                self._adopted |= adopted  # read again with the next call
                raise
        self._fed_up_to = max(self._fed_up_to, latest)
        self._doorbell.saw(latest)
        return latest, sorted(found.values(), key=lambda change: change.device_id)

    async def wait_for_change(self, timeout_s: float) -> bool:
        """See `ChangeFeed.wait_for_change`: the doorbell, or its catch-up."""
        return await self._doorbell.wait(timeout_s)


def _merge(found: dict[str, DeviceChange], device_id: str, kind: str, version: int | None) -> None:
    """Fold one `changes` row into the device's change: the newest config version, revoked
    once any row revokes, its token to be checked again once any row is not a config push
    (a rotation changes neither version nor revocation: its session re-checks)."""
    before = found.get(device_id, DeviceChange(device_id, 0, False, False))
    found[device_id] = DeviceChange(
        device_id,
        max(before.config_version, version or 0) if kind == "config" else before.config_version,
        before.revoked or kind == "revoke",
        before.token_changed or kind != "config",
    )


def _storable(error: str | None) -> str | None:
    """A device's error text as a text column can hold it (no NUL)."""
    return None if error is None else error.replace("\x00", "\ufffd")
