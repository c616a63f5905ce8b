"""The last slot cannot be taken twice: a handshake's claim (an await, on PostgreSQL a round
trip) comes after its last room check, so the slot is reserved across it. The order is
driven: both handshakes are held inside their claims until both got there."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer
from hub.registry.records import Claim
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
