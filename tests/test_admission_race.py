"""Handshakes racing each other. The last slot cannot be taken twice: a handshake's claim
(an await, on PostgreSQL a round trip) comes after its last room check, so the slot is
reserved across it; the order is driven: both handshakes are held inside their claims until
both got there. And a connect storm asks the registry only so many at a time."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer
from hub.gateway.handshakes import REGISTRY_TURNS
from hub.registry.ports import CredentialStore
from hub.registry.records import Claim, Credential, Device
from tests.support import add_device, hub_settings, running_hub

pytestmark = pytest.mark.integration

WAIT_S = 20.0


async def test_two_handshakes_claiming_at_once_cannot_both_take_the_last_slot(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """max_connections 1 and two devices whose claims are held until both are inside
    theirs (or one was refused first): one gets in, the other gets 503 with Retry-After."""
    settings = hub_settings(
        tmp_path / "state", influxdb.url, influx_bucket=influx_db_name, max_connections=1
    )
    tokens = [add_device(settings, name) for name in ("first", "second")]
    async with running_hub(settings) as service:
        gate = service.hub.gate
        real_claim = gate._claim
        inside = 0
        both_inside = asyncio.Event()
        release = asyncio.Event()

        async def held_claim(connection: object, device_id: str, remote: str) -> Claim:
            nonlocal inside
            inside += 1
            if inside == 2:
                both_inside.set()
            await release.wait()
            return await real_claim(connection, device_id, remote)  # type: ignore[arg-type]

        gate._claim = held_claim
        clients = [DeviceClient(service.url, token) for token in tokens]
        attempts = [asyncio.create_task(client.connect()) for client in clients]
        async with asyncio.timeout(WAIT_S):
            # Fixed before: both got past the room check and waited in their claims.
            while not both_inside.is_set() and not any(a.done() for a in attempts):
                await asyncio.sleep(0.01)
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*attempts, return_exceptions=True), WAIT_S)
        try:
            refused = [r for r in results if isinstance(r, InvalidStatus)]
            assert len(refused) == 1, results
            assert refused[0].response.status_code == 503
            assert refused[0].response.headers.get("Retry-After")
            assert service.hub.connections == 1
        finally:
            for client, result in zip(clients, results, strict=True):
                if result is None:
                    await asyncio.wait_for(client.close(), WAIT_S)


async def test_a_connect_storm_asks_the_registry_a_bounded_number_at_a_time(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """40 devices connecting at once, each token lookup held until the storm has piled up:
    at most REGISTRY_TURNS lookups are in the registry together (the rest wait for a turn,
    which is not the registry's time), and every device gets in."""
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    tokens = [add_device(settings, f"storm-{n}") for n in range(40)]
    async with running_hub(settings) as service:
        gate = service.hub.gate
        held = HeldLookups(gate.registry)
        gate.registry = held
        clients = [DeviceClient(service.url, token) for token in tokens]
        try:
            await asyncio.wait_for(asyncio.gather(*(c.connect() for c in clients)), WAIT_S)
            print(f"\nhandshakes' lookups in flight at most: {held.most} (turns {REGISTRY_TURNS})")
            assert held.most <= REGISTRY_TURNS
            assert service.hub.connections == len(tokens)
        finally:
            await asyncio.wait_for(asyncio.gather(*(c.close() for c in clients)), WAIT_S)


class HeldLookups:
    """The gate's credential store with every lookup held until REGISTRY_TURNS of them are
    in flight together (or 2 s passed: a slow registry, not a hung one); counts the most."""

    def __init__(self, store: CredentialStore) -> None:
        self.store = store
        self.in_flight = self.most = 0
        self.piled_up = asyncio.Event()

    async def credential(self, token_hash: str) -> Credential | None:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        if self.in_flight >= REGISTRY_TURNS:
            self.piled_up.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.piled_up.wait(), 2.0)
            return await self.store.credential(token_hash)
        finally:
            self.in_flight -= 1

    async def device(self, device_id: str) -> Device | None:
        return await self.store.device(device_id)
