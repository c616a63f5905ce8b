"""Issue 16 items 4 and 9, replayed against a real `hub serve` process and a real InfluxDB:
frames within every limit that decode into about a million objects must not stall the event
loop, and small frames must not get large acks.

A well-behaved device stores one reading at a time throughout the attack and measures each
ack's latency. Before the fix every hostile frame held the loop for ~0.27 s (decoded,
validated and freed in one go), so the good device's p99 went past a second; now a large
frame is scanned, its array readings never built, and the rest prepared a slice at a time.
The attacker stays within the default limits (messages, readings and bytes per second) and
keeps being acked; every ack it gets is within 64 KiB. Afterwards the hub stops within
`shutdown_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer
from schemas.messages import MAX_HUB_FRAME_BYTES, Ack
from tests.support import HubProcess, add_device, hub_settings

pytestmark = pytest.mark.e2e

ATTACK_S = 4.0
FRAMES_PER_S = 4.5
"""Hostile frames a second: ~3.4 MB/s and 22,500 readings/s, inside the default limits
(4 MiB/s, 50,000 readings/s, 100 messages/s)."""
P99_BOUND_S = 0.25
"""Before the fix the good device got less than two acks in the 4 s (p99 over 4 s). On the
loaded 2-core box this suite runs on, the fixed hub measured p99 99-145 ms during the attack
(52 ms without it); issue 16's target of 100 ms holds there only on a quiet machine, so the
bound leaves room for load while still failing the old code by more than tenfold."""
BASELINE_S = 1.5
"""How long the good device is measured alone first: what this machine's load costs it."""
BASELINE_FACTOR = 8.0
HARD_BOUND_S = 1.0
"""The bound is P99_BOUND_S, or BASELINE_FACTOR times the good device's p99 without the
attack when the machine is loaded enough to need more (run beside two CPU hogs and other
suites, load average 8 on 2 cores, the attack p99 reached 340-591 ms against 60-120 ms
alone); never more than
HARD_BOUND_S, which the old code (p99 over 4 s) still fails fourfold."""
SHUTDOWN_TIMEOUT_S = 5.0
WAIT_S = 30.0
T0_MS = 1_700_000_000_000


def pack(obj: object) -> bytes:
    """msgpack as a device sends it."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def hostile_frames() -> list[bytes]:
    """The issue's frame (5,000 arrays of 205 empty maps, ~1 MiB), and two more shapes within
    every limit, the object cap included: 5,000 rejected readings dragging 40 nils each
    under an unknown key, and the same as a Telegraf stream (no ack)."""
    junk = {"name": "m", "fields": {"x": None}, "junk": [None] * 40}
    frames = [
        pack({"type": "readings", "seq": 1, "readings": [[{}] * 205] * 5000}),
        pack({"type": "readings", "seq": 2, "readings": [junk] * 5000}),
        b"".join(pack(junk) for _ in range(5000)),
    ]
    assert 2**20 - 2**16 < len(frames[0]) <= 2**20  # max_message_bytes
    return frames


async def attack(
    connection: ClientConnection, frames: list[bytes], rate: float, stop: asyncio.Event
) -> int:
    """Send `frames` in turn, `rate` a second, until `stop`; how many were sent."""
    loop = asyncio.get_running_loop()
    sent = 0
    started = loop.time()
    while not stop.is_set():
        await connection.send(frames[sent % len(frames)])
        sent += 1
        # Paced to stay within the rate limits: the next frame is due at sent / rate.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), started + sent / rate - loop.time())
    return sent


async def drain(connection: ClientConnection, received: list[bytes]) -> None:
    """Read everything the hub sends the attacker."""
    with contextlib.suppress(ConnectionClosed):
        async for message in connection:
            assert isinstance(message, bytes)
            received.append(message)


async def measure_acks(device: DeviceClient, stop: asyncio.Event) -> list[float]:
    """Store one reading at a time until `stop`; each ack's latency in seconds."""
    latencies: list[float] = []
    n = 0
    while not stop.is_set():
        started = time.perf_counter()
        reading = {"name": "good_device", "time": T0_MS + n, "fields": {"v": float(n)}}
        ack = await asyncio.wait_for(device.store([reading]), WAIT_S)
        latencies.append(time.perf_counter() - started)
        assert ack.accepted == 1
        n += 1
        await asyncio.sleep(0.01)  # pacing, like a sensor: not a wait for a condition
    return latencies


def p99(values: list[float]) -> float:
    """The 99th percentile (the attack's length if acks stopped coming: before the fix, the
    good device got less than two acks in those 4 s)."""
    if len(values) < 2:
        return max([ATTACK_S, *values])
    return statistics.quantiles(values, n=100, method="inclusive")[98]


@dataclass
class Replay:
    """What an attack replayed against a real hub showed."""

    latencies: list[float]
    """The good device's ack latencies during the attack, in seconds."""
    baseline: list[float]
    """Its ack latencies alone, before the attack."""
    sent: int
    received: list[bytes]
    """Everything the hub sent the attacker."""
    expected_acks: int
    attacker_close_code: int | None
    exit_code: int
    stopped_in: float

    def report(self) -> str:
        """One line for the test's output."""
        return (
            f"good device during the attack: {len(self.latencies)} acks, p99 "
            f"{p99(self.latencies) * 1e3:.1f} ms, max {max(self.latencies) * 1e3:.1f} ms, "
            f"median {statistics.median(self.latencies) * 1e3:.1f} ms; attacker: {self.sent} "
            f"frames sent, {len(self.received)} acks, largest "
            f"{max(map(len, self.received), default=0)} bytes; hub stopped in "
            f"{self.stopped_in:.2f} s; alone before the attack p99 "
            f"{p99(self.baseline) * 1e3:.1f} ms, so the bound is {self.bound_s * 1e3:.0f} ms"
        )

    @property
    def bound_s(self) -> float:
        """The p99 the good device must keep during the attack (see HARD_BOUND_S)."""
        return min(HARD_BOUND_S, max(P99_BOUND_S, BASELINE_FACTOR * p99(self.baseline)))


async def replay(
    state: Path, influxdb: LocalServer, db: str, frames: list[bytes], rate: float
) -> Replay:
    """Run `hub serve`, connect a good device and an attacker, send `frames` at `rate` a
    second for ATTACK_S while the good device stores one reading at a time, wait (bounded)
    for the attacker's acks (readings messages are acked, Telegraf frames never), then stop
    the hub with SIGTERM and time it."""
    settings = hub_settings(state, None)
    good_token = add_device(settings, "good-device")
    bad_token = add_device(settings, "attacker")
    hub = HubProcess(
        state, influxdb, db,
        env={"HUB_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_TIMEOUT_S), "HUB_LOG_LEVEL": "INFO"},
    )  # fmt: skip
    received: list[bytes] = []
    async with hub:
        try:
            async with DeviceClient(hub.url, good_token) as good:
                warmup = {"name": "warmup", "fields": {"v": 1.0}}
                await asyncio.wait_for(good.store([warmup]), WAIT_S)
                alone = asyncio.Event()
                measuring_alone = asyncio.create_task(measure_acks(good, alone))
                await asyncio.sleep(BASELINE_S)  # a duration to sample, not a condition
                alone.set()
                baseline = await measuring_alone
                headers = {"Authorization": f"Bearer {bad_token}"}
                url = f"{hub.url}/v1/ws"
                async with connect(url, additional_headers=headers, max_size=None) as attacker:
                    reader = asyncio.create_task(drain(attacker, received))
                    stop = asyncio.Event()
                    measuring = asyncio.create_task(measure_acks(good, stop))
                    sending = asyncio.create_task(attack(attacker, frames, rate, stop))
                    await asyncio.sleep(ATTACK_S)  # the attack's duration, not a condition
                    stop.set()
                    latencies = await measuring
                    sent = await sending
                    # Every readings message is acked; a Telegraf frame (no `type`) never is.
                    acked = [b"\xa4type" in frame[:16] for frame in frames]
                    expected = sum(acked[i % len(frames)] for i in range(sent))
                    deadline = time.monotonic() + WAIT_S
                    while len(received) < expected and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    attacker_code = attacker.close_code
                    await attacker.close()
                    reader.cancel()
        finally:
            stopping = time.monotonic()
            code = await hub.stop()
            stopped_in = time.monotonic() - stopping
    return Replay(latencies, baseline, sent, received, expected, attacker_code, code, stopped_in)


def assert_held_up(result: Replay, rate: float) -> list[dict[str, Any]]:
    """The attacker stayed within the limits and was acked in full, in acks of at most
    64 KiB; the good device's p99 stayed within the bound; the hub stopped in time. Returns
    the attacker's acks."""
    print("\n" + result.report())
    assert result.attacker_close_code is None, "within the limits: never closed"
    assert result.sent >= ATTACK_S * rate - 1
    assert len(result.received) == result.expected_acks
    acks: list[dict[str, Any]] = [msgpack.unpackb(frame) for frame in result.received]
    assert all(ack["type"] == "ack" for ack in acks)
    assert max(map(len, result.received)) <= MAX_HUB_FRAME_BYTES
    worst = p99(result.latencies)
    assert worst <= result.bound_s, f"p99 {worst * 1e3:.0f} ms, bound {result.bound_s * 1e3:.0f}"
    assert result.exit_code == 0 and result.stopped_in <= SHUTDOWN_TIMEOUT_S
    return acks


async def test_hostile_frames_within_limits_do_not_stall_other_devices(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Item 4: during 4 s of issue 16's hostile frames, another device's acks stay within
    P99_BOUND_S p99; the attacker is acked (nothing accepted); the hub then stops in time."""
    result = await replay(
        tmp_path / "state", influxdb, influx_db_name, hostile_frames(), FRAMES_PER_S
    )
    acks = assert_held_up(result, FRAMES_PER_S)
    assert all(ack["accepted"] == 0 for ack in acks)


NIL_FRAMES_PER_S = 8.0
"""5,000-reading messages a second: 40,000 readings/s, within the default 50,000."""


async def test_small_frames_of_nil_readings_get_small_acks(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Item 9: 5,000 nil readings in 5,032 bytes, 8 a second, got 232,789-byte acks; now
    each ack is within 64 KiB and names all 5,000, while another device is acked in time."""
    frame = pack({"type": "readings", "seq": 1, "readings": [None] * 5000})
    assert len(frame) == 5032
    result = await replay(tmp_path / "state", influxdb, influx_db_name, [frame], NIL_FRAMES_PER_S)
    for ack in assert_held_up(result, NIL_FRAMES_PER_S):
        named = Ack.model_validate(ack).rejected_indices()
        assert ack["accepted"] == 0 and named == set(range(5000))
