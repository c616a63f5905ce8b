"""Helpers for tests that run a real hub in-process against a real InfluxDB."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from device_sim.hub_process import HubProcess
from device_sim.local_servers import LocalServer, influxql, quote_ident
from hub.ingest.sinks import Sink
from hub.registry.sqlite import Registry
from hub.service import HubService
from hub.settings import Settings

__all__ = ["HubProcess", "add_device", "hub_settings", "points", "running_hub"]


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
