"""The MicroPython client's link to a real hub: TLS, an Origin header, fragments, pings and
dead links, frames larger than its buffer, readings sampled before the clock was set."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import pytest
from sensorhub import Clock, HubClient

from device_sim.local_servers import LocalServer
from tests.micropython_support import (
    client_state,
    drive_async,
    hub_url,
    pongs,
    registry,
    stored_times,
    stream,
)
from tests.support import add_device, hub_settings, running_hub
from tests.test_hardening import certificate  # noqa: F401  (the session's TLS certificate)

pytestmark = pytest.mark.integration

WAIT_S = 20.0
DEVICE = "board-1"


async def test_origin_header_is_accepted_where_the_operator_allows_it(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A board that sends `Origin` (as uwebsockets does) gets in when the origin is allowed."""
    settings = hub_settings(
        tmp_path / "state",
        influxdb.url,
        influx_bucket=influx_db_name,
        allowed_origins=["http://localhost"],
    )
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service:
        client = HubClient(hub_url(service), token, origin="http://localhost")
        times = stream(client, 3)
        await drive_async(client, lambda: client.acked == 3, WAIT_S)
        client.close()
    assert client.refusals == []
    assert stored_times(influxdb, influx_db_name) == times


async def test_streams_over_tls_checking_the_hub_certificate(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str, request: pytest.FixtureRequest
) -> None:
    """wss:// with the hub's CA given as DER `cadata` (as on a board): the non-blocking TLS
    socket streams; without the right CA the handshake fails and nothing is sent."""
    cert, key = request.getfixturevalue("certificate")
    settings = hub_settings(
        tmp_path / "state", influxdb.url, influx_bucket=influx_db_name, tls_cert=cert, tls_key=key
    )
    token = add_device(settings, DEVICE)
    cadata = ssl.PEM_cert_to_DER_cert(cert.read_text())
    async with running_hub(settings) as service:
        assert service.url.startswith("wss://")
        client = HubClient(hub_url(service), token, cadata=cadata, max_batch=20)
        times = stream(client, 100)
        await drive_async(client, lambda: client.acked == 100, WAIT_S)
        client.close()
        stranger = HubClient(hub_url(service), token, backoff_ms=10)  # the system's CAs
        stream(stranger, 1)
        await drive_async(stranger, lambda: stranger.failed_connects >= 1, WAIT_S)
    assert (client.connects, stranger.connects, stranger.sent) == (1, 0, 0)
    assert stored_times(influxdb, influx_db_name) == times


async def test_fragmented_messages_are_accepted(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Messages sent as 64-byte fragments are reassembled by the hub and stored."""
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service:
        client = HubClient(hub_url(service), token, max_batch=10, fragment_bytes=64)
        times = stream(client, 30)
        await drive_async(client, lambda: client.acked == 30, WAIT_S)
        client.close()
    assert stored_times(influxdb, influx_db_name) == times


async def test_pings_answered_while_idle_and_while_sending(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """With a 0.2 s ping interval and 0.5 s timeout the connection outlives many pings."""
    settings = hub_settings(
        tmp_path / "state",
        influxdb.url,
        influx_bucket=influx_db_name,
        ping_interval_s=0.2,
        ping_timeout_s=0.5,
    )
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service:
        client = HubClient(hub_url(service), token, max_batch=5, fragment_bytes=32)
        await drive_async(client, lambda: pongs(client) >= 5, WAIT_S)
        times = stream(client, 200)
        await drive_async(client, lambda: client.acked == 200, WAIT_S)
        client.close()
    assert (client.connects, client.close_codes) == (1, []), client_state(client)
    assert stored_times(influxdb, influx_db_name) == times


async def test_readings_sampled_before_the_clock_is_set_get_their_time_later(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Readings sampled while the clock reads 2000 get the time they were sampled at, once
    it is set, from the ticks counted meanwhile."""
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    token = add_device(settings, DEVICE)
    offset = [946_684_800_000 - int(time.time() * 1000)]  # the board boots in 2000

    def board_clock() -> int:
        return int(time.time() * 1000) + offset[0]

    clock = Clock(board_clock)
    assert clock.now_ms() is None
    async with running_hub(settings) as service:
        client = HubClient(hub_url(service), token, clock=clock)
        sampled_at = int(time.time() * 1000)
        client.add("env", {"t": 1.0})
        await asyncio.sleep(0.3)
        offset[0] = 0  # NTP answered
        await drive_async(client, lambda: client.acked == 1, WAIT_S)
        client.close()
    (stored,) = stored_times(influxdb, influx_db_name)
    print(f"sampled at {sampled_at}, stored at {stored}: {stored - sampled_at} ms apart")
    assert abs(stored - sampled_at) < 200


async def test_frames_larger_than_the_buffer_are_read_in_part(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """With the smallest frame buffer (125 bytes, a ping's), a long ack (every reading
    rejected) still acks its message, and a config too large is refused with the reason."""
    schemas = tmp_path / "schemas.toml"
    schemas.write_text("accept_unknown_measurements = false\n")
    settings = hub_settings(
        tmp_path / "state", influxdb.url, influx_bucket=influx_db_name, schemas=schemas
    )
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service:
        operator = registry(service)
        try:
            version = operator.set_config([DEVICE], updates={"note": "x" * 500})[DEVICE]
            client = HubClient(hub_url(service), token, max_frame_bytes=64, max_batch=20)
            stream(client, 20)
            await drive_async(client, lambda: client.rejected == 20, WAIT_S)
            await drive_async(
                client, lambda: operator.config_state(DEVICE).acked_version == version, WAIT_S
            )
            state = operator.config_state(DEVICE)
            client.close()
        finally:
            operator.close()
    assert (client.acked, client.buffer.held(), client.connects) == (0, 0, 1)
    assert state.ack_ok is False
    assert state.ack_error == "config larger than this device's 125-byte frame buffer"


async def test_silence_longer_than_the_idle_timeout_is_a_dead_link(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Pings keep an idle connection alive; without them, idle_timeout_ms ends it (1006)
    and the client reconnects."""
    fast = hub_settings(
        tmp_path / "fast", influxdb.url, influx_bucket=influx_db_name, ping_interval_s=0.1
    )
    token = add_device(fast, DEVICE)
    async with running_hub(fast) as service:
        client = HubClient(hub_url(service), token, idle_timeout_ms=500)
        await drive_async(client, lambda: pongs(client) >= 15, WAIT_S)  # 1.5 s
        client.close()
    assert (client.connects, client.close_codes) == (1, []), client_state(client)
    slow = hub_settings(
        tmp_path / "slow", influxdb.url, influx_bucket=influx_db_name, ping_interval_s=60
    )
    token = add_device(slow, DEVICE)
    async with running_hub(slow) as service:
        client = HubClient(hub_url(service), token, idle_timeout_ms=300, backoff_ms=10)
        await drive_async(client, lambda: client.connects >= 2, WAIT_S)
        client.close()
    assert client.close_codes[0] == 1006, client_state(client)
