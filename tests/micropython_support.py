"""Running the MicroPython client (clients/micropython/sensorhub) from async tests.

The client is synchronous, as on a board: a test runs it in a worker thread while the hub
runs on the test's event loop (or as a process). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from sensorhub import HubClient

from device_sim.local_servers import LocalServer
from hub.registry.sqlite import Registry
from hub.service import HubService
from tests.support import points

STEP_MS = 20
T0_MS = 1_750_000_000_000
"""The time of the first reading the tests add (2025-06-15)."""


def drive(client: HubClient, until: Callable[[], bool], timeout_s: float) -> bool:
    """Poll the client until `until()` holds (True) or `timeout_s` passed (False)."""
    deadline = time.monotonic() + timeout_s
    while not until():
        if time.monotonic() >= deadline:
            return False
        client.poll(STEP_MS)
    return True


async def drive_async(client: HubClient, until: Callable[[], bool], timeout_s: float) -> None:
    """Poll the client in a worker thread, 50 ms at a time, until `until()` (checked on the
    event loop, so it may use the loop's objects) holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, f"not reached in {timeout_s} s: {client_state(client)}"
        await asyncio.to_thread(client.poll, 50)


def client_state(client: HubClient) -> str:
    """What the client did, for failure messages."""
    return (
        f"sent={client.sent} resent={client.resent} acked={client.acked} "
        f"rejected={client.rejected} held={client.buffer.held()} "
        f"dropped={client.buffer.dropped} connects={client.connects} "
        f"failed={client.failed_connects} closes={client.close_codes} "
        f"refusals={client.refusals} stopped={client.stopped} error={client.last_error}"
    )


def hub_url(service: HubService) -> str:
    """The ws:// URL of an in-process hub."""
    return service.url


def stream(client: HubClient, count: int, start_ms: int = T0_MS, name: str = "env") -> list[int]:
    """Add `count` readings with times start_ms, start_ms+1, ...; their times."""
    times = [start_ms + i for i in range(count)]
    for index, stamp in enumerate(times):
        client.add(name, {"t": 20.0 + index / 100, "n": index}, {"room": "hall"}, time_ms=stamp)
    return times


def stored_times(influxdb: LocalServer, db: str, name: str = "env") -> list[int]:
    """The millisecond times of every point of `name`."""
    return sorted(row["time"] // 1_000_000 for row in points(influxdb, db, name))


def was_refused(client: HubClient) -> bool:
    """The client's handshake was refused at least once."""
    return bool(client.refusals)


def pongs(client: HubClient) -> int:
    """Pings the client's current connection answered."""
    return client.ws.pongs if client.ws is not None else 0


def registry(service: HubService) -> Registry:
    """A second connection to the hub's registry, as an operator command would open."""
    return Registry(service.settings.registry_path)
