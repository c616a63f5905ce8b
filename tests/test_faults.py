"""Fault tests: whatever fails, every reading the hub acked ends up in InfluxDB.

Each test streams readings with explicit, unique timestamps from several simulated devices
(device_sim, which keeps what is unacked and resends it after reconnecting) through a real
`hub serve` process into a private real InfluxDB 1.6.7, breaks something mid-stream, and at
the end compares, device by device, the acked timestamps with what InfluxDB holds.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from device_sim.fleet import Credentials, FleetReport, run_fleet
from device_sim.local_servers import (
    LocalServer,
    create_database,
)
from device_sim.stats import FleetStats
from hub.ingest.spool import SEGMENT_SUFFIX, read_status
from hub.registry.sqlite import Registry
from tests.support import FAST_WRITES as FAST
from tests.support import HubProcess, assert_every_ack_stored

pytestmark = pytest.mark.e2e

DB = "faults"
DEVICES = 8


@pytest.fixture
def influx(own_influxdb: LocalServer) -> LocalServer:
    """A private InfluxDB that the test may kill, freeze and restart. (with database DB)."""
    create_database(own_influxdb.url, DB)
    return own_influxdb


@pytest.fixture
def devices(tmp_path: Path) -> list[Credentials]:
    """Registered devices with their tokens."""
    registry = Registry(tmp_path / "state" / "registry.sqlite3")
    ids = [f"fault-{n}" for n in range(DEVICES)]
    try:
        tokens = registry.add_many(ids)
    finally:
        registry.close()
    return [Credentials(d, t) for d, t in zip(ids, tokens, strict=True)]


@pytest.fixture
async def hub(tmp_path: Path, influx: LocalServer) -> AsyncIterator[HubProcess]:
    """A real hub process on the test's state directory, stopped by pid at the end."""
    process = HubProcess(tmp_path / "state", influx, DB, env=FAST)
    await process.start()
    try:
        yield process
    finally:
        if process.process is not None and process.process.poll() is None:
            await process.kill()


def stream(
    hub: HubProcess, devices: list[Credentials], duration: float, stats: FleetStats | None = None
) -> asyncio.Task[FleetReport]:
    """Start the fleet in the background: 10 messages/s of 20 readings per device."""
    return asyncio.create_task(
        run_fleet(
            hub.url, devices, rate=10, batch=20, duration=duration, final_wait_s=30, stats=stats
        )
    )


async def wait_for_acks(report_task: asyncio.Task[FleetReport], hub: HubProcess) -> None:
    """Let the stream run until the hub has acked something (bounded)."""
    for _ in range(200):
        if "device fault-" in hub.log:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    assert not report_task.done(), "the fleet ended before the fault"


async def test_influxdb_killed_and_restarted(
    hub: HubProcess, influx: LocalServer, devices: list[Credentials]
) -> None:
    """InfluxDB SIGKILLed mid-stream and restarted: every acked reading is stored."""
    fleet = stream(hub, devices, duration=6)
    await wait_for_acks(fleet, hub)
    influx.kill()
    await asyncio.sleep(2)
    influx.restart()
    report = await fleet
    await assert_every_ack_stored(influx, DB, report)
    assert "batches go to the spool" in hub.log


async def test_influxdb_frozen_then_resumed(
    hub: HubProcess, influx: LocalServer, devices: list[Credentials]
) -> None:
    """InfluxDB SIGSTOPped: the hub does not hang (acks go on through the spool), and what
    it acked is all stored once InfluxDB resumes."""
    stats = FleetStats()
    fleet = stream(hub, devices, duration=7, stats=stats)
    await wait_for_acks(fleet, hub)
    influx.pause()
    try:
        await asyncio.sleep(2)  # past the write deadline: batches now go to the spool
        acked_before = stats.acked
        await asyncio.sleep(2)
        assert stats.acked > acked_before, "no ack while InfluxDB was frozen: the hub hung"
    finally:
        influx.resume()
    report = await fleet
    await assert_every_ack_stored(influx, DB, report)
    assert "no answer within" in hub.log


async def test_hub_killed_and_restarted(
    hub: HubProcess, influx: LocalServer, devices: list[Credentials]
) -> None:
    """The hub SIGKILLed mid-stream and restarted on its state dir: devices resend, nothing
    acked is lost."""
    # Long enough that every device is still streaming once the hub is back: a restart
    # took over 4 s beside two CPU hogs and other suites, and a device whose stream ended
    # meanwhile never reconnects.
    fleet = stream(hub, devices, duration=14)
    await wait_for_acks(fleet, hub)
    await hub.kill()
    await asyncio.sleep(1)
    await hub.start()
    report = await fleet
    assert sum(d.reconnects for d in report.devices.values()) >= DEVICES
    await assert_every_ack_stored(influx, DB, report)


async def test_hub_killed_while_influxdb_is_down_replays_its_spool(
    hub: HubProcess, influx: LocalServer, devices: list[Credentials]
) -> None:
    """Acked readings that were only in the spool when the hub died are replayed on start."""
    fleet = stream(hub, devices, duration=4)
    await wait_for_acks(fleet, hub)
    influx.kill()
    await asyncio.sleep(2)
    await hub.kill()
    assert read_status(hub.state_dir / "spool").points > 0
    influx.restart()
    await hub.start()
    report = await fleet
    await assert_every_ack_stored(influx, DB, report)


async def test_sigterm_mid_stream_exits_cleanly_and_loses_nothing(
    hub: HubProcess, influx: LocalServer, devices: list[Credentials]
) -> None:
    """SIGTERM mid-stream: exit 0 within the shutdown bound, and no acked reading missing."""
    fleet = stream(hub, devices, duration=4)
    await wait_for_acks(fleet, hub)
    assert hub.process is not None
    hub.signal(signal.SIGTERM)
    # The bound is HUB_SHUTDOWN_TIMEOUT_S (5 s) plus start-up of the interpreter's exit.
    status = await asyncio.to_thread(hub.process.wait, 15)
    assert status == 0, hub.log
    assert "stopped" in hub.log
    await hub.start()
    report = await fleet
    assert 1001 in {code for d in report.devices.values() for code in d.close_codes}
    await assert_every_ack_stored(influx, DB, report)


async def test_full_spool_slows_devices_and_loses_nothing(
    tmp_path: Path, influx: LocalServer, devices: list[Credentials]
) -> None:
    """With InfluxDB away and a tiny spool, acks stop (devices keep their data) instead of
    anything being dropped; memory stays bounded; all acked arrives once InfluxDB is back."""
    env = {**FAST, "HUB_SPOOL_MAX_BYTES": "200000", "HUB_MAX_PENDING_READINGS": "2000"}
    hub = HubProcess(tmp_path / "state", influx, DB, env=env)
    await hub.start()
    try:
        influx.kill()
        stats = FleetStats()
        fleet = stream(hub, devices, duration=8, stats=stats)
        assert await acks_stall(stats), "acks never stopped although the spool was full"
        assert read_status(tmp_path / "state" / "spool").bytes <= 200_000
        assert rss_kib(hub) < 300_000, "hub memory grew without bound"
        influx.restart()
        report = await fleet
        await assert_every_ack_stored(influx, DB, report)
    finally:
        await hub.stop()


async def acks_stall(stats: FleetStats) -> bool:
    """Whether, within 15 s, a whole second passes without a single ack."""
    for _ in range(15):
        before = stats.acked
        await asyncio.sleep(1)
        if stats.acked == before and stats.in_flight > 0:
            return True
    return False


async def test_torn_spool_tail_is_skipped_and_the_rest_replayed(
    hub: HubProcess, influx: LocalServer, devices: list[Credentials]
) -> None:
    """A torn write at the end of the spool is reported and skipped; the rest is replayed."""
    fleet = stream(hub, devices, duration=3)
    await wait_for_acks(fleet, hub)
    influx.kill()
    report = await fleet
    await hub.kill()
    segments = sorted((hub.state_dir / "spool").glob("*" + SEGMENT_SUFFIX))
    assert segments, "nothing was spooled"
    with segments[-1].open("ab") as tail:
        tail.write(b"HSP1\xff\xff\x00\x00torn")  # a header promising more than was written
    influx.restart()
    await hub.start()
    await assert_every_ack_stored(influx, DB, report)
    assert "damaged bytes" in hub.log


def rss_kib(hub: HubProcess) -> int:
    """The hub process's resident memory."""
    assert hub.process is not None
    with open(f"/proc/{hub.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")
