"""A hub whose PostgreSQL registry stops answering (frozen, killed), as real processes.

Connected devices keep streaming and being acked: ingest never waits on the registry. New
handshakes get 503 with Retry-After within `registry_timeout_s` (or, opted in with
`registry_outage_admit_s`, a token this hub verified lately is let in from memory). The
outage is logged once each way, shown by /healthz (a warning, still 200), counted in
/metrics, and once PostgreSQL is back new devices get in and pushes reach devices again.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer
from device_sim.servers.postgres import PostgresServer
from tests.attack_support import AttackedHub
from tests.test_postgres_hub import hub_command

pytestmark = pytest.mark.e2e

WAIT_S = 20.0
REGISTRY_TIMEOUT_S = 1.0
READING = [{"name": "env", "fields": {"t": 1.0}}]


async def status_of(url: str, token: str) -> tuple[int, str | None]:
    """101 if `token` gets in, else the refusal's status and Retry-After."""
    try:
        async with asyncio.timeout(WAIT_S):
            connection = await connect(
                url + "/v1/ws", additional_headers={"Authorization": f"Bearer {token}"}
            )
    except InvalidStatus as refused:
        return refused.response.status_code, refused.response.headers.get("Retry-After")
    await connection.close()
    return 101, None


async def healthz(hub: AttackedHub) -> tuple[int, dict[str, object]]:
    """The hub's /healthz status and body."""
    found = re.search(r"health and metrics at (http://\S+)/healthz", hub.log)
    assert found, hub.log
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as client,
        client.get(found.group(1) + "/healthz") as answer,
    ):
        return answer.status, json.loads(await answer.text())


async def until(condition: object, what: str) -> None:
    """Poll an async predicate (bounded)."""
    assert callable(condition)
    deadline = time.monotonic() + WAIT_S
    while not await condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {WAIT_S} s"
        await asyncio.sleep(0.05)


async def tokens(dsn: str, *device_ids: str) -> list[str]:
    """Register devices on the registry; their tokens."""
    found = []
    for device_id in device_ids:
        added = await hub_command("token", "add", device_id, "--registry-url", dsn)
        assert added.returncode == 0, added.stderr
        found.append(added.stdout.strip())
    return found


@pytest.fixture
async def outage_hub(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str, own_postgres: PostgresServer
) -> AsyncIterator[tuple[AttackedHub, str]]:
    """`hub serve` on a PostgreSQL of the test's own, with a short registry timeout and
    the opt-in memory of verified tokens; stopped by pid at the end."""
    role, name = own_postgres.new_database()
    dsn = own_postgres.dsn(name, role)
    env = {
        "HUB_REGISTRY_URL": dsn,
        "HUB_REGISTRY_TIMEOUT_S": str(REGISTRY_TIMEOUT_S),
        "HUB_REGISTRY_OUTAGE_ADMIT_S": "300",
    }
    await tokens(dsn, "placeholder")  # migrates the schema before the hub starts
    hub = AttackedHub(tmp_path / "state", influxdb, influx_db_name, env)
    await hub.start()
    try:
        yield hub, dsn
    finally:
        if hub.process is not None and hub.process.poll() is None:
            await hub.kill()


@pytest.mark.parametrize("outage", ["frozen", "killed"])
async def test_during_an_outage_devices_stream_and_strangers_wait(
    outage_hub: tuple[AttackedHub, str], own_postgres: PostgresServer, outage: str
) -> None:
    """Frozen (SIGSTOP) or killed: the connected device is acked throughout; a device the
    hub never verified gets 503 with Retry-After, one it verified before the outage gets
    in from memory; /healthz stays 200 and says so; one log line each way; once
    PostgreSQL is back, the stranger gets in and a push reaches the connected device."""
    hub, dsn = outage_hub
    streaming, returning, stranger = await tokens(dsn, "streaming", "returning", "stranger")
    assert await status_of(hub.url, returning) == (101, None)  # verified: remembered
    device = DeviceClient(hub.url, streaming)
    await asyncio.wait_for(device.connect(), WAIT_S)
    try:
        assert (await asyncio.wait_for(device.store(READING), WAIT_S)).accepted == 1
        own_postgres.pause() if outage == "frozen" else own_postgres.kill()
        try:
            started = time.monotonic()
            status, retry_after = await status_of(hub.url, stranger)
            refused_in = time.monotonic() - started
            assert status == 503 and int(retry_after or 0) > 0, (status, hub.log[-2000:])
            print(f"\n{outage}: a stranger's handshake refused in {refused_in:.2f} s")
            for _ in range(5):
                assert (await asyncio.wait_for(device.store(READING), WAIT_S)).accepted == 1
            assert await status_of(hub.url, returning) == (101, None)
            code, body = await healthz(hub)
            assert code == 200 and str(body["registry"]).startswith("unavailable"), body
            metrics = await hub.metrics()
            assert metrics["hub_registry_up"] == 0.0
            assert metrics["hub_admitted_from_memory_total"] >= 1.0
            assert metrics["hub_registry_failures_total"] >= 1.0
        finally:
            own_postgres.resume() if outage == "frozen" else own_postgres.start()
        back = time.monotonic()
        await until(lambda: _gets_in(hub.url, stranger), "the stranger let in")
        print(f"{outage}: new devices let in {time.monotonic() - back:.2f} s after the return")
        pushed = await hub_command(
            "config", "set", "streaming", "x=1", "--wait", "10", "--registry-url", dsn
        )
        assert pushed.returncode == 0, pushed.stderr + hub.log[-3000:]
        assert [(c.version, c.config) for c in device.configs] == [(1, {"x": 1})]
        assert (await asyncio.wait_for(device.store(READING), WAIT_S)).accepted == 1
    finally:
        await asyncio.wait_for(device.close(), WAIT_S)
    assert hub.log.count("registry unavailable (") == 1, hub.log[-4000:]
    assert hub.log.count("registry reachable again after") == 1, hub.log[-4000:]
    assert "Traceback" not in hub.log, hub.log[-4000:]
    await hub.stop_within(10.0)


async def _gets_in(url: str, token: str) -> bool:
    return (await status_of(url, token))[0] == 101
