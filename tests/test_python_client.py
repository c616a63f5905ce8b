"""The public Python client (`sensorhub_client`) against a real hub and InfluxDB 1.6.7, and
its reconnect policy against the MicroPython client's."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sensorhub import policy as micro_policy

from device_sim.local_servers import LocalServer
from hub.registry.sqlite import Registry
from sensorhub_client import DeviceClient, StreamingClient
from sensorhub_client import policy as python_policy
from tests.support import HubProcess, add_device, hub_settings, points, running_hub

WAIT_S = 20.0
T0_NS = 1_750_000_000 * 10**9
DEVICE = "pi-1"


@asynccontextmanager
async def running(client: StreamingClient) -> AsyncIterator[asyncio.Task[str | None]]:
    """`client.run()` as a task, stopped (bounded) on exit."""
    task = asyncio.create_task(client.run())
    try:
        yield task
    finally:
        client.stop()
        async with asyncio.timeout(WAIT_S):
            await task


async def until(check: Any, what: str) -> None:
    """Wait (bounded, polling the loop) until `check()` holds."""
    async with asyncio.timeout(WAIT_S):
        while not check():
            await asyncio.sleep(0.01)


def add_readings(client: StreamingClient, count: int, start: int = 0) -> list[int]:
    """Readings with times T0 + start, T0 + start + 1 ... (ns); their times."""
    times = [T0_NS + (start + i) * 1000 for i in range(count)]
    for index, stamp in enumerate(times):
        client.add("env", {"n": start + index}, {"room": "hall"}, time_ns=stamp)
    return times


def stored(influxdb: LocalServer, db: str) -> list[int]:
    """Sorted ns times of every `env` point."""
    return sorted(row["time"] for row in points(influxdb, db, "env"))


@pytest.mark.integration
async def test_streams_and_applies_config(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Readings are acked and stored; a pushed config reaches the callback and is acked."""
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    token = add_device(settings, DEVICE)
    configs: list[tuple[dict[str, Any], int]] = []

    async def on_config(config: dict[str, Any], version: int) -> str | None:
        configs.append((config, version))
        return None

    async with running_hub(settings) as service:
        client = StreamingClient(service.url, token, on_config, max_batch=40)
        operator = Registry(settings.registry_path)
        try:
            async with running(client):
                times = add_readings(client, 100)
                assert await client.flush(WAIT_S)
                version = operator.set_config([DEVICE], updates={"interval_s": 2})[DEVICE]
                await until(lambda: operator.config_state(DEVICE).acked_version == version, "")
                assert operator.config_state(DEVICE).ack_ok is True
        finally:
            operator.close()
    assert configs == [({"interval_s": 2}, version)]
    assert (client.stats.acked, client.stats.sent, client.stats.connects) == (100, 100, 1)
    assert stored(influxdb, influx_db_name) == times


@pytest.mark.e2e
async def test_restart_resends_and_loses_nothing(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Sent to a frozen hub that is killed, then restarted: resent, each stored once; a
    graceful restart (1001) afterwards loses nothing either."""
    state_dir = tmp_path / "state"
    hub = HubProcess(state_dir, influxdb, influx_db_name)
    token = add_device(hub_settings(state_dir, influxdb.url), DEVICE)
    client = StreamingClient(hub.url, token, max_batch=10, window=4, backoff_base_s=0.2)
    await hub.start()
    try:
        async with running(client):
            first = add_readings(client, 20)
            assert await client.flush(WAIT_S)
            hub.signal(signal.SIGSTOP)
            try:
                second = add_readings(client, 40, 20)
                await until(lambda: client.stats.sent == 60, "sent to the frozen hub")
                await asyncio.sleep(0)  # let the frames reach the socket
            finally:
                await hub.kill()
            await hub.start()
            assert await client.flush(WAIT_S), client.stats
            await hub.stop()
            third = add_readings(client, 10, 60)
            await hub.start()
            assert await client.flush(WAIT_S), client.stats
    finally:
        await hub.stop()
    assert client.stats.resent >= 40
    assert 1001 in client.stats.close_codes
    assert stored(influxdb, influx_db_name) == first + second + third


@pytest.mark.integration
async def test_revocation_stops_and_capacity_waits(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """503 at capacity is waited out (Retry-After, 5 s); 4001 then stops the client."""
    settings = hub_settings(
        tmp_path / "state", influxdb.url, influx_bucket=influx_db_name, max_connections=1
    )
    other = add_device(settings, "other")
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service:
        client = StreamingClient(service.url, token, backoff_base_s=0.01)
        task = asyncio.create_task(client.run())
        async with DeviceClient(service.url, other):
            await until(lambda: client.stats.refusals[:1] == [503], "refused")
            assert client.next_attempt_in_s >= 5.0
        await until(lambda: client.stats.connects == 1, "connected")
        operator = Registry(settings.registry_path)
        try:
            operator.revoke(DEVICE)
        finally:
            operator.close()
        async with asyncio.timeout(WAIT_S):
            assert await task == "revoked"
    assert client.stats.close_codes == [4001]


@pytest.mark.integration
async def test_too_big_messages_are_halved_until_they_fit(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """1009: the unacked messages and the batch are halved; every reading is stored."""
    settings = hub_settings(
        tmp_path / "state", influxdb.url, influx_bucket=influx_db_name, max_message_bytes=1000
    )
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service:
        client = StreamingClient(service.url, token, max_batch=40, backoff_base_s=0.01)
        async with running(client):
            times = add_readings(client, 40)  # one message of about 1800 bytes
            assert await client.flush(WAIT_S), client.stats
    assert 1009 in client.stats.close_codes
    assert client.max_batch <= 20
    assert (client.stats.acked, client.stats.dropped) == (40, 0)
    assert stored(influxdb, influx_db_name) == times


@pytest.mark.integration
async def test_refused_message_1007_is_dropped_alone(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """1007 (more readings than the hub takes in a message): that message is dropped, the
    next ones are stored."""
    settings = hub_settings(
        tmp_path / "state", influxdb.url, influx_bucket=influx_db_name, max_readings_per_message=5
    )
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service:
        client = StreamingClient(service.url, token, max_batch=10, backoff_base_s=0.01)
        async with running(client):
            add_readings(client, 10)
            await until(lambda: client.stats.dropped == 10, "dropped")
            client.max_batch = 5
            times = add_readings(client, 5, 10)
            assert await client.flush(WAIT_S), client.stats
    assert client.stats.close_codes == [1007]
    assert stored(influxdb, influx_db_name) == times


@pytest.mark.unit
@pytest.mark.parametrize("code", [*range(1000, 1016), 4000, 4001, 4002, 3000])
def test_both_clients_have_the_same_close_policy(code: int) -> None:
    """The Python and MicroPython clients do the same after every close code."""
    action, wait_s = python_policy.after_close(code)
    assert micro_policy.after_close(code) == (str(action), int(wait_s))


@pytest.mark.unit
@pytest.mark.parametrize("status", range(400, 600))
def test_both_clients_have_the_same_refusal_policy(status: int) -> None:
    """... and after every refused handshake, with or without Retry-After."""
    for retry_after in (None, 7):
        action, wait_s = python_policy.after_refusal(status, retry_after)
        assert micro_policy.after_refusal(status, retry_after) == (str(action), int(wait_s))


@pytest.mark.integration
async def test_readings_sampled_before_the_clock_is_set_get_their_time_later(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A reading sampled while the clock reads 1970 is stored at the instant it was sampled,
    computed from the monotonic clock once the wall clock is right."""
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    token = add_device(settings, DEVICE)
    offset = [-time.time_ns()]  # the box boots at the epoch

    def wall_clock_ns() -> int:
        return time.time_ns() + offset[0]

    async with running_hub(settings) as service:
        client = StreamingClient(service.url, token, wall_clock_ns=wall_clock_ns)
        sampled_at = time.time_ns()
        client.add("env", {"n": 1})
        await asyncio.sleep(0.2)
        offset[0] = 0  # NTP answered
        async with running(client):
            assert await client.flush(WAIT_S)
    (stored_ns,) = stored(influxdb, influx_db_name)
    print(f"stored {(stored_ns - sampled_at) / 1e6:.1f} ms from the sampling instant")
    assert abs(stored_ns - sampled_at) < 100_000_000
