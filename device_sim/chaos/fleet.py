"""The chaos run's devices: simulated devices that note when they connect and disconnect,
a takeover (a second connection with one device's token), and config pushes waited for.

Readings a takeover sends carry timestamps an hour before the run started: no simulated
device ever sends one that early (their timestamps follow the clock), so a takeover's
readings can never be mistaken for, or hide, one of the device's own.
"""

from __future__ import annotations

import asyncio
import functools
import random
import sys
import time
from dataclasses import dataclass, field

from device_sim.device import Credentials, DeviceOptions, DeviceReport, SimulatedDevice, _Connection
from device_sim.sensors import SensorProfile
from device_sim.stats import FleetStats
from schemas.codes import QUERY_PRECISIONS
from sensorhub_client.connection import DeviceClient

TAKEOVER_READINGS = 5
TAKEOVER_OFFSET_S = 3600
"""A takeover's readings are stamped this long before the run started."""
PUSH_WAIT_S = 60.0
"""How long a push waits for every running device to apply it."""


class ChaosDevice(SimulatedDevice):
    """A simulated device that keeps the loop time of every connect and disconnect."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.opened_at: list[float] = []
        self.closed_at: list[float] = []

    async def _connect(self) -> _Connection:
        connection = await super()._connect()
        self.opened_at.append(self._loop.time())
        return connection

    def _closed(self, connection: _Connection) -> None:
        self.closed_at.append(self._loop.time())
        super()._closed(connection)

    @property
    def connected(self) -> bool:
        """Whether the device holds an open connection now."""
        return len(self.opened_at) > len(self.closed_at)

    def broke_after(self, since: float, window_s: float) -> bool:
        """Whether a connection of this device closed within `window_s` after `since`."""
        return any(since <= at <= since + window_s for at in self.closed_at)

    def reconnected_after(self, since: float, window_s: float) -> float | None:
        """The seconds from `since` to the connect that followed the first close within
        `window_s` after it; None while it has not reconnected (or never broke)."""
        closes = [at for at in self.closed_at if since <= at <= since + window_s]
        opens = [at for at in self.opened_at if closes and at > closes[0]]
        return opens[0] - since if opens else None

    def applied(self, version: int) -> bool:
        """Whether the device applied config `version` or a later one."""
        return max(self.configs_applied, default=0) >= version


@dataclass
class ChaosFleet:
    """The devices of a run, all through one URL (the balancer)."""

    url: str
    credentials: list[Credentials]
    options: DeviceOptions
    started_wall_s: float = field(default_factory=time.time)
    stats: FleetStats = field(default_factory=FleetStats)
    extra_acked_ns: dict[str, list[int]] = field(default_factory=dict)
    """Readings acked on takeover connections, per device (ns)."""
    crashed: dict[str, str] = field(default_factory=dict)
    """Devices whose run raised: device id -> the exception."""

    def __post_init__(self) -> None:
        self.devices = [
            ChaosDevice(self.url, c, self.options, self.stats) for c in self.credentials
        ]
        self._runs: list[asyncio.Task[DeviceReport]] = []
        self._takeovers = 0

    def start(self, deadline: float) -> None:
        """Start every device, to stream until loop time `deadline` or `stop()`."""
        self._runs = [asyncio.create_task(d.run(deadline)) for d in self.devices]
        for device, run in zip(self.devices, self._runs, strict=True):
            run.add_done_callback(functools.partial(self._ended, device))

    def _ended(self, device: ChaosDevice, run: asyncio.Task[DeviceReport]) -> None:
        # A device whose run raised is a finding (the simulator or the hub did something
        # no device should see): kept, with what it had acked, for the report.
        if not run.cancelled() and run.exception() is not None:
            error = run.exception()
            self.crashed[device.credentials.device_id] = f"{type(error).__name__}: {error}"

    async def stop(self) -> list[DeviceReport]:
        """Tell every device to stop; wait for each (they finish their bounded final wait).
        Every device's report, also of one whose run raised (see `crashed`)."""
        for device in self.devices:
            device.stop()
        try:
            await asyncio.gather(*self._runs, return_exceptions=True)
        finally:
            for run in self._runs:
                run.cancel()
        return [device.report() for device in self.devices]

    @property
    def running(self) -> list[ChaosDevice]:
        """The devices whose run has not ended."""
        return [d for d, run in zip(self.devices, self._runs, strict=True) if not run.done()]

    def reconnect_times(self, since: float, window_s: float) -> list[float | None]:
        """For every device whose connection broke within `window_s` after loop time
        `since`: the seconds until it connected again (None: not yet)."""
        return [
            d.reconnected_after(since, window_s)
            for d in self.devices
            if d.broke_after(since, window_s)
        ]

    async def takeover(self, index: int) -> dict[str, object]:
        """Connect a second time as device `index`, store a few readings, close; whether the
        device's own connection was closed with 4000 is for the caller to check."""
        device = self.devices[index]
        precision = self.options.precision
        unit = QUERY_PRECISIONS[precision]
        self._takeovers += 1
        first = (int(self.started_wall_s) - TAKEOVER_OFFSET_S) * 10**9 // unit
        base = first + self._takeovers * TAKEOVER_READINGS
        profile = SensorProfile(random.Random(base), "takeover", 0.0)
        readings = [profile.reading(base + k) for k in range(TAKEOVER_READINGS)]
        client = DeviceClient(self.url, device.credentials.token, precision=precision)
        await client.connect(open_timeout=self.options.open_timeout_s)
        try:
            acked = await client.send_readings(readings)
            ack = await asyncio.wait_for(acked, self.options.open_timeout_s)
        finally:
            await client.close()
        stored = self.extra_acked_ns.setdefault(device.credentials.device_id, [])
        stored.extend((base + k) * unit for k in range(ack.accepted))
        return {"device": device.credentials.device_id, "acked": ack.accepted}

    async def push(self, registry_url: str, interval_s: float) -> dict[str, object]:
        """`hub config set --all interval_s=...`; wait (bounded) until every running device
        applied its new version. What happened, JSON-friendly; `applied_in_s` counts from
        the command's start (a loaded box takes seconds to start Python)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hub", "config", "set", "--all", f"interval_s={interval_s:g}",
            "--registry-url", registry_url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"hub config set exited {process.returncode}: {err.decode()}")
        versions = parse_versions(out.decode())
        command_s = loop.time() - started
        by_id = {d.credentials.device_id: d for d in self.devices}
        while True:
            waiting = [
                d for d in self.running
                if not d.applied(versions.get(d.credentials.device_id, 0))
            ]  # fmt: skip
            if not waiting or loop.time() - started > PUSH_WAIT_S:
                break
            await asyncio.sleep(0.05)
        return {
            "interval_s": interval_s,
            "devices": len(versions),
            "unknown": sorted(set(versions) - set(by_id)),
            "all_applied": not waiting,
            "not_applied": sorted(d.credentials.device_id for d in waiting),
            "command_s": round(command_s, 3),
            "applied_in_s": round(loop.time() - started, 3),
        }


def parse_versions(output: str) -> dict[str, int]:
    """`DEVICE<TAB>version N` lines of `hub config set` as {device: N}."""
    versions = {}
    for line in output.splitlines():
        device, _, version = line.partition("\tversion ")
        if version.strip().isdigit():
            versions[device] = int(version)
    return versions
