"""SIGHUP reloads measurement schemas in a running `hub serve` without dropping connections."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer
from tests.support import HubProcess, add_device, hub_settings

pytestmark = pytest.mark.e2e

LOOSE = """
[measurements.environment.fields]
temperature = { type = "float" }
"""
STRICT = """
[measurements.environment.fields]
temperature = { type = "float", max = 50 }
"""
BROKEN = "[measurements.environment.fields\n"
HOT = [{"name": "environment", "time": 1_700_000_000_000, "fields": {"temperature": 80.0}}]


async def rejected_after_reload(client: DeviceClient, hub: HubProcess) -> bool:
    """Send HOT until the hub's verdict on it is a rejection (bounded)."""
    for _ in range(100):
        ack = await asyncio.wait_for(client.store(HOT), 10)
        if ack.rejected:
            return True
        await asyncio.sleep(0.05)
    raise AssertionError(f"the reload never took effect:\n{hub.log}")


async def test_sighup_applies_new_schema_to_open_connections(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """After SIGHUP the new schema judges the same, still open connection."""
    schema = tmp_path / "schemas.toml"
    schema.write_text(LOOSE)
    state = tmp_path / "state"
    token = add_device(hub_settings(state, None), "sensor-1")
    async with HubProcess(state, influxdb, influx_db_name, "--schemas", str(schema)) as hub:
        async with DeviceClient(hub.url, token) as client:
            assert (await asyncio.wait_for(client.store(HOT), 10)).accepted == 1
            schema.write_text(STRICT)
            hub.signal(signal.SIGHUP)
            assert await rejected_after_reload(client, hub)
            assert client.connection.close_code is None
        assert await hub.stop() == 0


async def test_broken_schema_file_keeps_previous_schemas(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A SIGHUP with a broken file logs the error and keeps judging by the old schemas."""
    schema = tmp_path / "schemas.toml"
    schema.write_text(STRICT)
    state = tmp_path / "state"
    token = add_device(hub_settings(state, None), "sensor-1")
    hub = HubProcess(state, influxdb, influx_db_name, "--schemas", str(schema))
    async with hub, DeviceClient(hub.url, token) as client:
        schema.write_text(BROKEN)
        hub.signal(signal.SIGHUP)
        for _ in range(100):
            if "schema reload failed" in hub.log:
                break
            await asyncio.sleep(0.05)
        assert "schema reload failed" in hub.log
        ack = await asyncio.wait_for(client.store(HOT), 10)
        assert ack.accepted == 0 and ack.rejected
