"""The fleet watcher (`hub.gateway.watcher`) against in-memory ports: no registry, no socket.

A change to many devices must read their configs in one `config_states` call (one round
trip to the registry's thread, not one per device) and push each device its own; a device
deleted since the change was read is skipped, and a registry that cannot be read loses
nothing: the next change pushes. The same push over real sockets and SQLite is in
test_config_push.py and the benchmark's fleet push (device-sim bench --only idle).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack
import pytest
from websockets.asyncio.server import ServerConnection

from hub.core.handshake import Handshake
from hub.gateway.rotation import RotationWatch
from hub.gateway.session import DeviceSession
from hub.gateway.session_ports import SessionPorts
from hub.gateway.watcher import FleetWatcher
from hub.ops.metrics import HubMetrics
from hub.options import session_limits
from hub.registry.records import ConfigState, Credential, DeviceChange
from hub.settings import Settings

pytestmark = pytest.mark.unit

WAIT_S = 10.0
VERSION = 3


class SentConfigs:
    """A connection that records the configs sent on it."""

    def __init__(self, changed: asyncio.Event) -> None:
        self.configs: list[dict[str, Any]] = []
        self._changed = changed

    async def send(self, message: bytes) -> None:
        """Record a config sent to the device."""
        self.configs.append(msgpack.unpackb(message))
        self._changed.set()


@dataclass
class Registry:
    """Change feed, config store and credential store in memory, counting the calls."""

    configs: dict[str, ConfigState] = field(default_factory=dict)
    batches: list[list[DeviceChange]] = field(default_factory=list)
    fail_next_read: bool = False
    config_state_calls: int = 0
    config_states_calls: list[int] = field(default_factory=list)
    token_lookups: int = 0
    _new_batch: asyncio.Event = field(default_factory=asyncio.Event)

    def change(self, device_ids: Sequence[str], version: int, token_changed: bool = True) -> None:
        """An operator sets a new config `version` for these devices (`token_changed`:
        the feed cannot tell a config push alone from a change that may touch tokens)."""
        for device_id in device_ids:
            self.configs[device_id] = ConfigState(
                device_id, {"for": device_id, "v": version}, version, None, None, None, None
            )
        self.batches.append([DeviceChange(d, version, False, token_changed) for d in device_ids])
        self._new_batch.set()

    async def change_seq(self) -> int:
        """Nothing changed before the watcher started."""
        return 0

    async def wait_for_change(self, timeout_s: float) -> bool:
        """True once a batch is waiting."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._new_batch.wait()
        except TimeoutError:
            return False
        return True

    async def changes_since(self, seq: int) -> tuple[int, list[DeviceChange]]:
        """The oldest waiting batch."""
        self._new_batch.clear()
        return seq + 1, self.batches.pop(0) if self.batches else []

    async def config_state(self, device_id: str) -> ConfigState:
        """One device's config (what the watcher must no longer ask for one by one)."""
        self.config_state_calls += 1
        return self.configs[device_id]

    async def config_states(self, device_ids: Sequence[str]) -> list[ConfigState]:
        """Many devices' configs in one call; unknown ones left out."""
        self.config_states_calls.append(len(device_ids))
        if self.fail_next_read:
            self.fail_next_read = False
            raise OSError("registry unreadable")
        return [self.configs[d] for d in device_ids if d in self.configs]

    async def record_config_ack(
        self, device_id: str, version: int, ok: bool, error: str | None
    ) -> bool:
        """Not used here."""
        return False

    async def credential(self, token_hash: str) -> Credential | None:
        """Every token still works."""
        self.token_lookups += 1
        return Credential(token_hash, token_hash)

    async def device(self, device_id: str) -> None:
        """Not used here."""


@dataclass
class Fleet:
    """Idle sessions of `count` devices under a running watcher."""

    registry: Registry
    sessions: dict[str, DeviceSession]
    connections: dict[str, SentConfigs]
    sent: asyncio.Event

    async def until_each_has(self, configs: int, device_ids: Sequence[str]) -> None:
        """Wait (bounded) until each of these devices was sent `configs` configs."""
        async with asyncio.timeout(WAIT_S):
            while any(len(self.connections[d].configs) < configs for d in device_ids):
                self.sent.clear()
                await self.sent.wait()


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    """200 connected devices and a watcher, stopped (by its task) at the end."""
    registry = Registry()
    sent = asyncio.Event()
    ids = [f"dev-{n:03}" for n in range(200)]
    connections = {d: SentConfigs(sent) for d in ids}
    unused: Any = None  # ingest, presence, validators, drain: an idle session never asks
    ports = SessionPorts(unused, registry, unused, unused, HubMetrics(), unused)
    limits = session_limits(Settings())
    sessions = {
        d: DeviceSession(
            cast(ServerConnection, connections[d]), Handshake(d, 10**6, d), ports, limits
        )
        for d in ids
    }
    background: set[asyncio.Task[None]] = set()

    def spawn(work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        background.add(task)
        task.add_done_callback(background.discard)

    watcher = FleetWatcher(registry, registry, sessions, RotationWatch(registry), 0.01, spawn)
    task = asyncio.create_task(watcher.run())
    yield Fleet(registry, sessions, connections, sent)
    task.cancel()
    await asyncio.gather(task, *background, return_exceptions=True)


async def test_a_change_to_many_devices_reads_their_configs_in_one_call(fleet: Fleet) -> None:
    """200 devices changed at once: one `config_states` call, each device its own config."""
    ids = list(fleet.sessions)
    fleet.registry.change(ids, VERSION)
    await fleet.until_each_has(1, ids)
    assert fleet.registry.config_states_calls == [len(ids)]
    assert fleet.registry.config_state_calls == 0
    for device_id in ids:
        (config,) = fleet.connections[device_id].configs
        assert config == {
            "type": "config",
            "version": VERSION,
            "config": {"for": device_id, "v": VERSION},
        }
        assert fleet.sessions[device_id].config_sent == VERSION


async def test_a_device_deleted_since_the_change_is_skipped(fleet: Fleet) -> None:
    """A changed device the store no longer knows gets nothing; the others get theirs."""
    ids = list(fleet.sessions)[:10]
    fleet.registry.change(ids, VERSION)
    # The change was read, then the device deleted before its config was: the store's
    # config_states leaves it out.
    del fleet.registry.configs[ids[0]]
    await fleet.until_each_has(1, ids[1:])
    assert fleet.connections[ids[0]].configs == []
    assert fleet.registry.config_states_calls == [len(ids)]


async def test_an_unreadable_registry_loses_no_later_push(fleet: Fleet) -> None:
    """The configs of one change cannot be read: the watcher reads them again (logged,
    never raised out of the watcher), and still pushes the next change."""
    ids = list(fleet.sessions)[:5]
    fleet.registry.fail_next_read = True
    fleet.registry.change(ids, VERSION)
    async with asyncio.timeout(WAIT_S):
        while not fleet.registry.config_states_calls:
            await asyncio.sleep(0.01)
    fleet.registry.change(ids, VERSION + 1)
    await fleet.until_each_has(1, ids)
    calls = fleet.registry.config_states_calls
    assert calls[0] == 5 and len(calls) >= 2 and set(calls) == {5}, calls
    assert {c["version"] for d in ids for c in fleet.connections[d].configs[-1:]} == {VERSION + 1}


async def test_a_push_the_registry_could_not_read_is_retried_until_it_can(fleet: Fleet) -> None:
    """An outage while a change's configs are read loses no push: with no later change,
    the watcher reads them again (every OUTAGE_RETRY_S) and pushes them."""
    ids = list(fleet.sessions)[:5]
    fleet.registry.fail_next_read = True
    fleet.registry.change(ids, VERSION)
    await fleet.until_each_has(1, ids)
    assert fleet.registry.config_states_calls[:2] == [5, 5]
    assert {c["version"] for d in ids for c in fleet.connections[d].configs} == {VERSION}


async def test_a_config_push_alone_checks_no_token_and_any_other_change_does(fleet: Fleet) -> None:
    """A change the feed knows is a config push alone (PostgreSQL's change kinds) pushes
    without a token lookup per device; one that may touch tokens looks each up again."""
    ids = list(fleet.sessions)[:20]
    fleet.registry.change(ids, VERSION, token_changed=False)
    await fleet.until_each_has(1, ids)
    await asyncio.sleep(0)  # a recheck would have been spawned with the push
    assert fleet.registry.token_lookups == 0
    fleet.registry.change(ids, VERSION + 1)
    await fleet.until_each_has(2, ids)
    async with asyncio.timeout(WAIT_S):
        while fleet.registry.token_lookups < len(ids):
            await asyncio.sleep(0.01)
    assert fleet.registry.token_lookups == len(ids)
