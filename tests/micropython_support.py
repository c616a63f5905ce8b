"""Running the MicroPython client (clients/micropython/sensorhub) from async tests.

The client is synchronous, as on a board: a test runs it in a worker thread while the hub
runs on the test's event loop (or as a process). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from sensorhub import HubClient

STEP_MS = 20


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
