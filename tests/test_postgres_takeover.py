"""One live connection per device across hubs, on PostgreSQL: real `hub serve` processes,
real devices, and the registry's ports for the orders a device cannot produce on purpose
(a stale session's late answer). Waits are bounded, never timed; latencies are printed."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer
from device_sim.servers.postgres import PostgresDatabase
from hub.gateway.ownership import SAFETY_NET_S
from hub.registry.postgres.backend import PostgresRegistry
from hub.registry.postgres.doorbell import LISTENER_NAME
from hub.registry.postgres.operator import PostgresOperator
from hub.registry.records import HeldSession, Presence, StaleReason, hash_token
from schemas.codes import CloseCode
from tests.support import HubProcess
from tests.test_postgres_hub import WAIT_S, eventually, hub_command

pytestmark = pytest.mark.e2e

TAKEOVERS = 50
CLOSE_BOUND_S = 1.0
"""The p99 bound of the test: the issue's target is 100 ms; a loaded 2-core box meets 1 s,
while a hub that only closed the old session at the safety net (5 s) or never fails it."""


def percentile(values: list[float], fraction: float) -> float:
    """The value below which `fraction` of `values` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def record_time(times: list[float]) -> None:
    """Append the time now (a callback's clock reading)."""
    times.append(time.perf_counter())


@pytest.fixture
async def two_hubs(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str, postgres_db: PostgresDatabase
) -> AsyncIterator[dict[str, HubProcess]]:
    """`hub serve` twice on one fresh PostgreSQL registry, as hub-a and hub-b; both must
    exit 0 on SIGTERM at the end."""
    env = {"HUB_REGISTRY_URL": postgres_db.dsn}
    hubs = {
        name: HubProcess(
            tmp_path / name, influxdb, influx_db_name, env={**env, "HUB_NODE_ID": name}
        )
        for name in ("hub-a", "hub-b")
    }
    try:
        for process in hubs.values():
            await process.start()
        yield hubs
    finally:
        codes = [await process.stop() for process in hubs.values()]
    assert codes == [0, 0], "\n".join(process.log for process in hubs.values())


async def test_a_device_moving_to_another_hub_is_closed_on_the_first_at_once(
    two_hubs: dict[str, HubProcess], postgres_db: PostgresDatabase
) -> None:
    """A device connected to one hub connects to the other, 50 times back and forth: each
    time the old hub closes the old connection with 4000, within 1 s p99 of the new
    handshake (printed: the issue's target is 100 ms), the new connection streams, and
    `hub devices --json` names the hub it moved to."""
    env = {"HUB_REGISTRY_URL": postgres_db.dsn}
    added = await hub_command("token", "add", "mover", env=env)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    names = list(two_hubs)
    current = DeviceClient(two_hubs[names[0]].url, token)
    await asyncio.wait_for(current.connect(), WAIT_S)
    after_handshake: list[float] = []
    after_connect_began: list[float] = []
    try:
        for n in range(1, TAKEOVERS + 1):
            closed_at: list[float] = []
            current.on_closed(functools.partial(record_time, closed_at))
            moved = DeviceClient(two_hubs[names[n % 2]].url, token)
            began = time.perf_counter()
            await asyncio.wait_for(moved.connect(), WAIT_S)
            handshake_done = time.perf_counter()
            try:
                code, reason = await asyncio.wait_for(current.wait_closed(), WAIT_S)
            except TimeoutError:
                logs = "\n".join(process.log for process in two_hubs.values())
                raise AssertionError(f"move {n}: the old connection stayed open\n{logs}") from None
            await asyncio.wait_for(current.close(), WAIT_S)  # its reader done: closed_at set
            assert (code, reason) == (CloseCode.REPLACED, "replaced by a newer connection")
            # Negative when the old hub closed before the new handshake's answer arrived.
            after_handshake.append(closed_at[0] - handshake_done)
            after_connect_began.append(closed_at[0] - began)
            current = moved
        reading = [{"name": "env", "fields": {"t": 1.0}}]
        assert (await asyncio.wait_for(current.store(reading), WAIT_S)).accepted == 1

        async def holder() -> Any:
            listed = await hub_command("devices", "--json", env=env)
            return {row["device"]: row for row in json.loads(listed.stdout)}["mover"]["hub"]

        last = names[TAKEOVERS % 2]
        await eventually(holder, lambda hub: hub == last, f"mover held by {last}")
    finally:
        await asyncio.wait_for(current.close(), WAIT_S)
    ms = [1000 * s for s in after_handshake]
    whole = [1000 * s for s in after_connect_began]
    print(
        f"takeover across hubs, {TAKEOVERS} moves: old connection closed "
        f"p50 {percentile(ms, 0.5):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms, "
        f"max {max(ms):.1f} ms after the new handshake returned; "
        f"p50 {percentile(whole, 0.5):.1f} ms, p99 {percentile(whole, 0.99):.1f} ms "
        f"after the new connect began (mean {statistics.fmean(whole):.1f} ms)"
    )
    assert percentile(ms, 0.99) < CLOSE_BOUND_S * 1000, ms
    for process in two_hubs.values():
        assert "Traceback" not in process.log, process.log


async def test_a_second_connection_to_the_same_hub_replaces_the_first_and_leaving_releases(
    two_hubs: dict[str, HubProcess], postgres_db: PostgresDatabase
) -> None:
    """On one hub of a PostgreSQL registry, a second connection of a device closes the first
    with 4000 (no doorbell: the hub's own table); the newer one streams, its config answer
    counts, and once it leaves `hub devices` shows the device offline with no hub."""
    env = {"HUB_REGISTRY_URL": postgres_db.dsn}
    added = await hub_command("token", "add", "twice", env=env)
    assert added.returncode == 0, added.stderr
    pushed = await hub_command("config", "set", "twice", "x=1", env=env)
    assert pushed.returncode == 0, pushed.stderr
    hub = two_hubs["hub-a"]
    first = DeviceClient(hub.url, added.stdout.strip())
    second = DeviceClient(hub.url, added.stdout.strip())
    await asyncio.wait_for(first.connect(), WAIT_S)
    try:
        await asyncio.wait_for(second.connect(), WAIT_S)
        code, _ = await asyncio.wait_for(first.wait_closed(), WAIT_S)
        assert code == CloseCode.REPLACED
        reading = [{"name": "env", "fields": {"t": 1.0}}]
        assert (await asyncio.wait_for(second.store(reading), WAIT_S)).accepted == 1

        async def row() -> Any:
            listed = await hub_command("devices", "--json", env=env)
            return {r["device"]: r for r in json.loads(listed.stdout)}["twice"]

        held = await eventually(
            row, lambda r: r["config_acknowledged"] == 1 and r["hub"] == "hub-a", "acked"
        )
        assert held["online"]
    finally:
        await asyncio.wait_for(second.close(), WAIT_S)
        await asyncio.wait_for(first.close(), WAIT_S)
    await eventually(row, lambda r: not r["online"] and r["hub"] is None, "twice offline")


async def test_a_takeover_whose_doorbell_was_lost_is_closed_by_the_safety_net(
    two_hubs: dict[str, HubProcess], postgres_db: PostgresDatabase, pg: asyncpg.Connection
) -> None:
    """Both hubs' listeners cut, then the device moves: nobody listens when the claim rings,
    and the old hub's safety net (run as its listener is back, at the latest within its
    period) closes the old connection with 4000 (printed). A listener back in time makes
    the try inconclusive: moved back, tried again."""
    env = {"HUB_REGISTRY_URL": postgres_db.dsn}
    added = await hub_command("token", "add", "mover", env=env)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    names = list(two_hubs)
    current = DeviceClient(two_hubs[names[0]].url, token)
    await asyncio.wait_for(current.connect(), WAIT_S)
    listeners = (
        "SELECT {} FROM pg_stat_activity"
        " WHERE application_name = $1 AND datname = current_database()"
    )
    try:
        for attempt in range(1, 6):
            # Waits for the backends to end (PostgreSQL 14+), so none of them hears the claim.
            await pg.fetchval(
                listeners.format("count(pg_terminate_backend(pid, 5000))"), LISTENER_NAME
            )
            moved = DeviceClient(two_hubs[names[attempt % 2]].url, token)
            began = time.perf_counter()
            await asyncio.wait_for(moved.connect(), WAIT_S)
            lost = await pg.fetchval(listeners.format("count(*)"), LISTENER_NAME) == 0
            code, _ = await asyncio.wait_for(current.wait_closed(), SAFETY_NET_S + WAIT_S)
            closed_s = time.perf_counter() - began
            await asyncio.wait_for(current.close(), WAIT_S)
            current = moved
            assert code == CloseCode.REPLACED
            if lost:
                print(f"lost takeover doorbell: old connection closed {closed_s:.2f} s later")
                break
        else:
            pytest.fail("five tries, and a listener was back before the claim every time")
    finally:
        await asyncio.wait_for(current.close(), WAIT_S)


async def test_a_stale_sessions_late_writes_lose_and_its_hub_hears_the_takeover(
    postgres_db: PostgresDatabase,
) -> None:
    """Hub A's session of a device is taken over by hub B's claim: A hears the takeover
    with B's epoch at once; A's late config answer is not recorded, its presence flush and
    release change nothing, and the safety net says `taken_over` to A; B's answer counts."""
    operator = await PostgresOperator.open(postgres_db.dsn)
    (token,) = await operator.add_many(["d"])
    version = (await operator.set_config(["d"], updates={"x": 1}))["d"]
    hub_a = await PostgresRegistry.open(postgres_db.dsn, "hub-a", "127.0.0.1:1")
    hub_b = await PostgresRegistry.open(postgres_db.dsn, "hub-b", "127.0.0.1:2")
    heard: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    hub_a.watch_takeovers(
        lambda device_id, epoch: heard.put_nowait((device_id, epoch)), lambda: None
    )
    try:
        await asyncio.wait_for(hub_a.listening(), WAIT_S)
        first = await hub_a.claim("d", "192.0.2.1:1000")
        second = await hub_b.claim("d", "192.0.2.2:2000")
        assert first is not None and second is not None
        assert (first.previous_owner, second.previous_owner) == (None, "hub-a")
        assert second.epoch > first.epoch
        assert await asyncio.wait_for(heard.get(), WAIT_S) == ("d", second.epoch)

        assert not await hub_a.record_claimed_config_ack("d", first.epoch, version, True, None)
        assert (await hub_a.config_state("d")).acked_version is None
        now = time.time()
        await hub_a.record_presence([Presence("d", True, "x", now, now, 0, first.epoch)])
        await hub_a.record_presence([Presence("d", False, "x", now, now, 0, first.epoch)])
        assert (await hub_a.presence())["d"].online  # still B's: A's writes matched nothing
        stale = await hub_a.stale_sessions([HeldSession("d", first.epoch, 0, hash_token(token))])
        assert [(s.device_id, s.reason) for s in stale] == [("d", StaleReason.TAKEN_OVER)]

        assert await hub_b.record_claimed_config_ack("d", second.epoch, version, True, None)
        assert (await hub_b.config_state("d")).acked_version == version
        held = HeldSession("d", second.epoch, version, hash_token(token))
        assert await hub_b.stale_sessions([held]) == []
        behind = await hub_b.stale_sessions([HeldSession("d", second.epoch, 0, held.token_hash)])
        assert [(s.reason, s.config_version) for s in behind] == [(StaleReason.CONFIG, version)]
        await operator.revoke("d")
        revoked = await hub_b.stale_sessions([held])
        assert [s.reason for s in revoked] == [StaleReason.REVOKED]
        assert await hub_b.claim("d", "192.0.2.3:3000") is None  # revoked: nothing to claim
        await hub_b.record_presence([Presence("d", False, "x", now, now, 0, second.epoch)])
        assert not (await hub_b.presence())["d"].online  # B's release by its epoch counted
    finally:
        await hub_a.close()
        await hub_b.close()
        await operator.close()


async def takeovers(process: HubProcess) -> dict[str, float]:
    """`hub_takeovers_total` by direction, from a real scrape of the hub's /metrics."""
    found = re.search(r"health and metrics at (http://\S+)/healthz", process.log)
    assert found, f"no health address in the log:\n{process.log}"
    timeout = aiohttp.ClientTimeout(total=WAIT_S)
    async with (
        aiohttp.ClientSession(timeout=timeout) as client,
        client.get(found.group(1) + "/metrics") as answer,
    ):
        text = await answer.text()
    counted = re.findall(r'^hub_takeovers_total\{direction="(\w+)"\} (\S+)$', text, re.M)
    return {direction: float(value) for direction, value in counted}


async def test_takeovers_are_counted_in_metrics_by_direction(
    two_hubs: dict[str, HubProcess], postgres_db: PostgresDatabase
) -> None:
    """A device moving from hub-a to hub-b: hub-a counts one lost, hub-b one won (both at 0
    from the start); the device reconnecting to the hub that holds it is no takeover."""
    env = {"HUB_REGISTRY_URL": postgres_db.dsn}
    added = await hub_command("token", "add", "counted", env=env)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    first, second = two_hubs["hub-a"], two_hubs["hub-b"]
    for process in (first, second):
        assert await takeovers(process) == {"won": 0.0, "lost": 0.0}
    old = DeviceClient(first.url, token)
    await asyncio.wait_for(old.connect(), WAIT_S)
    moved = DeviceClient(second.url, token)
    await asyncio.wait_for(moved.connect(), WAIT_S)
    code, _ = await asyncio.wait_for(old.wait_closed(), WAIT_S)
    await asyncio.wait_for(old.close(), WAIT_S)
    assert code == CloseCode.REPLACED
    want = {"hub-a": {"won": 0.0, "lost": 1.0}, "hub-b": {"won": 1.0, "lost": 0.0}}
    for name, process in two_hubs.items():
        await eventually(functools.partial(takeovers, process), want[name].__eq__, name)
    again = DeviceClient(second.url, token)  # replaces `moved` on the same hub
    await asyncio.wait_for(again.connect(), WAIT_S)
    await asyncio.wait_for(moved.wait_closed(), WAIT_S)
    await asyncio.wait_for(moved.close(), WAIT_S)
    await asyncio.wait_for(again.close(), WAIT_S)
    for name, process in two_hubs.items():
        assert await takeovers(process) == want[name], name
