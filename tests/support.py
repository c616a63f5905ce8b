"""Helpers for tests that run a real hub in-process against a real InfluxDB, and for the
fault tests' check that every acked reading reached it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from device_sim.fleet import FleetReport
from device_sim.hub_process import HubProcess
from device_sim.local_servers import LocalServer, influxql, quote_ident, quote_string
from hub.ingest.sinks import Sink
from hub.registry.sqlite import Registry
from hub.service import HubService
from hub.settings import Settings

__all__ = [
    "FAST_WRITES",
    "HubProcess",
    "add_device",
    "assert_every_ack_stored",
    "hub_settings",
    "points",
    "running_hub",
    "stored_times",
]

FAST_WRITES = {
    "HUB_FLUSH_INTERVAL_S": "0.02",
    "HUB_WRITE_DEADLINE_S": "1",
    "HUB_RETRY_INITIAL_S": "0.1",
    "HUB_RETRY_MAX_S": "1",
    "HUB_SHUTDOWN_TIMEOUT_S": "5",
    "HUB_LOG_LEVEL": "INFO",
}
"""`hub serve` variables for fault tests: batches flushed at once, a frozen InfluxDB given up
on (the batch spooled) after 1 s, retries soon, a bounded drain at the end."""
CONVERGE_S = 60.0
"""How long InfluxDB may take to hold every acked reading (spools replaying included)."""


def hub_settings(state_dir: Path, influx_url: str | None, **overrides: Any) -> Settings:
    """Settings for a test hub on a free port, flushing fast."""
    values: dict[str, Any] = {
        "state_dir": state_dir,
        "host": "127.0.0.1",
        "port": 0,
        "influx_url": influx_url,
        "flush_interval_s": 0.02,
        "retry_initial_s": 0.05,
        "retry_max_s": 0.5,
        "health_port": 0,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running_hub(settings: Settings, sink: Sink | None = None) -> AsyncIterator[HubService]:
    """A started hub service, stopped on exit."""
    service = HubService(settings, sink)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def add_device(settings: Settings, device_id: str) -> str:
    """Register a device in the hub's registry and return its token."""
    registry = Registry(settings.registry_path)
    try:
        return registry.add(device_id)
    finally:
        registry.close()


def points(influx: LocalServer, db: str, measurement: str) -> list[dict[str, Any]]:
    """Every point of a measurement, as InfluxQL rows with nanosecond times."""
    return influxql(influx.url, db, f"SELECT * FROM {quote_ident(measurement)}")


def stored_times(influx: LocalServer, db: str, device_id: str) -> set[int]:
    """Timestamps (ns) of a device's `environment` readings in InfluxDB (the simulator's)."""
    rows = influxql(
        influx.url,
        db,
        f'SELECT "temperature" FROM "environment" WHERE "device" = {quote_string(device_id)}',
    )
    return {int(row["time"]) for row in rows}


async def assert_every_ack_stored(influx: LocalServer, db: str, report: FleetReport) -> None:
    """Wait (bounded) until InfluxDB holds every reading the fleet saw acked, compared
    timestamp by timestamp; fail naming how many of each device's are missing."""
    assert report.acked > 0, "nothing was acked: the test proves nothing"
    deadline = time.monotonic() + CONVERGE_S
    while True:
        missing = {
            device_id: set(device.acked_times_ns()) - stored_times(influx, db, device_id)
            for device_id, device in report.devices.items()
        }
        lost = {d: len(m) for d, m in missing.items() if m}
        if not lost:
            return
        assert time.monotonic() < deadline, f"acked readings missing from InfluxDB: {lost}"
        await asyncio.sleep(0.5)
