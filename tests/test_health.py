"""`/healthz` and `/metrics` of an in-process hub against real InfluxDB servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer, create_database, free_port, start_influxdb
from hub.ops.health import HealthInputs, assess
from hub.registry.sqlite import Registry
from hub.service import HubService
from schemas.messages import Ack
from tests.support import add_device, hub_settings, running_hub

WAIT_S = 30.0
T0_MS = 1_700_000_000_000
SCHEMA = """
[measurements.environment.fields]
temperature = { type = "float", max = 50 }
"""


def readings(count: int, start: int = 0, temperature: float = 21.5) -> list[dict[str, Any]]:
    """`count` readings of `environment` with distinct times."""
    return [
        {"name": "environment", "time": T0_MS + start + i, "fields": {"temperature": temperature}}
        for i in range(count)
    ]


async def get(url: str) -> tuple[int, str]:
    """GET `url`; status and body."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        return response.status, await response.text()


async def healthz(service: HubService) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of the hub's /healthz."""
    status, body = await get(service.health.url + "/healthz")
    return status, json.loads(body)


async def healthz_until(service: HubService, status: int) -> dict[str, Any]:
    """Poll /healthz until it answers `status` (bounded); return that body."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        got, body = await healthz(service)
        if got == status:
            return body
        assert loop.time() < deadline, f"/healthz stayed {got}: {body}"
        await asyncio.sleep(0.05)


async def metrics(service: HubService) -> Samples:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    status, text = await get(service.health.url + "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value, 0 if absent."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def bounded(awaitable: Any) -> Any:
    """Await with the test's bound."""
    return await asyncio.wait_for(awaitable, WAIT_S)


@pytest.fixture
def private_influxdb(tmp_path: Path) -> Iterator[LocalServer]:
    """An InfluxDB of this test's own, which it may kill and restart."""
    server = start_influxdb(tmp_path / "influxdb")
    create_database(server.url, "sensors")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def schema_file(tmp_path: Path) -> Path:
    """A schema file with an upper bound on temperature."""
    path = tmp_path / "schemas.toml"
    path.write_text(SCHEMA)
    return path


@pytest.fixture
async def small_spool_hub(
    tmp_path: Path, private_influxdb: LocalServer
) -> AsyncIterator[tuple[HubService, str]]:
    """A hub writing to the private InfluxDB with a spool of a few batches; and a token."""
    settings = hub_settings(
        tmp_path / "state",
        private_influxdb.url,
        influx_bucket="sensors",
        spool_max_bytes=3000,
        write_deadline_s=1.0,
    )
    token = add_device(settings, "sensor-1")
    async with running_hub(settings) as service:
        yield service, token


# --- /healthz --------------------------------------------------------------------------------


@pytest.mark.integration
async def test_healthz_is_200_while_accepting_and_storing(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A started hub with a working InfluxDB answers 200 with every check fine."""
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    token = add_device(settings, "sensor-1")
    async with running_hub(settings) as service, DeviceClient(service.url, token) as device:
        await bounded(device.store(readings(1)))
        status, body = await healthz(service)
    assert status == 200
    assert body == {
        "status": "ok",
        "healthy": True,
        "accepting": True,
        "storing": True,
        "influxdb": "ok",
        "registry": "ok",
        "reasons": [],
        "warnings": [],
    }


@pytest.mark.integration
async def test_healthz_turns_503_when_influxdb_goes_and_200_when_it_returns(
    small_spool_hub: tuple[HubService, str], private_influxdb: LocalServer
) -> None:
    """InfluxDB killed: 503 once the spool is full too; InfluxDB back: 200, and acks come."""
    service, token = small_spool_hub
    async with DeviceClient(service.url, token) as device:
        await bounded(device.store(readings(1)))
        assert (await healthz(service))[0] == 200
        private_influxdb.kill()
        pending: list[asyncio.Future[Ack]] = []
        for n in range(200):
            pending.append(await device.send_readings(readings(10, start=1000 * (n + 1))))
            status, body = await healthz(service)
            if status == 503:
                break
            await asyncio.sleep(0.05)
        assert status == 503, body
        assert body["reasons"] == ["InfluxDB failing and the spool is full: acks wait"]
        assert body["influxdb"] == "failing"
        private_influxdb.restart()
        assert (await healthz_until(service, 200))["influxdb"] == "ok"
        acks = await bounded(asyncio.gather(*pending))
    assert sum(ack.accepted for ack in acks) == 10 * len(pending)


@pytest.mark.integration
async def test_healthz_stays_200_while_the_spool_takes_what_influxdb_cannot(
    small_spool_hub: tuple[HubService, str], private_influxdb: LocalServer
) -> None:
    """InfluxDB killed with room in the spool: still 200, with a warning, and acks come."""
    service, token = small_spool_hub
    async with DeviceClient(service.url, token) as device:
        private_influxdb.kill()
        ack = await bounded(device.store(readings(1)))
        body = await healthz_until(service, 200)
        assert ack.accepted == 1
        assert body["influxdb"] == "failing"
        assert body["warnings"] == ["InfluxDB failing: batches go to the spool"]


@pytest.mark.integration
async def test_metrics_show_spooled_points_while_influxdb_is_gone(
    small_spool_hub: tuple[HubService, str], private_influxdb: LocalServer
) -> None:
    """With InfluxDB gone, the spool gauges count what waits and InfluxDB reads unhealthy."""
    service, token = small_spool_hub
    async with DeviceClient(service.url, token) as device:
        private_influxdb.kill()
        await bounded(device.store(readings(3)))
        samples = await metrics(service)
    assert value(samples, "hub_influx_healthy") == 0
    assert value(samples, "hub_spool_points") >= 3
    assert value(samples, "hub_spool_bytes") > 0
    assert value(samples, "hub_spool_max_bytes") == 3000
    assert value(samples, "hub_influx_errors_total", status="unreachable") >= 1


def health(**changes: bool | str) -> HealthInputs:
    """Health inputs of a hub that is fine, with `changes`."""
    fine: dict[str, bool | str] = {
        "listening": True,
        "draining": False,
        "accepting": True,
        "influx_configured": True,
        "influx_healthy": True,
        "has_spool": True,
        "spool_full": False,
    }
    return HealthInputs(**{**fine, **changes})  # type: ignore[arg-type]


@pytest.mark.unit
def test_a_draining_hub_is_unhealthy() -> None:
    """Shutting down: 503, because new devices are refused."""
    verdict = assess(health(draining=True, accepting=False))
    assert not verdict.healthy
    assert verdict.reasons == ["shutting down: refusing new devices"]


@pytest.mark.unit
def test_a_hub_at_max_connections_is_unhealthy() -> None:
    """At max_connections: 503, because new devices are refused."""
    verdict = assess(health(accepting=False))
    assert verdict.reasons == ["at max_connections: refusing new devices"]


@pytest.mark.unit
def test_a_hub_not_listening_is_unhealthy() -> None:
    """Before the device port is open: 503."""
    verdict = assess(health(listening=False, accepting=False))
    assert verdict.reasons == ["not listening for devices"]


@pytest.mark.unit
def test_a_hub_without_influxdb_is_healthy_while_the_spool_takes_batches() -> None:
    """Spool-only mode (no influx_url) is healthy until the spool is full."""
    assert assess(health(influx_configured=False, influx_healthy=False)).healthy
    full = assess(health(influx_configured=False, influx_healthy=False, spool_full=True))
    assert full.reasons == ["InfluxDB not configured and the spool is full: acks wait"]


# --- /metrics --------------------------------------------------------------------------------


@pytest.mark.integration
async def test_metrics_count_what_a_device_sent(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str, schema_file: Path
) -> None:
    """Received, stored, rejected, acks and connections match what the device sent."""
    settings = hub_settings(
        tmp_path / "state", influxdb.url, influx_bucket=influx_db_name, schemas=schema_file
    )
    token = add_device(settings, "sensor-1")
    async with running_hub(settings) as service, DeviceClient(service.url, token) as device:
        acks = [await bounded(device.store(readings(10, start=100 * n))) for n in range(3)]
        acks.append(await bounded(device.store(readings(2, start=900, temperature=80.0))))
        samples = await metrics(service)
    assert [ack.accepted for ack in acks] == [10, 10, 10, 0]
    assert value(samples, "hub_readings_received_total") == 32
    assert value(samples, "hub_readings_stored_total") == 30
    assert value(samples, "hub_readings_rejected_total", reason="fields") == 2
    assert value(samples, "hub_acks_total") == 4
    assert value(samples, "hub_connections") == 1
    assert value(samples, "hub_connections_opened_total") == 1
    assert value(samples, "hub_points_written_total") >= 30
    assert value(samples, "hub_batch_points_count") >= 1
    assert value(samples, "hub_influx_write_duration_seconds_count") >= 1
    assert value(samples, "hub_influx_healthy") == 1


@pytest.mark.integration
async def test_metrics_count_refused_handshakes_by_reason(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A wrong token is counted as an unauthorized handshake."""
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    async with running_hub(settings) as service:
        with pytest.raises(Exception, match="401"):
            await DeviceClient(service.url, "hubt_wrong").connect()
        samples = await metrics(service)
    assert value(samples, "hub_handshakes_refused_total", reason="unauthorized") == 1


@pytest.mark.integration
async def test_metrics_count_influxdb_refusals_by_status_and_dead_letters(
    tmp_path: Path, influxdb: LocalServer
) -> None:
    """A write to a database that does not exist is a 404 and its points dead letters."""
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket="no_such_database")
    token = add_device(settings, "sensor-1")
    async with running_hub(settings) as service, DeviceClient(service.url, token) as device:
        assert (await bounded(device.store(readings(5)))).accepted == 5
        samples = await metrics(service)
    assert value(samples, "hub_influx_errors_total", status="404") >= 1
    assert value(samples, "hub_dead_letter_points_total") >= 5


@pytest.mark.integration
async def test_metrics_count_config_pushes_and_answers(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A config pushed at connect and applied by the device is counted both ways."""
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    token = add_device(settings, "sensor-1")
    registry = Registry(settings.registry_path)
    registry.set_config(["sensor-1"], updates={"interval_s": 10})
    registry.close()
    async with running_hub(settings) as service, DeviceClient(service.url, token) as device:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while True:
            samples = await metrics(service)
            if value(samples, "hub_config_acks_total", result="applied"):
                break
            assert loop.time() < deadline, samples
            await asyncio.sleep(0.05)
        assert len(device.configs) == 1
    assert value(samples, "hub_config_pushes_total") == 1


@pytest.mark.integration
async def test_health_listener_can_be_switched_off(tmp_path: Path) -> None:
    """With health_enabled off nothing listens on health_port."""
    port = free_port()
    settings = hub_settings(tmp_path / "state", None, health_enabled=False, health_port=port)
    async with running_hub(settings):
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
