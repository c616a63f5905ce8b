"""Simulated devices: realistic readings sent at a steady rate, counted as they are acked."""

from __future__ import annotations

import asyncio
import csv
import functools
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_sim.client import DeviceClient
from schemas.messages import Ack


@dataclass(frozen=True)
class Credentials:
    """A device id and its token."""

    device_id: str
    token: str


def read_tokens(path: Path) -> list[Credentials]:
    """Read a CSV of `device_id,token` rows (a header row is skipped)."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if row and row[0] != "device_id"]
    return [Credentials(row[0], row[1]) for row in rows]


class SensorProfile:
    """A smooth random walk per quantity, with a little noise, like a real room sensor."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.temperature = rng.uniform(18, 24)
        self.humidity = rng.uniform(35, 55)
        self.pressure = rng.uniform(990, 1030)
        self.battery = rng.uniform(3.6, 4.2)

    def reading(self, time_ms: int, room: str) -> dict[str, Any]:
        """The next reading."""
        walk, noise = self.rng.gauss, self.rng.uniform
        self.temperature = min(40.0, max(-10.0, self.temperature + walk(0, 0.05)))
        self.humidity = min(100.0, max(0.0, self.humidity + walk(0, 0.1)))
        self.pressure += walk(0, 0.02)
        self.battery = max(3.0, self.battery - 1e-6)
        return {
            "name": "environment",
            "time": time_ms,
            "tags": {"room": room},
            "fields": {
                "temperature": round(self.temperature + noise(-0.02, 0.02), 3),
                "humidity": round(self.humidity, 2),
                "pressure": round(self.pressure, 2),
                "battery": round(self.battery, 3),
            },
        }


@dataclass
class FleetStats:
    """What the fleet did."""

    sent: int = 0
    acked: int = 0
    rejected: int = 0
    failed_connections: int = 0
    latencies_ms: list[float] = field(default_factory=list)


async def run_device(
    url: str,
    device: Credentials,
    stats: FleetStats,
    *,
    rate: float,
    batch: int,
    duration: float,
    max_in_flight: int = 16,
) -> None:
    """One device sending `rate` messages of `batch` readings a second for `duration` s."""
    rng = random.Random(device.device_id)
    sensor = SensorProfile(rng)
    room = f"room-{rng.randrange(1, 20)}"
    client = DeviceClient(url, device.token)
    try:
        await client.connect()
    except (TimeoutError, OSError, Exception):
        stats.failed_connections += 1
        return
    in_flight: set[asyncio.Future[Ack]] = set()
    deadline = time.monotonic() + duration
    next_send = time.monotonic() + rng.uniform(0, 1 / rate)
    try:
        while (now := time.monotonic()) < deadline:
            await asyncio.sleep(max(0.0, next_send - now))
            next_send += 1 / rate
            while len(in_flight) >= max_in_flight:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            now_ms = time.time_ns() // 1_000_000
            readings = [sensor.reading(now_ms - (batch - i), room) for i in range(batch)]
            sent_at = time.perf_counter()
            future = await client.send_readings(readings)
            stats.sent += batch
            in_flight.add(future)
            future.add_done_callback(in_flight.discard)
            future.add_done_callback(functools.partial(_count, stats, sent_at=sent_at))
        if in_flight:
            await asyncio.wait(in_flight, timeout=30)
    finally:
        await client.close()


def _count(stats: FleetStats, future: asyncio.Future[Ack], *, sent_at: float) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    ack = future.result()
    stats.acked += ack.accepted
    stats.rejected += len(ack.rejected)
    stats.latencies_ms.append((time.perf_counter() - sent_at) * 1000)


async def run_fleet(
    url: str, devices: list[Credentials], *, rate: float, batch: int, duration: float
) -> FleetStats:
    """Run every device concurrently and return the combined counts."""
    stats = FleetStats()
    await asyncio.gather(
        *(run_device(url, d, stats, rate=rate, batch=batch, duration=duration) for d in devices)
    )
    return stats
