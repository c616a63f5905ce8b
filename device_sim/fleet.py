"""Many simulated devices at once, in one event loop, and what they did.

Runs by itself for a bounded time; tests and benchmarks drive it in-process::

    import asyncio
    from pathlib import Path
    from device_sim.fleet import read_tokens, run_fleet

    async def main() -> None:
        stop = asyncio.Event()  # set it to end early; devices then drain like at the deadline
        report = await run_fleet(
            "ws://127.0.0.1:8765", read_tokens(Path("tokens.csv")),
            rate=2, batch=50, duration=30, stop=stop, final_wait_s=10,
        )
        for device_id, device in report.devices.items():
            # Exactly the readings the hub acknowledged, as InfluxDB timestamps (ns):
            print(device_id, device.acked, device.resent, device.reconnects,
                  device.acked_times_ns()[:3])
        print(report.summary())

A hub that restarts on the same port is fine: devices reconnect with backoff until the
deadline and resend what was not acked. After the deadline they send nothing new and wait
at most `final_wait_s` (still reconnecting and resending) for outstanding acks, then report
what was acked. `run_fleet` returns within about `duration + final_wait_s` plus the time
to close connections (websockets' close timeout bounds that).
"""

from __future__ import annotations

import asyncio
import csv
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from device_sim.device import Credentials, DeviceOptions, DeviceReport, SimulatedDevice
from device_sim.stats import FleetStats, LatencyHistogram, summary

__all__ = [
    "Credentials",
    "DeviceOptions",
    "DeviceReport",
    "FleetReport",
    "read_tokens",
    "run_fleet",
]


def read_tokens(path: Path) -> list[Credentials]:
    """Read a CSV of `device_id,token` rows (a header row is skipped)."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if row and row[0] != "device_id"]
    return [Credentials(row[0], row[1]) for row in rows]


@dataclass
class FleetReport:
    """Every device's report, the fleet's counters and its ack latencies."""

    devices: dict[str, DeviceReport]
    started_at: float
    """Wall-clock start (time.time())."""
    elapsed_s: float
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def total(self, counter: str) -> int:
        """A counter (`sent`, `acked`, `rejected`, `resent`, `reconnects`, ...) over all devices."""
        return sum(int(getattr(device, counter)) for device in self.devices.values())

    @property
    def sent(self) -> int:
        """Readings sent for the first time."""
        return self.total("sent")

    @property
    def acked(self) -> int:
        """Readings the hub acked as stored."""
        return self.total("acked")

    def acked_times(self, device_id: str) -> list[int]:
        """The sorted timestamps (in the connection precision) of a device's acked readings."""
        return self.devices[device_id].acked_times

    def states(self) -> dict[str, int]:
        """How many devices ended in each state."""
        counts: dict[str, int] = {}
        for device in self.devices.values():
            counts[str(device.state)] = counts.get(str(device.state), 0) + 1
        return counts

    def summary(self) -> dict[str, Any]:
        """Totals, states and ack latency percentiles, JSON-friendly."""
        counters = {
            name: self.total(name)
            for name in (
                "sent",
                "acked",
                "rejected",
                "resent",
                "unacked",
                "dropped",
                "reconnects",
                "failed_connects",
            )
        }
        counters["configs_applied"] = sum(len(d.configs_applied) for d in self.devices.values())
        errors: dict[str, int] = {}
        for device in self.devices.values():
            for why, count in device.connect_errors.items():
                errors[why] = errors.get(why, 0) + count
        return {
            "devices": len(self.devices),
            "elapsed_s": round(self.elapsed_s, 3),
            "acked_per_s": round(self.acked / self.elapsed_s, 1) if self.elapsed_s else None,
            "states": self.states(),
            "connect_errors": errors,
            **summary(counters, self.latency),
        }


async def run_fleet(
    url: str,
    credentials: list[Credentials],
    *,
    rate: float,
    batch: int,
    duration: float,
    stop: asyncio.Event | None = None,
    stats: FleetStats | None = None,
    options: DeviceOptions | None = None,
    **option_overrides: Any,
) -> FleetReport:
    """Run every device concurrently for `duration` s (or until `stop`), then report.

    `rate` is messages a second per device, `batch` readings a message; anything else of
    `DeviceOptions` can be given as a keyword (`final_wait_s=5`, `invalid_ratio=0.01`...).
    Pass your own `stats` to watch the counters while it runs.
    """
    options = replace(options or DeviceOptions(), rate=rate, batch=batch, **option_overrides)
    stats = stats if stats is not None else FleetStats()
    loop = asyncio.get_running_loop()
    started_at, started = time.time(), loop.time()
    devices = [SimulatedDevice(url, creds, options, stats) for creds in credentials]
    runs = [asyncio.create_task(d.run(started + duration)) for d in devices]
    watcher = asyncio.create_task(_stop_all_when(stop, devices)) if stop is not None else None
    try:
        reports = await asyncio.gather(*runs)
    finally:
        for run in runs:
            run.cancel()
        if watcher is not None:
            watcher.cancel()
    return FleetReport(
        devices={r.device_id: r for r in reports},
        started_at=started_at,
        elapsed_s=loop.time() - started,
        latency=stats.latency,
    )


async def _stop_all_when(stop: asyncio.Event, devices: list[SimulatedDevice]) -> None:
    await stop.wait()
    for device in devices:
        device.stop()
