"""A connection closed before the opening handshake was sent is a failed connect, retried.

Found by `device-sim chaos`: through HAProxy, a device reconnecting just after its hub was
SIGKILLed had its new connection closed by the balancer before websockets wrote the
request; `connect()` then raises `ConnectionClosedError`, which neither the simulator's
devices nor the public `StreamingClient` counted as a connect failure, so the device's run
ended with that exception and it never connected again. The order (TCP accepted, closed
before the request is written) is a race no real server produces on cue, so `connect` is
replaced here: it raises that error, then refuses like a dead port, and the device must keep
trying until it is stopped.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosedError

from device_sim.device import Credentials, DeviceOptions, DeviceState, SimulatedDevice
from sensorhub_client.connection import DeviceClient
from sensorhub_client.streaming import StreamingClient

pytestmark = pytest.mark.unit


class Refusals:
    """Stands in for `DeviceClient.connect`: closed mid-handshake first, then refused."""

    def __init__(self) -> None:
        self.calls = 0
        self.enough = asyncio.Event()

    async def connect(self, **options: Any) -> None:
        self.calls += 1
        if self.calls >= 3:
            self.enough.set()
        if self.calls == 1:
            raise ConnectionClosedError(None, None)
        raise ConnectionRefusedError("connection refused")


async def test_a_simulated_device_retries_after_a_close_during_the_handshake(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The device counts it as a failed connect and tries again; its run ends normally."""
    refusals = Refusals()
    monkeypatch.setattr(DeviceClient, "connect", refusals.connect)
    options = DeviceOptions(backoff_base_s=0.01, backoff_cap_s=0.02, start_spread_s=0)
    device = SimulatedDevice("ws://127.0.0.1:9", Credentials("d-1", "t"), options)
    loop = asyncio.get_running_loop()
    run = asyncio.create_task(device.run(loop.time() + 60))
    await asyncio.wait_for(refusals.enough.wait(), 10)
    device.stop()
    report = await asyncio.wait_for(run, 30)
    assert report.state is DeviceState.DONE
    assert report.connect_errors["ConnectionClosedError"] == 1
    assert report.connect_errors["ConnectionRefusedError"] >= 2


async def test_the_streaming_client_retries_after_a_close_during_the_handshake(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The public client keeps reconnecting; `run()` returns None once stopped."""
    refusals = Refusals()
    monkeypatch.setattr(DeviceClient, "connect", refusals.connect)
    client = StreamingClient("ws://127.0.0.1:9", "t", backoff_base_s=0.01, backoff_cap_s=0.02)
    run = asyncio.create_task(client.run())
    await asyncio.wait_for(refusals.enough.wait(), 10)
    client.stop()
    assert await asyncio.wait_for(run, 30) is None
    assert client.stopped is None
    assert client.stats.failed_connects >= 3


class ClosedConnection:
    """A connection whose every send finds it closed."""

    async def send(self, frame: bytes) -> None:
        raise ConnectionClosedError(None, None)


async def test_a_frame_that_could_not_be_sent_leaves_no_ack_waiting() -> None:
    """`send_raw` on a closed connection raises, and its ack future is not left for the
    reader to fail later (which logged "Future exception was never retrieved" in the
    chaos run, once for every message in flight at a hub kill)."""
    client = DeviceClient("ws://127.0.0.1:9", "t")
    client._connection = ClosedConnection()  # type: ignore[assignment]
    with pytest.raises(ConnectionClosedError):
        await client.send_raw(b"frame", seq=1)
    assert not client._awaiting
