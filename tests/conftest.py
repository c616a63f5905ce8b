"""Shared pytest fixtures, one section per concern; add new sections at the end."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from device_sim.local_servers import (
    LocalServer,
    create_database,
    drop_database,
    ensure_installed,
    start_influxdb,
    start_victoria_metrics,
)

# --- Real database servers ------------------------------------------------------------------
# One of each per test session, on free loopback ports, files under pytest's tmp dir (kept
# for the last few runs, so a failed run's server.log can still be read).


@pytest.fixture(scope="session")
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A real InfluxDB 1.6.7 for the whole session."""
    ensure_installed()
    server = start_influxdb(tmp_path_factory.mktemp("influxdb"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def victoria_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A real VictoriaMetrics for the whole session; write with `?db=<unique>` to isolate."""
    ensure_installed()
    server = start_victoria_metrics(tmp_path_factory.mktemp("victoria-metrics"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def influx_db_name(influxdb: LocalServer) -> Iterator[str]:
    """A new, empty database on the `influxdb` server, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    create_database(influxdb.url, name)
    yield name
    if influxdb.running:
        drop_database(influxdb.url, name)
