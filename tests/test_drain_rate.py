"""A draining hub closes its devices with 1001 at `drain_rate`, faster only to finish within
`shutdown_timeout_s`: the pace alone (pure), then a real `hub serve` drained on SIGTERM with
real devices, some streaming, whose close times are measured at the devices (printed)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from pathlib import Path

import pytest

from device_sim.client import DeviceClient
from device_sim.hub_process import provision
from device_sim.local_servers import LocalServer
from hub.gateway.drain import DrainPace, close_interval, turns_window
from tests.support import HubProcess, points

WAIT_S = 30.0
"""Bound for what must happen at all (a drain is at most its shutdown_timeout_s)."""
DEVICES = 30
STREAMING = 10
"""Of DEVICES, how many send readings all through the drain."""


@pytest.mark.unit
def test_the_interval_is_the_rate_unless_the_window_is_too_short() -> None:
    """1/rate while the last turn comes within the window; spread evenly over it otherwise;
    no pause with rate 0 or one session."""
    assert close_interval(10, 5.0, 10.0) == pytest.approx(0.2)
    assert close_interval(101, 5.0, 10.0) == pytest.approx(0.1)  # 100 gaps in 10 s
    assert close_interval(10, 0.0, 10.0) == 0.0
    assert close_interval(1, 5.0, 10.0) == 0.0
    assert close_interval(10, 5.0, -1.0) == 0.0  # out of time: at once
    assert turns_window(10.0) == pytest.approx(9.0)  # a second kept for the last closes
    assert turns_window(2.0) == pytest.approx(1.6)  # a short drain keeps 80 %


@pytest.mark.unit
async def test_each_close_takes_the_next_turn_once_and_late_ones_go_at_once() -> None:
    """Turns follow each other at 1/rate; one close asking twice keeps its turn; past the
    window's end a close goes when it asks."""
    pace = DrainPace(3, 20.0, 10.0)
    t0 = pace.start
    first, second, third = object(), object(), object()
    assert pace.reserve(first, t0) - t0 == pytest.approx(0.0, abs=1e-9)
    assert pace.reserve(second, t0) - t0 == pytest.approx(0.05)
    assert pace.reserve(first, t0 + 1) - t0 == pytest.approx(0.0, abs=1e-9)  # the same turn
    assert pace.reserve(third, t0 + 0.01) - t0 == pytest.approx(0.10)
    assert pace.reserve(object(), t0 + 20) <= t0 + 20  # came in late: at once
    loop = asyncio.get_running_loop()
    waited = DrainPace(2, 20.0, 10.0)
    await waited.turn(first)
    await waited.turn(second)  # really waits for its turn
    assert loop.time() >= waited.start + 0.05


@pytest.mark.unit
async def test_closes_asking_late_are_spread_over_the_time_left_not_bunched_at_its_end() -> None:
    """21 sessions at 10/s would need 2 s; in the 1.6 s window of a 2 s drain, with the
    closes asking only 0.8 s in (after the drain's flush), they are spread evenly over the
    0.8 s left, 40 ms apart, the last at the window's end."""
    pace = DrainPace(21, 10.0, 2.0)
    asked = pace.start + 0.8
    turns = [pace.reserve(object(), asked) - pace.start for _ in range(21)]
    assert turns[0] == pytest.approx(0.8)
    assert turns[-1] == pytest.approx(1.6)
    gaps = [b - a for a, b in itertools.pairwise(turns)]
    assert min(gaps) == pytest.approx(0.04) and max(gaps) == pytest.approx(0.04)


async def drained(
    tmp_path: Path, influxdb: LocalServer, db: str, rate: float, shutdown_s: float
) -> tuple[list[float], list[int | None], HubProcess]:
    """Drain a hub holding DEVICES devices (STREAMING of them sending readings) with
    SIGTERM: each device's close time after the signal, its close code, and the hub; every
    reading acked during it is then checked to be in InfluxDB."""
    env = {"HUB_DRAIN_RATE": str(rate), "HUB_SHUTDOWN_TIMEOUT_S": str(shutdown_s)}
    hub = HubProcess(tmp_path / "state", influxdb, db, env=env)
    fleet = await asyncio.to_thread(provision, hub.state_dir, DEVICES, "drain-")
    await hub.start()
    clients: list[DeviceClient] = []
    closed_at: list[list[float]] = []
    acked: list[int] = []
    streams: list[asyncio.Task[None]] = []

    async def stream(client: DeviceClient, n: int) -> None:
        with contextlib.suppress(Exception):  # ends when the hub closes the connection
            for seq in range(100_000):
                reading = {"name": "drain", "tags": {"d": str(n)}, "fields": {"seq": seq}}
                if (await client.store([reading])).accepted == 1:
                    acked.append(n * 1_000_000 + seq)
                await asyncio.sleep(0.05)

    try:
        for n, credentials in enumerate(fleet):
            client = DeviceClient(hub.url, credentials.token)
            await asyncio.wait_for(client.connect(), WAIT_S)
            times: list[float] = []
            client.on_closed(functools.partial(lambda t: t.append(time.perf_counter()), times))
            clients.append(client)
            closed_at.append(times)
            if n < STREAMING:
                streams.append(asyncio.create_task(stream(client, n)))
        deadline = time.monotonic() + WAIT_S
        while len({seq // 1_000_000 for seq in acked}) < STREAMING:  # every stream flows
            assert time.monotonic() < deadline, "the streaming devices got no acks"
            await asyncio.sleep(0.05)
        signalled = time.perf_counter()
        code = await hub.stop()
        assert code == 0, hub.log
        for client in clients:
            await asyncio.wait_for(client.wait_closed(), WAIT_S)
        await asyncio.wait_for(asyncio.gather(*streams), WAIT_S)
    finally:
        for client in clients:
            await asyncio.wait_for(client.close(), WAIT_S)
    stored = {int(row["d"]) * 1_000_000 + int(row["seq"]) for row in points(influxdb, db, "drain")}
    assert acked and set(acked) <= stored, "an acked reading is missing from InfluxDB"
    offsets = [times[0] - signalled for times in closed_at]
    return offsets, [client.close_code for client in clients], hub


@pytest.mark.e2e
async def test_a_drain_closes_devices_at_the_configured_rate(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """30 devices at 15 closes/s: every one closed with 1001 over about 2 s (29 gaps of
    1/15 s), not in one burst (today's code closed them within milliseconds); streaming
    ones included, their acked readings stored."""
    offsets, codes, hub = await drained(tmp_path, influxdb, influx_db_name, 15.0, 10.0)
    assert codes == [1001] * DEVICES, hub.log
    spread = max(offsets) - min(offsets)
    expected = (DEVICES - 1) / 15.0
    print(
        f"drain at 15/s, {DEVICES} devices: closes spread over {spread:.2f} s "
        f"(expected {expected:.2f} s), first {min(offsets):.2f} s after SIGTERM"
    )
    assert spread >= 0.6 * expected, sorted(offsets)


@pytest.mark.e2e
async def test_a_drain_too_slow_for_the_timeout_speeds_up_and_drops_nobody(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """30 devices at 1 close/s would take 29 s; with shutdown_timeout_s 4 the closes are
    spread over the drain's window instead (3.2 s): every device still gets its 1001 (none
    cut off), and the hub exits within its timeout."""
    started = time.perf_counter()
    offsets, codes, hub = await drained(tmp_path, influxdb, influx_db_name, 1.0, 4.0)
    assert codes == [1001] * DEVICES, hub.log
    spread = max(offsets) - min(offsets)
    print(
        f"drain at 1/s within 4 s, {DEVICES} devices: closes spread over {spread:.2f} s "
        f"(window {turns_window(4.0):.1f} s); the test took {time.perf_counter() - started:.1f} s"
    )
    assert 0.4 * turns_window(4.0) <= spread <= 4.0, sorted(offsets)
    assert "did not close in time" not in hub.log
