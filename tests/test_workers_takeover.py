"""One live connection per device across the workers of one host, on SQLite: a real `hub
serve --workers 2` (supervisor and two workers on one port, SO_REUSEPORT), real devices over
real sockets, a real InfluxDB. Which worker holds a device is read from the registry file
itself (read-only, what `hub devices` reads) and checked once through `hub devices --json`.
The last test runs the same workers on a real PostgreSQL registry.
Waits are bounded, never timed; latencies are printed."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sqlite3
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from device_sim.client import DeviceClient
from device_sim.hub_process import provision
from device_sim.local_servers import LocalServer
from device_sim.servers.postgres import PostgresDatabase
from hub.gateway.ownership import SAFETY_NET_S
from hub.registry import sqlite_claims
from hub.registry.host_doorbell import DOORBELL_DIR, socket_name
from schemas.codes import CloseCode
from tests.test_postgres_hub import hub_command
from tests.test_postgres_takeover import CLOSE_BOUND_S, percentile, record_time
from tests.workers_support import WorkersHub

pytestmark = pytest.mark.e2e

NODE = "edge-1"
WORKERS = (f"{NODE}/1", f"{NODE}/2")
MOVES = 30
"""Moves from one worker to the other to measure (the kernel picks the worker: about every
other new connection lands on the other one)."""
MAX_TRIES = 200
WAIT_S = 10.0
OFFLINE_BOUND_S = 5.0
"""How soon a killed worker's devices must show offline: the supervisor releases them as it
reaps the process (milliseconds); without that they stayed online until the slot's next
process opened the registry, after the restart delay and a start-up."""
POLL_S = 0.02
READING = [{"name": "env", "fields": {"t": 1.0}}]


@pytest.fixture
async def hub(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> AsyncIterator[WorkersHub]:
    """`hub serve --workers 2` as node edge-1, both workers listening; must exit 0 on
    SIGTERM at the end."""
    process = WorkersHub(tmp_path / "state", influxdb, influx_db_name, 2, "--node-id", NODE)
    await process.start()
    try:
        yield process
    finally:
        code = await process.stop()
    assert code == 0, process.log[-4000:]


def holders(hub: WorkersHub) -> dict[str, str]:
    """The worker holding each device, read-only from the registry's connections file."""
    path = hub.state_dir / sqlite_claims.CONNECTIONS_FILE
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return sqlite_claims.holders(db)
    finally:
        db.close()


async def held_by(hub: WorkersHub, device_id: str, want: str | None) -> None:
    """Wait (bounded) until `device_id` is held by `want` (None: by nobody)."""
    deadline = time.monotonic() + WAIT_S
    while holders(hub).get(device_id) != want:
        assert time.monotonic() < deadline, f"{device_id} not held by {want}: {holders(hub)}"
        await asyncio.sleep(POLL_S)


async def devices_json(hub: WorkersHub) -> dict[str, dict[str, Any]]:
    """`hub devices --json` on the hub's state directory, by device."""
    listed = await hub_command("devices", "--json", "--state-dir", str(hub.state_dir))
    assert listed.returncode == 0, listed.stderr
    return {row["device"]: row for row in json.loads(listed.stdout)}


async def test_a_device_moving_to_the_other_worker_is_closed_on_the_first_at_once(
    hub: WorkersHub,
) -> None:
    """A device connects again and again, its old connection still open: whenever the new
    one lands on the other worker, that worker's claim rings the old one's doorbell and
    the old connection is closed with 4000, within 1 s p99 of the new handshake (printed
    over 30 moves; the issue's target is 100 ms). Each connection stores a reading: `hub
    devices --json` then names the worker holding it and counts every reading stored on
    either worker."""
    (device,) = provision(hub.state_dir, 1, "mover-")
    current = DeviceClient(hub.url, device.token)
    await asyncio.wait_for(current.connect(), WAIT_S)
    assert (await asyncio.wait_for(current.store(READING), WAIT_S)).accepted == 1
    stored, tries = 1, 0
    holder = holders(hub)[device.device_id]
    after_handshake: list[float] = []
    after_connect_began: list[float] = []
    try:
        while len(after_handshake) < MOVES:
            tries += 1
            assert tries <= MAX_TRIES, f"{tries} connections, {len(after_handshake)} moved"
            closed_at: list[float] = []
            current.on_closed(functools.partial(record_time, closed_at))
            moved = DeviceClient(hub.url, device.token)
            began = time.perf_counter()
            await asyncio.wait_for(moved.connect(), WAIT_S)
            handshake_done = time.perf_counter()
            landed = holders(hub)[device.device_id]  # claimed before the handshake's answer
            try:
                code, reason = await asyncio.wait_for(current.wait_closed(), WAIT_S)
            except TimeoutError:
                raise AssertionError(
                    f"try {tries}: the old connection on {holder} stayed open, the new one "
                    f"on {landed}\n{hub.log[-4000:]}"
                ) from None
            await asyncio.wait_for(current.close(), WAIT_S)  # its reader done: closed_at set
            assert (code, reason) == (CloseCode.REPLACED, "replaced by a newer connection")
            if landed != holder:  # across workers: the doorbell's work
                after_handshake.append(closed_at[0] - handshake_done)
                after_connect_began.append(closed_at[0] - began)
            current, holder = moved, landed
            assert (await asyncio.wait_for(current.store(READING), WAIT_S)).accepted == 1
            stored += 1
        await held_by(hub, device.device_id, holder)
        deadline = time.monotonic() + WAIT_S
        while True:  # presence is flushed every 0.5 s
            row = (await devices_json(hub))[device.device_id]
            if row["readings_stored"] == stored:
                break
            assert row["readings_stored"] < stored, row  # never more than was stored
            assert time.monotonic() < deadline, f"{row['readings_stored']} of {stored} counted"
            await asyncio.sleep(0.2)
        assert (row["online"], row["hub"]) == (True, holder)
    finally:
        await asyncio.wait_for(current.close(), WAIT_S)
    ms = [1000 * s for s in after_handshake]
    whole = [1000 * s for s in after_connect_began]
    print(
        f"takeover across workers (SQLite), {MOVES} moves in {tries} connections: old "
        f"connection closed p50 {percentile(ms, 0.5):.1f} ms, p99 {percentile(ms, 0.99):.1f} "
        f"ms, max {max(ms):.1f} ms after the new handshake returned; p50 "
        f"{percentile(whole, 0.5):.1f} ms, p99 {percentile(whole, 0.99):.1f} ms after the new "
        f"connect began (mean {statistics.fmean(whole):.1f} ms); {stored} readings counted"
    )
    assert percentile(ms, 0.99) < CLOSE_BOUND_S * 1000, ms
    assert "Traceback" not in hub.log, hub.log[-4000:]


async def test_a_lost_doorbell_is_made_up_for_by_the_safety_net(hub: WorkersHub) -> None:
    """Both workers' doorbell sockets removed, as if every ring were lost: the device's
    move to the other worker still closes the old connection with 4000, once the old
    worker's safety net asks the registry (within its period; printed)."""
    (device,) = provision(hub.state_dir, 1, "unrung-")
    for node_id in WORKERS:
        (hub.state_dir / DOORBELL_DIR / socket_name(node_id)).unlink()
    current = DeviceClient(hub.url, device.token)
    await asyncio.wait_for(current.connect(), WAIT_S)
    holder = holders(hub)[device.device_id]
    try:
        for _ in range(MAX_TRIES):
            moved = DeviceClient(hub.url, device.token)
            began = time.perf_counter()
            await asyncio.wait_for(moved.connect(), WAIT_S)
            landed = holders(hub)[device.device_id]
            code, _ = await asyncio.wait_for(current.wait_closed(), SAFETY_NET_S + WAIT_S)
            closed_s = time.perf_counter() - began
            await asyncio.wait_for(current.close(), WAIT_S)
            assert code == CloseCode.REPLACED
            current = moved
            if landed != holder:
                print(f"lost doorbell between workers: old connection closed {closed_s:.2f} s on")
                break
            holder = landed  # the same worker replaced it itself: try again
        else:
            pytest.fail(f"{MAX_TRIES} connections, none landed on the other worker")
    finally:
        await asyncio.wait_for(current.close(), WAIT_S)
    assert "Traceback" not in hub.log, hub.log[-4000:]


async def test_a_killed_workers_devices_show_offline_at_once_and_its_siblings_stay(
    hub: WorkersHub,
) -> None:
    """Devices spread over both workers; one worker SIGKILLed: the supervisor, reaping it,
    releases its devices, offline within 5 s (measured, printed), while the other worker's
    stay online; `hub devices --json` agrees; the slot's new process listens again."""
    creds = provision(hub.state_dir, 40, "spread-")
    clients = []
    try:
        by_worker: dict[str, set[str]] = {}
        for device in creds:  # until both hold a few (the kernel picks: 16 about do)
            client = DeviceClient(hub.url, device.token)
            await asyncio.wait_for(client.connect(), WAIT_S)
            clients.append(client)
            held = holders(hub)
            by_worker = {w: {d for d, h in held.items() if h == w} for w in WORKERS}
            if len(clients) >= 16 and all(len(devices) >= 3 for devices in by_worker.values()):
                break
        else:
            pytest.fail(f"40 devices, and one worker holds almost none: {by_worker}")
        assert len(holders(hub)) == len(clients)
        victim, survivor = WORKERS
        number = int(victim.rsplit("/", 1)[1])
        pid = hub.worker_pids()[number]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        deadline = killed + OFFLINE_BOUND_S
        while by_worker[victim] & set(holders(hub)):
            assert time.monotonic() < deadline, f"still held after the kill: {holders(hub)}"
            await asyncio.sleep(POLL_S)
        offline_s = time.monotonic() - killed
        assert {d for d, h in holders(hub).items() if h == survivor} == by_worker[survivor]
        rows = await devices_json(hub)
        assert all(not rows[d]["online"] and rows[d]["hub"] is None for d in by_worker[victim])
        assert all(rows[d]["hub"] == survivor for d in by_worker[survivor])
        print(
            f"killed worker: its {len(by_worker[victim])} devices offline "
            f"{offline_s * 1000:.0f} ms after the SIGKILL; the other worker's "
            f"{len(by_worker[survivor])} still online"
        )
        await hub.until("the killed worker to listen again", hub.all_listening)
        assert f"worker {number} ({victim}) gone: its devices released" in hub.log
    finally:
        for client in clients:
            await asyncio.wait_for(client.close(), WAIT_S)


async def test_on_postgresql_each_worker_is_a_node_and_a_move_closes_the_old_connection(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str, postgres_db: PostgresDatabase
) -> None:
    """`--workers 2` on a PostgreSQL registry: `hub nodes` lists both workers as live nodes
    (`edge-1/1`, `edge-1/2`: each registers its own id, not the hub's), and a device moving
    to the other worker has its old connection closed with 4000 through PostgreSQL's
    doorbell; `hub devices` names the worker holding it."""
    dsn = ["--registry-url", postgres_db.dsn]
    hub = WorkersHub(tmp_path / "state", influxdb, influx_db_name, 2, "--node-id", NODE, *dsn)
    await hub.start()
    try:
        nodes = await hub_command("nodes", "--json", *dsn)
        assert nodes.returncode == 0, nodes.stderr
        assert {(n["node"], n["live"]) for n in json.loads(nodes.stdout)} == {
            (w, True) for w in WORKERS
        }
        added = await hub_command("token", "add", "mover", *dsn)
        assert added.returncode == 0, added.stderr
        token = added.stdout.strip()

        async def holder() -> str | None:
            listed = await hub_command("devices", "--json", *dsn)
            row: dict[str, Any] = {r["device"]: r for r in json.loads(listed.stdout)}["mover"]
            return row["hub"] if row["online"] else None

        current = DeviceClient(hub.url, token)
        await asyncio.wait_for(current.connect(), WAIT_S)
        try:
            held = await until_held(holder)
            for _ in range(MAX_TRIES):
                moved = DeviceClient(hub.url, token)
                await asyncio.wait_for(moved.connect(), WAIT_S)
                code, _ = await asyncio.wait_for(current.wait_closed(), WAIT_S)
                await asyncio.wait_for(current.close(), WAIT_S)
                assert code == CloseCode.REPLACED
                current = moved
                now_held = await until_held(holder)
                if now_held != held:
                    break
                held = now_held
            else:
                pytest.fail(f"{MAX_TRIES} connections, none landed on the other worker")
        finally:
            await asyncio.wait_for(current.close(), WAIT_S)
    finally:
        code = await hub.stop()
    assert code == 0, hub.log[-4000:]


async def until_held(holder: Callable[[], Awaitable[str | None]]) -> str:
    """The worker `holder()` names once it names one (bounded)."""
    deadline = time.monotonic() + WAIT_S
    while (found := await holder()) is None:
        assert time.monotonic() < deadline, "the device is held by no worker"
        await asyncio.sleep(0.2)
    return found
