"""The per-device bytes-per-second limit (`device_bytes_per_s`), beside the message and
reading limits: error `rate_limited`, then close 1008; live on SIGHUP like them. And the
object cap (`max_objects_per_message`) as a running hub answers it: error, then 1007.

Against a running hub and a real InfluxDB, with the bad-input table's helpers: a
well-behaved device stays connected throughout and is still acked afterwards.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer
from tests.support import HubProcess, add_device, hub_settings
from tests.test_bad_input import (
    WAIT_S,
    assert_good_device_still_acked,
    hub_with_devices,
    misbehave,
    reading,
    readings_message,
)
from tests.test_reload_settings import reload

PADDING = "x" * 64


def padded(count: int, start: int = 0) -> list[dict[str, Any]]:
    """`count` readings of about 125 bytes each."""
    return [reading(start + n, v=1.0, pad=PADDING) for n in range(count)]


@pytest.mark.integration
async def test_over_byte_rate_gets_an_error_then_close_1008(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Bytes beyond the per-device rate and burst: the first frame acked, then error, 1008."""
    # 1000 bytes a second; the burst is never less than one frame of max_message_bytes (4096).
    settings = hub_settings(
        tmp_path, influxdb.url, influx_bucket=influx_db_name, influx_api="v1",
        max_message_bytes=4096, device_bytes_per_s=1000.0, device_burst_s=1.0,
    )  # fmt: skip
    frames = [readings_message(seq, padded(25, seq * 100)) for seq in (1, 2)]
    assert all(3000 < len(frame) <= 4096 for frame in frames)
    async with hub_with_devices(settings) as hub:
        outcome = await misbehave(hub, *frames)
        assert outcome.kinds == ["ack", "error"], outcome.messages
        assert outcome.messages[1]["code"] == "rate_limited"
        assert "bytes a second" in outcome.messages[1]["message"]
        assert outcome.close_code == 1008
        await assert_good_device_still_acked(hub)


@pytest.mark.integration
async def test_one_largest_frame_always_fits_the_byte_burst(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A byte rate far below max_message_bytes still lets one full-size frame through."""
    settings = hub_settings(
        tmp_path, influxdb.url, influx_bucket=influx_db_name, influx_api="v1",
        max_message_bytes=4096, device_bytes_per_s=10.0, device_burst_s=1.0,
    )  # fmt: skip
    async with hub_with_devices(settings) as hub:
        async with DeviceClient(hub.service.url, hub.bad_token) as device:
            ack = await asyncio.wait_for(device.store(padded(25)), WAIT_S)
        assert ack.accepted == 25


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The hub's config file, at the default limits."""
    path = tmp_path / "hub.toml"
    path.write_text('log_level = "INFO"\n')
    return path


@pytest.mark.e2e
async def test_sighup_applies_a_lower_byte_rate_to_an_open_connection(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str, config: Path
) -> None:
    """After device_bytes_per_s drops, the same open connection is closed with 1008 once it
    sends more than the new burst (one max_message_bytes frame, 1 MiB)."""
    hub = HubProcess(tmp_path / "state", influxdb, influx_db_name, "--config", str(config))
    token = add_device(hub_settings(tmp_path / "state", None), "sensor-1")
    async with hub, DeviceClient(hub.url, token) as device:
        # Two ~625 KB messages: together over 1 MiB, well within the default 8 MiB burst.
        assert (await asyncio.wait_for(device.store(padded(5000)), WAIT_S)).accepted == 5000
        assert (await asyncio.wait_for(device.store(padded(5000, 10**4)), WAIT_S)).accepted == 5000
        await reload(hub, config, "device_bytes_per_s = 1000\n", "reloaded:")
        assert device.connection.close_code is None
        first = await device.send_readings(padded(5000, 2 * 10**4))
        assert (await asyncio.wait_for(first, WAIT_S)).accepted == 5000
        refused = await device.send_readings(padded(5000, 3 * 10**4))
        code, reason = await asyncio.wait_for(device.wait_closed(), WAIT_S)
        with pytest.raises(ConnectionError):
            await refused
    assert code == 1008
    assert "bytes a second" in (reason or "")


@pytest.mark.integration
async def test_frame_over_the_object_cap_gets_an_error_then_close_1007(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A 42 KB frame of 200 readings each dragging 200 nils, with max_objects_per_message
    20,000: acks for the messages before it, then error invalid_message, then 1007."""
    settings = hub_settings(
        tmp_path, influxdb.url, influx_bucket=influx_db_name, influx_api="v1",
        max_objects_per_message=20_000,
    )  # fmt: skip
    crowded = [{**reading(n), "junk": [None] * 200} for n in range(200)]
    frames = [readings_message(1, [reading(1)]), readings_message(2, crowded)]
    async with hub_with_devices(settings) as hub:
        outcome = await misbehave(hub, *frames)
        assert outcome.kinds == ["ack", "error"], outcome.messages
        assert outcome.messages[1]["code"] == "invalid_message"
        assert "at most 20000 msgpack objects" in outcome.messages[1]["message"]
        assert outcome.close_code == 1007
        await assert_good_device_still_acked(hub)
