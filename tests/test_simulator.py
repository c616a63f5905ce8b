"""The device simulator against a real hub and a real InfluxDB 1.6.7: what it sends, what
it counts, and how it behaves like good firmware (resend, backoff, config, close codes)."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path
from typing import Any

import msgpack
import pytest

from device_sim.client import DeviceClient
from device_sim.device import DeviceState, reconnect_delay
from device_sim.fleet import Credentials, FleetReport, run_fleet
from device_sim.local_servers import LocalServer, influxql
from device_sim.sensors import (
    MEASUREMENT,
    OUT_OF_RANGE_HUMIDITY,
    SCHEMA_TOML,
    SensorProfile,
    readings_frame,
)
from device_sim.stats import FleetStats
from hub.registry.sqlite import Registry
from hub.settings import Settings
from tests.support import HubProcess, hub_settings, running_hub

RUN_BOUND_S = 60.0
FAST_BACKOFF: dict[str, Any] = {"backoff_base_s": 0.05, "backoff_cap_s": 0.5}


def register(
    settings_or_dir: Settings | Path, count: int, prefix: str = "sim-"
) -> list[Credentials]:
    """Register `count` devices in one transaction and return their credentials."""
    path = (
        settings_or_dir.registry_path
        if isinstance(settings_or_dir, Settings)
        else settings_or_dir / "registry.sqlite3"
    )
    ids = [f"{prefix}{n}" for n in range(count)]
    registry = Registry(path)
    try:
        return [Credentials(i, t) for i, t in zip(ids, registry.add_many(ids), strict=True)]
    finally:
        registry.close()


def stored_times(influx: LocalServer, db: str, device_id: str) -> list[int]:
    """The nanosecond timestamps InfluxDB holds for one device, sorted."""
    rows = influxql(
        influx.url, db, f"SELECT temperature FROM {MEASUREMENT} WHERE device = '{device_id}'"
    )
    return sorted(int(row["time"]) for row in rows)


def assert_acked_exactly_stored(report: FleetReport, influx: LocalServer, db: str) -> None:
    """Every acked reading is in InfluxDB, and nothing else from these devices."""
    for device_id, device in report.devices.items():
        assert stored_times(influx, db, device_id) == device.acked_times_ns(), device_id


async def bounded_fleet(*args: object, **kwargs: object) -> FleetReport:
    """`run_fleet` with the test's bound, so a hang fails instead of blocking."""
    return await asyncio.wait_for(run_fleet(*args, **kwargs), RUN_BOUND_S)  # type: ignore[arg-type]


@pytest.fixture
def settings(tmp_path: Path, influxdb: LocalServer, influx_db_name: str) -> Settings:
    """A hub writing to a fresh database, with the simulator's measurement schema."""
    schemas = tmp_path / "schemas.toml"
    schemas.write_text(SCHEMA_TOML)
    return hub_settings(
        tmp_path / "state",
        influxdb.url,
        influx_bucket=influx_db_name,
        influx_api="v1",
        schemas=schemas,
        registry_poll_s=0.02,
    )


# --- Readings -------------------------------------------------------------------------------


@pytest.mark.integration
async def test_acked_readings_are_exactly_those_in_influxdb(
    settings: Settings, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Each device's acked timestamps are exactly the points InfluxDB holds for it."""
    creds = register(settings, 3)
    async with running_hub(settings) as service:
        report = await bounded_fleet(service.url, creds, rate=20, batch=10, duration=1.0)
    assert report.acked == report.sent > 0
    assert report.total("unacked") == 0
    assert_acked_exactly_stored(report, influxdb, influx_db_name)


@pytest.mark.integration
async def test_out_of_range_readings_are_rejected_and_not_stored(
    settings: Settings, influxdb: LocalServer, influx_db_name: str
) -> None:
    """With --invalid-ratio, rejected readings are counted, acked ones stored, none lost."""
    creds = register(settings, 2)
    async with running_hub(settings) as service:
        report = await bounded_fleet(
            service.url, creds, rate=20, batch=10, duration=1.0, invalid_ratio=0.3
        )
    assert report.total("rejected") > 0
    assert report.acked + report.total("rejected") == report.sent
    assert_acked_exactly_stored(report, influxdb, influx_db_name)


@pytest.mark.integration
async def test_timestamps_are_unique_per_device(settings: Settings) -> None:
    """Every reading a device sends carries its own timestamp, so resends cannot duplicate."""
    creds = register(settings, 1)
    async with running_hub(settings) as service:
        report = await bounded_fleet(service.url, creds, rate=50, batch=20, duration=0.5)
    times = report.acked_times(creds[0].device_id)
    assert len(times) == len(set(times)) == report.acked > 0


@pytest.mark.integration
async def test_stop_event_ends_the_run_with_everything_acked(settings: Settings) -> None:
    """Setting the stop event ends a long run early; what was sent is still acked."""
    creds = register(settings, 2)
    stop = asyncio.Event()
    stats = FleetStats()
    async with running_hub(settings) as service:
        fleet = asyncio.create_task(
            run_fleet(service.url, creds, rate=10, batch=5, duration=3600, stop=stop, stats=stats)
        )
        while stats.acked == 0:
            await asyncio.sleep(0.02)
        stop.set()
        report = await asyncio.wait_for(fleet, RUN_BOUND_S)
    assert report.acked == report.sent > 0


# --- Reconnects -----------------------------------------------------------------------------


@pytest.mark.e2e
async def test_unacked_readings_are_resent_after_the_hub_restarts(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A hub killed with readings in flight: devices reconnect, resend, and all is stored."""
    state = tmp_path / "state"
    creds = register(state, 3)
    hub = HubProcess(state, influxdb, influx_db_name, "--influx-api", "v1")
    await hub.start()
    stats = FleetStats()
    fleet = asyncio.create_task(
        run_fleet(hub.url, creds, rate=20, batch=10, duration=3.0, stats=stats, **FAST_BACKOFF)
    )
    try:
        while stats.acked == 0:
            await asyncio.sleep(0.02)
        influxdb.pause()  # acks wait on InfluxDB, so messages are in flight when the hub dies
        try:
            await asyncio.sleep(0.3)
            hub.signal(signal.SIGKILL)
            await asyncio.to_thread(hub.process.wait)  # type: ignore[union-attr]
        finally:
            influxdb.resume()
        await hub.start()
        report = await asyncio.wait_for(fleet, RUN_BOUND_S)
    finally:
        await hub.stop()
    assert report.total("resent") > 0
    assert report.total("reconnects") >= len(creds)
    assert report.acked == report.sent
    assert_acked_exactly_stored(report, influxdb, influx_db_name)


@pytest.mark.unit
@pytest.mark.parametrize("invalid_ratio", [0.0, 0.3])
def test_prepacked_readings_are_the_bytes_msgpack_packs(invalid_ratio: float) -> None:
    """The load generator's prepacked readings and frames are byte for byte what packing
    the same readings gives, out-of-range ones included."""
    packed = SensorProfile(random.Random(5), "room-7", invalid_ratio)
    plain = SensorProfile(random.Random(5), "room-7", invalid_ratio)
    start = 1_700_000_000_000_000
    readings = [plain.reading(start + n) for n in range(3000)]
    prepacked = [packed.packed_reading(start + n) for n in range(3000)]
    assert prepacked == [msgpack.packb(reading) for reading in readings]
    if invalid_ratio:
        assert any(r["fields"]["humidity"] == OUT_OF_RANGE_HUMIDITY for r in readings)
    for seq in (0, 1, 127, 128, 65_536, 2**40):
        message = {"type": "readings", "seq": seq, "readings": readings[:50]}
        assert readings_frame(seq, prepacked[:50]) == msgpack.packb(message)


@pytest.mark.unit
def test_backoff_is_full_jitter_below_an_exponential_cap() -> None:
    """Reconnect delays are spread over [0, min(cap, base * 2**attempt)], never above it."""
    rng = random.Random(7)
    for attempt in range(10):
        ceiling = min(30.0, 0.5 * 2**attempt)
        delays = [reconnect_delay(attempt, rng, 0.5, 30.0) for _ in range(500)]
        assert all(0 <= d <= ceiling for d in delays)
        assert min(delays) < ceiling * 0.1 and max(delays) > ceiling * 0.9
        assert len(set(delays)) == len(delays)


@pytest.mark.unit
def test_retry_after_is_a_minimum_with_jitter_on_top() -> None:
    """A 503's Retry-After is waited in full, plus a random share of the backoff."""
    rng = random.Random(7)
    delays = [reconnect_delay(3, rng, 0.5, 30.0, retry_after_s=5.0) for _ in range(200)]
    assert all(5.0 <= d <= 5.0 + 4.0 for d in delays)
    assert len(set(delays)) == len(delays)


@pytest.mark.integration
async def test_503_retry_after_is_honoured(settings: Settings) -> None:
    """Refused with 503 Retry-After 5 s, a device does not retry within a 1 s run."""
    full = settings.model_copy(update={"max_connections": 1})
    first, second = register(full, 2)
    async with running_hub(full) as service, DeviceClient(service.url, first.token):
        report = await bounded_fleet(
            service.url,
            [second],
            rate=10,
            batch=1,
            duration=1.0,
            start_spread_s=0,
            final_wait_s=0,
            backoff_base_s=0.01,
            backoff_cap_s=0.02,
        )
    device = report.devices[second.device_id]
    assert device.failed_connects == 1
    assert device.connects == 0


@pytest.mark.integration
async def test_a_revoked_device_stops(settings: Settings) -> None:
    """Closed with 4001, a device stops for good: no reconnect, state `revoked`."""
    (creds,) = register(settings, 1)
    stats = FleetStats()
    async with running_hub(settings) as service:
        fleet = asyncio.create_task(
            run_fleet(service.url, [creds], rate=10, batch=5, duration=3600, stats=stats)
        )
        while stats.acked == 0:
            await asyncio.sleep(0.02)
        registry = Registry(settings.registry_path)
        try:
            registry.revoke(creds.device_id)
        finally:
            registry.close()
        report = await asyncio.wait_for(fleet, RUN_BOUND_S)
    device = report.devices[creds.device_id]
    assert device.state == DeviceState.REVOKED
    assert device.close_codes == [4001]
    assert device.connects == 1


@pytest.mark.integration
async def test_an_unknown_token_stops_the_device(settings: Settings) -> None:
    """Answered 401, a device gives up at once instead of retrying in a loop."""
    async with running_hub(settings) as service:
        report = await bounded_fleet(
            service.url,
            [Credentials("ghost", "hubt_not-a-token")],
            rate=1,
            batch=1,
            duration=5,
            start_spread_s=0,
        )
    device = report.devices["ghost"]
    assert device.state == DeviceState.UNAUTHORIZED
    assert device.failed_connects == 1


# --- Config ---------------------------------------------------------------------------------


@pytest.mark.integration
async def test_pushed_interval_changes_the_rate_and_is_acked(settings: Settings) -> None:
    """A config with a shorter interval_s is applied and acked, and the device sends faster."""
    (creds,) = register(settings, 1)
    stats = FleetStats()
    async with running_hub(settings) as service:
        fleet = asyncio.create_task(
            run_fleet(service.url, [creds], rate=0.5, batch=1, duration=2.0, stats=stats)
        )
        while stats.acked == 0:
            await asyncio.sleep(0.02)
        registry = Registry(settings.registry_path)
        try:
            version = registry.set_config([creds.device_id], updates={"interval_s": 0.02})[
                creds.device_id
            ]
            report = await asyncio.wait_for(fleet, RUN_BOUND_S)
            state = registry.config_state(creds.device_id)
        finally:
            registry.close()
    device = report.devices[creds.device_id]
    assert device.configs_applied == [version]
    assert state.acked_version == version and state.ack_ok
    # At 0.5 messages/s a 2 s run sends at most 2 readings; at 50/s, dozens.
    assert device.sent > 10


@pytest.mark.integration
async def test_an_invalid_config_is_refused_in_the_ack(settings: Settings) -> None:
    """A config the device cannot apply is answered ok=false with the reason."""
    (creds,) = register(settings, 1)
    registry = Registry(settings.registry_path)
    try:
        version = registry.set_config([creds.device_id], updates={"interval_s": -1})[
            creds.device_id
        ]
        async with running_hub(settings) as service:
            report = await bounded_fleet(service.url, [creds], rate=2, batch=1, duration=0.5)
        state = registry.config_state(creds.device_id)
    finally:
        registry.close()
    assert report.devices[creds.device_id].configs_applied == []
    assert state.acked_version == version
    assert state.ack_ok is False and "interval_s" in (state.ack_error or "")
