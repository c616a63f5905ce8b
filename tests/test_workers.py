"""`hub serve --workers 2` as real processes: a supervisor and two workers on one port
(SO_REUSEPORT), simulated devices over real sockets, a private real InfluxDB 1.6.7.

Every test that streams compares, device by device, the acked timestamps with InfluxDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from device_sim.client import DeviceClient
from device_sim.fleet import Credentials, run_fleet
from device_sim.hub_process import provision
from device_sim.local_servers import LocalServer, create_database, free_port
from device_sim.stats import FleetStats
from hub.ingest.spool import read_status
from hub.workers.relay import parse_notification
from tests.nspawn import ensure_host_tools
from tests.support import HubProcess, assert_every_ack_stored
from tests.workers_support import WorkersHub

pytestmark = pytest.mark.e2e

DB = "workers"
LOOSE = "accept_unknown_measurements = true\n"  # what the simulated devices send
STRICT = LOOSE + '[measurements.environment.fields]\ntemperature = { type = "float", max = 50 }\n'


@pytest.fixture
def influx(own_influxdb: LocalServer) -> LocalServer:
    """A private InfluxDB that a test may freeze. (with database DB)."""
    create_database(own_influxdb.url, DB)
    return own_influxdb


@pytest.fixture
async def hub(tmp_path: Path, influx: LocalServer) -> AsyncIterator[WorkersHub]:
    """`hub serve --workers 2`, every worker listening; stopped by pid at the end."""
    schemas = tmp_path / "schemas.toml"
    schemas.write_text(LOOSE)
    process = WorkersHub(
        tmp_path / "state", influx, DB, 2, "--schemas", str(schemas), "--node-id", "edge-1"
    )
    await process.start()
    try:
        yield process
    finally:
        if process.process is not None and process.process.poll() is None:
            await process.stop()


def devices(hub: HubProcess, count: int, prefix: str = "w-") -> list[Credentials]:
    """Devices registered in the hub's registry, as an operator does (hub token add)."""
    return provision(hub.state_dir, count, prefix)


def reading(value: float, at_ms: int) -> list[dict[str, object]]:
    """One `environment` reading."""
    return [{"name": "environment", "time": at_ms, "fields": {"temperature": value}}]


def busy_workers(hub: WorkersHub) -> list[str]:
    """The workers holding at least one connection."""
    return sorted(k for k, v in hub.metrics()["hub_connections"].items() if v)


async def connect_all(hub: HubProcess, creds: list[Credentials]) -> list[DeviceClient]:
    """A connection for every device, each acked once (so each is admitted by a worker)."""
    clients = []
    base_ms = time.time_ns() // 10**6
    for number, device in enumerate(creds):
        client = DeviceClient(hub.url, device.token)
        await client.__aenter__()
        clients.append(client)
        assert (await asyncio.wait_for(client.store(reading(20.0, base_ms + number)), 30)).accepted
    return clients


async def close_all(clients: list[DeviceClient]) -> None:
    """Close every connection (those the hub closed already too)."""
    for client in clients:
        await client.__aexit__(None, None, None)


async def test_devices_spread_over_the_workers(hub: WorkersHub) -> None:
    """200 devices connected to one port end up on both workers, none far above the mean
    (the kernel's SO_REUSEPORT hash); printed as max/mean."""
    clients = await connect_all(hub, devices(hub, 200))
    try:
        await hub.until(
            "every connection counted",
            lambda: sum(hub.metrics()["hub_connections"].values()) == 200,
        )
        per_worker = hub.metrics()["hub_connections"]
    finally:
        await close_all(clients)
    spread = max(per_worker.values()) / (200 / 2)
    print(f"connections per worker after 200: {per_worker}; max/mean {spread:.3f}")
    assert sorted(per_worker) == ["1", "2"]
    assert "worker 1/2 (edge-1/1) listening" in hub.log
    assert "worker 2/2 (edge-1/2) listening" in hub.log
    # Binomial(200, 1/2): one standard deviation is 7 connections; 1.5 is 7 of them.
    assert spread <= 1.5


async def test_a_killed_worker_is_restarted_and_nothing_acked_is_lost(
    hub: WorkersHub, influx: LocalServer
) -> None:
    """The worker holding the most devices SIGKILLed mid-stream: the supervisor starts it
    again (counted in /metrics), its devices reconnect (to either worker), and InfluxDB
    holds every acked reading. (The busier one: SO_REUSEPORT may put all 8 on one worker.)"""
    creds = devices(hub, 8)
    stats = FleetStats()
    fleet = asyncio.create_task(
        run_fleet(hub.url, creds, rate=10, batch=20, duration=8, final_wait_s=30, stats=stats)
    )
    await hub.until("acks", lambda: stats.acked > 0)
    await hub.until(
        "every device connected",
        lambda: sum(hub.metrics()["hub_connections"].values()) == len(creds),
    )
    held = hub.metrics()["hub_connections"]
    victim = int(max(held, key=lambda worker: held[worker]))
    old = hub.worker_pids()[victim]
    assert old is not None
    hub_log_before = len(hub.log)
    os.kill(old, signal.SIGKILL)
    await hub.until(
        f"worker {victim} back, in a new process",
        lambda: hub.worker_pids()[victim] not in (None, old) and hub.all_listening(),
    )
    acked_after_restart = stats.acked
    report = await fleet
    assert report.acked > acked_after_restart
    assert report.total("reconnects") >= 1
    restarts = {str(n): float(n == victim) for n in (1, 2)}
    assert hub.metrics()["hub_worker_restarts_total"] == restarts
    assert "killed by signal 9; starting it again" in hub.log[hub_log_before:]
    await assert_every_ack_stored(influx, DB, report)


async def test_a_restarted_worker_replays_its_own_spool(
    hub: WorkersHub, influx: LocalServer
) -> None:
    """With InfluxDB frozen, acked readings wait in each worker's spool; worker 1 is killed
    then, InfluxDB resumes, and the new process in slot 1 writes its spool out: every acked
    reading is stored and the slot's spool is empty."""
    creds = devices(hub, 8)
    stats = FleetStats()
    fleet = asyncio.create_task(
        run_fleet(hub.url, creds, rate=10, batch=20, duration=6, final_wait_s=30, stats=stats)
    )
    await hub.until("acks", lambda: stats.acked > 0)
    spool = hub.state_dir / "workers" / "1" / "spool"
    influx.pause()
    try:
        await hub.until("slot 1 spooling", lambda: read_status(spool).points > 0, 30)
        old = hub.worker_pids()[1]
        assert old is not None
        os.kill(old, signal.SIGKILL)
        spooled = read_status(spool).points
        assert spooled > 0
        await hub.until("worker 1 back", lambda: hub.worker_pids()[1] not in (None, old), 30)
    finally:
        influx.resume()
    report = await fleet
    await assert_every_ack_stored(influx, DB, report)
    await hub.until("slot 1's spool written out", lambda: read_status(spool).batches == 0)
    print(f"slot 1 held {spooled} readings in its spool when it was killed; all replayed")


async def test_sighup_reaches_every_worker(hub: WorkersHub, tmp_path: Path) -> None:
    """A changed schema file and SIGHUP to the supervisor: devices on both workers are
    judged by the new schema on their open connections; both workers log the reload."""
    clients = await connect_all(hub, devices(hub, 16))
    try:
        await hub.until(
            "devices on both workers",
            lambda: (
                sorted(k for k, v in hub.metrics()["hub_connections"].items() if v) == ["1", "2"]
            ),
        )
        (tmp_path / "schemas.toml").write_text(STRICT)
        hub.signal(signal.SIGHUP)
        base_ms = time.time_ns() // 10**6
        for number, client in enumerate(clients):
            for attempt in range(200):
                ack = await asyncio.wait_for(
                    client.store(reading(80.0, base_ms + 1000 * number + attempt)), 30
                )
                if ack.rejected:
                    break
                await asyncio.sleep(0.05)
            assert ack.rejected, f"device {number}: the new schema never applied"
            assert client.connection.close_code is None
    finally:
        await close_all(clients)
    await hub.until("both reload lines", lambda: hub.log.count("reloaded: measurement") == 2)
    assert "reload: SIGHUP sent to 2 workers" in hub.log


async def test_sigterm_drains_every_worker(hub: WorkersHub) -> None:
    """SIGTERM to the supervisor: devices on both workers are closed with 1001, each worker
    and the supervisor log "stopped", the hub exits 0 and the port is closed."""
    clients = await connect_all(hub, devices(hub, 16))
    try:
        await hub.until(
            "devices on both workers",
            lambda: (
                sorted(k for k, v in hub.metrics()["hub_connections"].items() if v) == ["1", "2"]
            ),
        )
        assert await hub.stop() == 0
        codes = [(await asyncio.wait_for(client.wait_closed(), 30))[0] for client in clients]
    finally:
        await close_all(clients)
    assert codes == [1001] * len(clients)
    stopped = sorted(
        line.split()[-2] for line in hub.log.splitlines() if line.endswith(": stopped")
    )
    assert stopped == ["hub.workers:", "hub[1]:", "hub[2]:"]
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", hub.port)


async def test_a_second_hub_on_the_same_state_dir_gets_a_clear_error(
    hub: WorkersHub, influx: LocalServer
) -> None:
    """Another `hub serve --workers 2` on the same state directory cannot take the slots:
    it exits 2 saying which process holds the spool, and the first hub runs on."""
    second = WorkersHub(hub.state_dir, influx, DB, 2)
    second.launch()
    assert second.process is not None
    status = await asyncio.to_thread(second.process.wait, 60)
    assert status == 2, second.log
    holders = {pid for pid in hub.worker_pids().values() if pid is not None}
    assert any(f"is in use by process {pid}" in second.log for pid in holders), second.log
    assert "before it listened: stopping the hub" in second.log
    assert hub.all_listening()


async def test_rolling_restart_replaces_one_worker_at_a_time_and_loses_nothing(
    hub: WorkersHub, influx: LocalServer
) -> None:
    """SIGUSR2: each worker in turn is drained and replaced by a new process, the other
    taking new connections meanwhile; devices streaming through it lose nothing acked and
    none is refused with 503."""
    creds = devices(hub, 8)
    stats = FleetStats()
    fleet = asyncio.create_task(
        run_fleet(hub.url, creds, rate=10, batch=20, duration=10, final_wait_s=30, stats=stats)
    )
    await hub.until("acks", lambda: stats.acked > 0)
    old = hub.worker_pids()
    hub.signal(signal.SIGUSR2)
    await hub.until("rolling restart done", lambda: "rolling restart done" in hub.log)
    new = hub.worker_pids()
    assert all(new[k] not in (None, old[k]) for k in (1, 2)), (old, new)
    assert hub.metrics()["hub_worker_restarts_total"] == {"1": 0.0, "2": 0.0}
    report = await fleet
    await assert_every_ack_stored(influx, DB, report)
    errors: dict[str, int] = {}
    for device in report.devices.values():
        for cause, count in device.connect_errors.items():
            errors[cause] = errors.get(cause, 0) + count
    print(
        f"rolling restart: {report.acked} acked, {report.total('reconnects')} reconnects, "
        f"failed connection attempts by cause: {errors}"
    )
    assert not {cause for cause in errors if "503" in cause or "Refused" in cause}, errors


def hub_command(*args: str) -> subprocess.CompletedProcess[str]:
    """`hub ARGS` as an operator runs it; its output."""
    return subprocess.run(
        [sys.executable, "-m", "hub", *args], capture_output=True, text=True, timeout=120
    )


async def spool_status(state_dir: str) -> dict[str, Any]:
    """`hub spool status --json` of a state directory."""
    done = await asyncio.to_thread(
        hub_command, "spool", "status", "--json", "--state-dir", state_dir
    )
    assert done.returncode == 0, done
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


async def test_spool_replay_writes_a_dead_hubs_spools_from_another_process(
    tmp_path: Path, influx: LocalServer
) -> None:
    """A 2-worker hub with no reachable InfluxDB acks from its spools; `hub spool replay`
    refuses them while it runs (naming the holder), and after it stopped writes both slots'
    spools to InfluxDB with progress and counts: every acked reading is stored."""
    nothing_there = f"http://127.0.0.1:{free_port()}"
    hub = WorkersHub(
        tmp_path / "state", influx, DB, 2, "--influx-url", nothing_there, "--influx-api", "v1"
    )
    await hub.start()
    try:
        report = await run_fleet(
            hub.url, devices(hub, 8), rate=10, batch=20, duration=2, final_wait_s=30
        )
        assert report.acked > 0
        state = str(hub.state_dir)
        refused = await asyncio.to_thread(
            hub_command, "spool", "replay", "--state-dir", state, "--influx-url", influx.url,
            "--influx-bucket", DB,
        )  # fmt: skip
        assert refused.returncode == 2, refused
        assert "is in use by process" in refused.stderr
    finally:
        assert await hub.stop() == 0
    status = json.loads(
        (
            await asyncio.to_thread(hub_command, "spool", "status", "--json", "--state-dir", state)
        ).stdout
    )
    by_name = {s["name"]: s for s in status["spools"]}
    assert set(by_name) == {"worker 1", "worker 2"}
    assert all(s["held_by_pid"] is None for s in by_name.values())
    assert status["readings"] >= report.acked
    replayed = await asyncio.to_thread(
        hub_command, "spool", "replay", "--state-dir", state, "--influx-url", influx.url,
        "--influx-bucket", DB,
    )  # fmt: skip
    assert replayed.returncode == 0, replayed
    print(replayed.stderr)
    for name in ("worker 1", "worker 2"):
        assert f"{name}: done: " in replayed.stderr
    await assert_every_ack_stored(influx, DB, report)
    after = json.loads(
        (
            await asyncio.to_thread(hub_command, "spool", "status", "--json", "--state-dir", state)
        ).stdout
    )
    assert after["batches"] == 0


async def test_workers_share_the_one_socket_systemd_passes(
    tmp_path: Path, influx: LocalServer
) -> None:
    """Socket-activated with one socket, as the shipped hub.socket passes (systemd's own
    systemd-socket-activate): the supervisor hands it to both workers, which serve devices
    on it and bind nothing of their own; the spread is printed, and the hub says at start
    that one socket spreads unevenly."""
    ensure_host_tools()  # systemd-container depends on systemd, which has the tool
    tool = shutil.which("systemd-socket-activate")
    assert tool is not None
    hub = WorkersHub(tmp_path / "state", influx, DB, 2)
    own_port = free_port()
    argv = list(hub.argv)
    argv[argv.index("--port") + 1] = str(own_port)
    hub.argv = [tool, "-l", f"127.0.0.1:{hub.port}", "--fdname=devices", *argv]
    await hub.start()
    try:
        creds = devices(hub, 20)
        clients = [DeviceClient(hub.url, device.token) for device in creds]
        base_ms = time.time_ns() // 10**6

        async def store_one(number: int, client: DeviceClient) -> int:
            await client.__aenter__()
            return (
                await asyncio.wait_for(client.store(reading(1.0, base_ms + number)), 30)
            ).accepted

        try:
            accepted = await asyncio.gather(*(store_one(n, c) for n, c in enumerate(clients)))
            await hub.until(
                "every connection counted",
                lambda: sum(hub.metrics()["hub_connections"].values()) == 20,
            )
            spread = hub.metrics()["hub_connections"]
            print(f"20 devices over 2 workers on one passed socket: {spread}")
        finally:
            await close_all(clients)
        assert accepted == [1] * 20
        assert "one socket from systemd for 2 workers" in hub.log
        assert hub.log.count("the socket systemd passed") == 3  # the supervisor, each worker
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", own_port)
    finally:
        assert await hub.stop() == 0


class FakeServiceManager:
    """The service manager's end of sd_notify, as systemd has it: a datagram socket named
    in NOTIFY_SOCKET, every notification kept with its arrival time."""

    def __init__(self) -> None:
        self.address = f"@sensor-hub-test-{os.getpid()}-{time.monotonic_ns()}"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self.socket.bind("\0" + self.address[1:])
        self.received: list[tuple[float, dict[str, str]]] = []

    async def listen(self) -> None:
        """Keep every datagram until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.socket, 4096)
            self.received.append((time.monotonic(), parse_notification(data)))

    def said(self, key: str, value: str = "1") -> list[float]:
        """When each notification with KEY=VALUE came."""
        return [at for at, message in self.received if message.get(key) == value]


async def test_systemd_hears_ready_once_all_listen_and_a_frozen_worker_is_replaced(
    tmp_path: Path, influx: LocalServer
) -> None:
    """Under a service manager with a 4 s watchdog (the protocol systemd speaks): READY=1
    comes once both workers listen, WATCHDOG=1 keeps coming; a worker frozen with SIGSTOP
    is killed after 2 s of silence and its slot restarted, and SIGTERM says STOPPING=1."""
    manager = FakeServiceManager()
    listening = asyncio.create_task(manager.listen())
    hub = WorkersHub(tmp_path / "state", influx, DB, 2)
    assert hub.env is not None
    hub.env.update(NOTIFY_SOCKET=manager.address, WATCHDOG_USEC="4000000")
    try:
        await hub.start()
        await hub.until("READY=1", lambda: manager.said("READY"))
        ready = next(m for _, m in manager.received if m.get("READY") == "1")
        assert ready["STATUS"] == f"2 workers listening on 127.0.0.1:{hub.port} (SO_REUSEPORT)"
        assert hub.all_listening()
        await hub.until("two watchdog pings", lambda: len(manager.said("WATCHDOG")) >= 2)
        frozen = hub.worker_pids()[1]
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)
        try:
            await hub.until(
                "the frozen worker replaced",
                lambda: hub.worker_pids()[1] not in (None, frozen) and hub.all_listening(),
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGCONT)
        assert f"worker 1/2 (pid {frozen}) sent nothing for 2 s (frozen?): killing it" in hub.log
        assert hub.metrics()["hub_worker_restarts_total"]["1"] == 1.0
        assert await hub.stop() == 0
        assert manager.said("STOPPING")
    finally:
        listening.cancel()
        manager.socket.close()
        if hub.process is not None and hub.process.poll() is None:
            await hub.stop()
