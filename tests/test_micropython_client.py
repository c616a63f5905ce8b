"""The MicroPython client, run on CPython, against a real hub and a real InfluxDB 1.6.7.

The same files a board runs (clients/micropython/sensorhub) stream readings, take config,
and react to every close code and refusal the hub produces. The hub runs in-process (or as
a `hub serve` process for the restart); the client runs in a worker thread. The link itself
(TLS, Origin, fragments, pings, dead links, small buffers, the clock) is in
tests/test_micropython_client_link.py.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from sensorhub import HubClient

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer
from tests.micropython_support import (
    T0_MS,
    client_state,
    drive,
    drive_async,
    hub_url,
    registry,
    stored_times,
    stream,
    was_refused,
)
from tests.support import HubProcess, add_device, hub_settings, points, running_hub

WAIT_S = 20.0
DEVICE = "board-1"


@pytest.mark.integration
async def test_streams_readings_into_influxdb(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Every reading added is acked and stored with its time, tags and the device tag."""
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service:
        client = HubClient(hub_url(service), token, max_batch=25)
        times = stream(client, 120)
        await drive_async(client, lambda: client.acked == 120, WAIT_S)
        client.close()
    assert client.buffer.held() == 0
    assert (client.sent, client.rejected, client.connects) == (120, 0, 1)
    rows = points(influxdb, influx_db_name, "env")
    assert sorted(row["time"] // 1_000_000 for row in rows) == times
    assert {row["device"] for row in rows} == {DEVICE}
    assert {row["room"] for row in rows} == {"hall"}
    assert sorted(row["n"] for row in rows) == list(range(120))


@pytest.mark.integration
async def test_config_push_applied_and_acked(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A pushed config reaches the callback; its answer (applied, or refused) is recorded."""
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    token = add_device(settings, DEVICE)
    applied: list[tuple[dict[Any, Any], int]] = []

    def on_config(config: dict[Any, Any], version: int) -> str | None:
        applied.append((config, version))
        interval = config.get("interval_s")
        if not isinstance(interval, int | float) or interval < 1:
            return "interval_s must be at least 1"
        return None

    async with running_hub(settings) as service:
        operator = registry(service)
        try:
            first = operator.set_config([DEVICE], updates={"interval_s": 5})[DEVICE]
            client = HubClient(hub_url(service), token, on_config)
            await drive_async(
                client, lambda: operator.config_state(DEVICE).acked_version == first, WAIT_S
            )
            assert operator.config_state(DEVICE).ack_ok is True
            second = operator.set_config([DEVICE], updates={"interval_s": 0})[DEVICE]
            await drive_async(
                client, lambda: operator.config_state(DEVICE).acked_version == second, WAIT_S
            )
            state = operator.config_state(DEVICE)
            client.close()
        finally:
            operator.close()
    assert applied == [({"interval_s": 5}, first), ({"interval_s": 0}, second)]
    assert (state.ack_ok, state.ack_error) == (False, "interval_s must be at least 1")


@pytest.mark.integration
async def test_replaced_connection_waits_long(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """4000 (a newer connection with the same token) makes the client wait at least 60 s."""
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service:
        client = HubClient(hub_url(service), token)
        await drive_async(client, lambda: client.ws is not None, WAIT_S)
        async with DeviceClient(hub_url(service), token):
            await drive_async(client, lambda: 4000 in client.close_codes, WAIT_S)
            assert client.retry_in_ms() >= 59_000, client_state(client)
            assert client.connects == 1


@pytest.mark.e2e
async def test_restart_resends_unacked_and_loses_nothing_acked(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Across a hub restart (1001) the client resends what was not acked; all is stored."""
    state_dir = tmp_path / "state"
    hub = HubProcess(state_dir, influxdb, influx_db_name)
    token = add_device(hub_settings(state_dir, influxdb.url), DEVICE)
    client = HubClient(hub.url, token, max_readings=5000, max_batch=20, window=4, backoff_ms=200)
    added: list[int] = []

    def keep_streaming(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            added.extend(stream(client, 5, T0_MS + len(added)))
            client.poll(10)

    await hub.start()
    try:
        await asyncio.to_thread(keep_streaming, 1.0)
        assert client.acked > 0, client_state(client)
        added.extend(stream(client, 2000, T0_MS + len(added)))  # still sending at the stop
        stopping = asyncio.create_task(hub.stop())
        await asyncio.to_thread(drive, client, lambda: 1001 in client.close_codes, WAIT_S)
        assert await stopping == 0
        assert 1001 in client.close_codes, client_state(client)
        unread = [m for m in client.buffer.unacked if m.sent]  # sent, never acked
        stored = stored_times(influxdb, influx_db_name)
        assert len(stored) >= client.acked  # nothing acked is lost
        await asyncio.to_thread(keep_streaming, 0.3)  # buffered while the hub is down
        await hub.start()
        await drive_async(client, lambda: client.buffer.held() == 0, WAIT_S)
        client.close()
    finally:
        await hub.stop()
    print(f"1001 with {len(unread)} messages sent and not acked; {client.resent} resent")
    assert client.connects == 2, client_state(client)
    assert client.resent >= sum(len(m.readings) for m in unread)
    assert stored_times(influxdb, influx_db_name) == added


@pytest.mark.e2e
async def test_crash_resends_what_the_hub_never_acked(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Messages sent to a frozen hub that is then killed (1006) are resent after its
    restart, and every reading is stored exactly once."""
    state_dir = tmp_path / "state"
    hub = HubProcess(state_dir, influxdb, influx_db_name)
    token = add_device(hub_settings(state_dir, influxdb.url), DEVICE)
    client = HubClient(hub.url, token, max_batch=10, window=4, backoff_ms=200)
    await hub.start()
    try:
        first = stream(client, 20)
        await drive_async(client, lambda: client.acked == 20, WAIT_S)
        hub.signal(signal.SIGSTOP)
        try:
            second = stream(client, 40, T0_MS + 20)
            await drive_async(
                client, lambda: sum(m.sent for m in client.buffer.unacked) == 4, WAIT_S
            )
        finally:
            await hub.kill()
        await hub.start()
        await drive_async(client, lambda: client.buffer.held() == 0, WAIT_S)
        client.close()
    finally:
        await hub.stop()
    assert client.resent >= 40, client_state(client)
    assert 1006 in client.close_codes
    assert stored_times(influxdb, influx_db_name) == first + second


@pytest.mark.integration
async def test_invalid_message_1007_drops_only_the_refused_message(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """After 1007 the oldest unacked message (the refused one) is dropped, the rest stored."""
    settings = hub_settings(
        tmp_path / "state", influxdb.url, influx_bucket=influx_db_name, max_readings_per_message=10
    )
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service:
        client = HubClient(hub_url(service), token, max_batch=20, backoff_ms=50)
        stream(client, 20)
        await drive_async(client, lambda: 1007 in client.close_codes, WAIT_S)
        assert client.buffer.dropped == 20
        assert client.last_error is not None and "invalid_message" in client.last_error
        client.buffer.max_batch = 10
        times = stream(client, 10, T0_MS + 100)
        await drive_async(client, lambda: client.acked == 10, WAIT_S)
        client.close()
    assert client.connects == 2
    assert stored_times(influxdb, influx_db_name) == times


@pytest.mark.integration
async def test_too_big_1009_splits_and_stores_everything(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A hub frame limit below the client's: 1009, the messages are halved, all stored."""
    settings = hub_settings(
        tmp_path / "state", influxdb.url, influx_bucket=influx_db_name, max_message_bytes=1500
    )
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service:
        client = HubClient(hub_url(service), token, max_batch=50, backoff_ms=50)
        times = stream(client, 50)
        await drive_async(client, lambda: client.acked == 50, WAIT_S)
        client.close()
    assert 1009 in client.close_codes
    assert client.buffer.max_batch < 50
    assert stored_times(influxdb, influx_db_name) == times


@pytest.mark.integration
async def test_revoked_4001_stops(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Revoking the token closes with 4001 and the client never reconnects."""
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service:
        client = HubClient(hub_url(service), token, backoff_ms=10)
        await drive_async(client, lambda: client.ws is not None, WAIT_S)
        operator = registry(service)
        try:
            operator.revoke(DEVICE)
        finally:
            operator.close()
        await drive_async(client, lambda: client.stopped is not None, WAIT_S)
        await asyncio.to_thread(client.poll, 300)
    assert (client.stopped, client.close_codes, client.connects) == ("revoked", [4001], 1)
    assert client.failed_connects == 0


@pytest.mark.integration
async def test_at_capacity_503_waits_for_retry_after(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """503 with Retry-After: the next attempt comes no sooner; then the client gets in."""
    settings = hub_settings(
        tmp_path / "state", influxdb.url, influx_bucket=influx_db_name, max_connections=1
    )
    other_token = add_device(settings, "other")
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service:
        client = HubClient(hub_url(service), token, backoff_ms=10)
        async with DeviceClient(hub_url(service), other_token):
            await drive_async(client, lambda: client.refusals == [503], WAIT_S)
            wait_ms = client.retry_in_ms()
        assert wait_ms >= 4_900  # the hub's Retry-After is 5 s
        started = time.monotonic()
        await drive_async(client, lambda: client.ws is not None, WAIT_S)
        waited = time.monotonic() - started
        client.close()
    print(f"503: told to wait {wait_ms} ms, connected after {waited:.2f} s more")
    assert waited * 1000 >= wait_ms - 100
    assert (client.connects, client.refusals) == (1, [503])


@pytest.mark.integration
async def test_blocked_address_429_waits_then_stops_on_401(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A wrong token from a blocked address gets 429: the client waits Retry-After, then
    stops for good on the 401 that follows."""
    settings = hub_settings(
        tmp_path / "state",
        influxdb.url,
        influx_bucket=influx_db_name,
        auth_failures_burst=1,
        auth_failures_per_min=0.001,
        auth_block_s=2,
    )
    add_device(settings, DEVICE)
    async with running_hub(settings) as service:
        for _ in range(2):  # wrong tokens until the address is blocked
            probe = HubClient(hub_url(service), "wrong-token-" + "x" * 20)
            await drive_async(probe, functools.partial(was_refused, probe), WAIT_S)
        client = HubClient(hub_url(service), "wrong-token-" + "y" * 20, backoff_ms=10)
        await drive_async(client, lambda: client.refusals == [429], WAIT_S)
        wait_ms = client.retry_in_ms()
        started = time.monotonic()
        await drive_async(client, lambda: client.stopped is not None, WAIT_S)
        waited = time.monotonic() - started
    print(f"429: told to wait {wait_ms} ms, next attempt after {waited:.2f} s")
    assert wait_ms >= 1_000
    assert waited * 1000 >= wait_ms - 100
    assert (client.refusals, client.stopped) == ([429, 401], "unauthorized")
