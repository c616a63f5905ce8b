"""SIGHUP reloads the live settings (limits, log level) of a running `hub serve` from its
config file, without dropping connections; other changes wait for a restart."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer
from hub.settings import Settings, reload_changes
from tests.support import HubProcess, add_device, hub_settings

WAIT_S = 30.0
T0_MS = 1_700_000_000_000


def readings(count: int, start: int = 0) -> list[dict[str, Any]]:
    """`count` readings with distinct times."""
    return [
        {"name": "environment", "time": T0_MS + start + i, "fields": {"temperature": 20.5}}
        for i in range(count)
    ]


async def logged(hub: HubProcess, text: str) -> None:
    """Wait (bounded) until the hub's log holds `text`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while text not in hub.log:
        assert loop.time() < deadline, f"{text!r} never logged:\n{hub.log}"
        await asyncio.sleep(0.05)


async def reload(hub: HubProcess, config: Path, text: str, expect: str) -> None:
    """Write `text` to the config file, SIGHUP the hub, wait until it logs `expect`."""
    config.write_text(text)
    hub.signal(signal.SIGHUP)
    await logged(hub, expect)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The hub's config file: INFO logs, up to 100 readings a message."""
    path = tmp_path / "hub.toml"
    path.write_text('log_level = "INFO"\nmax_readings_per_message = 100\n')
    return path


@pytest.fixture
def hub(tmp_path: Path, influxdb: LocalServer, influx_db_name: str, config: Path) -> HubProcess:
    """A `hub serve` process reading `config`."""
    return HubProcess(tmp_path / "state", influxdb, influx_db_name, "--config", str(config))


@pytest.fixture
def token(tmp_path: Path) -> str:
    """A registered device's token."""
    return add_device(hub_settings(tmp_path / "state", None), "sensor-1")


@pytest.mark.e2e
async def test_sighup_applies_a_lower_reading_limit_to_an_open_connection(
    hub: HubProcess, config: Path, token: str
) -> None:
    """After the limit drops to 5, the same open connection is closed for sending 10."""
    async with hub, DeviceClient(hub.url, token) as device:
        assert (await asyncio.wait_for(device.store(readings(10)), WAIT_S)).accepted == 10
        await reload(hub, config, "max_readings_per_message = 5\n", "reloaded:")
        assert device.connection.close_code is None
        refused = await device.send_readings(readings(10, start=100))
        code, reason = await asyncio.wait_for(device.wait_closed(), WAIT_S)
        with pytest.raises(ConnectionError):
            await refused
    assert code == 1007
    assert "at most 5" in (reason or "")


@pytest.mark.e2e
async def test_sighup_applies_the_log_level(hub: HubProcess, config: Path, token: str) -> None:
    """After log_level becomes DEBUG, debug lines appear."""
    async with hub, DeviceClient(hub.url, token) as device:
        await reload(hub, config, 'log_level = "DEBUG"\n', "log_level = DEBUG")
        await asyncio.wait_for(device.store(readings(1)), WAIT_S)
        await logged(hub, "DEBUG hub.pipeline: wrote")


@pytest.mark.e2e
async def test_sighup_names_changes_that_need_a_restart(hub: HubProcess, config: Path) -> None:
    """A changed batch_size is reported as waiting for a restart; the hub runs on."""
    async with hub:
        await reload(
            hub,
            config,
            "batch_size = 10\n",
            "changed settings that apply only after a restart: batch_size",
        )
        assert await hub.stop() == 0


@pytest.mark.e2e
async def test_a_broken_config_file_changes_nothing(
    hub: HubProcess, config: Path, token: str
) -> None:
    """A config file that no longer parses is logged; the previous limits stay."""
    async with hub, DeviceClient(hub.url, token) as device:
        await reload(
            hub,
            config,
            "max_readings_per_message = 5\nport = [\n",
            "reload failed, keeping the current settings and schemas",
        )
        ack = await asyncio.wait_for(device.store(readings(10)), WAIT_S)
    assert ack.accepted == 10


@pytest.mark.unit
def test_reload_changes_splits_live_settings_from_the_rest(tmp_path: Path) -> None:
    """Live settings are applied with their new values; the others are only named."""
    current = Settings(state_dir=tmp_path)
    fresh = Settings(state_dir=tmp_path, max_connections=10, port=9999, log_level="DEBUG")
    live, restart = reload_changes(current, fresh)
    assert live == {"max_connections": 10, "log_level": "DEBUG"}
    assert restart == ["port"]


@pytest.mark.unit
def test_reload_changes_finds_nothing_when_nothing_changed(tmp_path: Path) -> None:
    """The same settings again change nothing."""
    settings = Settings(state_dir=tmp_path)
    assert reload_changes(settings, Settings(state_dir=tmp_path)) == ({}, [])
