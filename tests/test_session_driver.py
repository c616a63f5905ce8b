"""The asyncio driver of a device session (`hub.gateway.session`), over an in-memory
connection: no socket, no server. The order of events (frames, durability) is driven here.

What the driver must do with the machine's decisions: send acks in the order messages were
read whatever order their readings became durable in, send the acks owed before a 1007 or
1001 close, send `error` before the close codes that carry one, and not wait for acks
before 1013. The same behaviour over real sockets is in test_streaming.py, test_bad_input.py
and test_limits.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import pytest
from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame
from websockets.protocol import Protocol, Side

from hub.core.dialects import Dialect
from hub.core.fieldtypes import FieldTypes
from hub.core.handshake import Handshake
from hub.core.measurements import MeasurementSchemas, ReadingsValidator
from hub.gateway.session import DeviceSession
from hub.gateway.session_ports import SessionPorts
from hub.ops.metrics import HubMetrics
from hub.options import reading_limits, session_limits
from hub.registry.records import ConfigState
from hub.settings import Settings

pytestmark = pytest.mark.unit

WAIT_S = 10.0


class MemoryConnection:
    """Frames the test puts in; messages and the close the session sends, as dicts.

    Besides `send`, it has what the session uses to write several messages at once, as a
    websockets connection has: `send_context()`, a real sans-I/O `protocol` that frames
    them, and a `transport` whose `writelines` reads the frames back. `writes` counts the
    socket writes: one per `send`, one per `writelines`.
    """

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[bytes | str | None] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None
        self.changed = asyncio.Event()
        self.writes = 0
        self.protocol = Protocol(Side.SERVER)
        self.transport = self
        self._device_side = Protocol(Side.CLIENT)

    @contextlib.asynccontextmanager
    async def send_context(self) -> AsyncIterator[None]:
        """The connection is open: let the caller use the protocol."""
        yield

    def writelines(self, chunks: Iterable[bytes]) -> None:
        """One socket write of frames: read back as the device would."""
        self.writes += 1
        self._device_side.receive_data(b"".join(chunks))
        for event in self._device_side.events_received():
            assert isinstance(event, Frame)
            self.sent.append(msgpack.unpackb(event.data))
        self.changed.set()

    async def _frames(self) -> AsyncIterator[bytes | str]:
        while (frame := await self.incoming.get()) is not None and self.closed is None:
            yield frame

    def __aiter__(self) -> AsyncIterator[bytes | str]:
        return self._frames()

    async def send(self, message: bytes) -> None:
        """Record a message sent to the device."""
        self.writes += 1
        self.sent.append(msgpack.unpackb(message))
        self.changed.set()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Record the close."""
        self.closed = (code, reason)
        self.incoming.put_nowait(None)
        self.changed.set()

    async def recv(self) -> bytes:
        """Frames after the close are read and thrown away; none come here."""
        await asyncio.Future()
        return b""

    def kinds(self) -> list[str]:
        """What was sent, in order: `ack <seq>`, `error <code>`, then `close <code>`."""
        out = [
            f"ack {m['seq']}" if m["type"] == "ack" else f"{m['type']} {m.get('code', '')}"
            for m in self.sent
        ]
        return out + ([f"close {self.closed[0]}"] if self.closed else [])

    async def until(self, count: int) -> None:
        """Wait (bounded) until `count` things were sent, the close included."""
        async with asyncio.timeout(WAIT_S):
            while len(self.kinds()) < count:
                self.changed.clear()
                await self.changed.wait()


class GatedIngest:
    """An ingest port whose submits become durable when the test says so."""

    dialect = Dialect.INFLUXDB_1
    field_types: FieldTypes | None = None

    def __init__(self) -> None:
        self.submitted: list[asyncio.Future[None]] = []

    def has_room(self, count: int) -> bool:
        """Always room."""
        return True

    def submit_nowait(
        self, lines: str, count: int, dialect: Dialect | None = None
    ) -> asyncio.Future[None]:
        """Durable when the test completes the future."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.submitted.append(done)
        return done

    async def submit(
        self, lines: str, count: int, dialect: Dialect | None = None
    ) -> asyncio.Future[None]:
        """Never waits."""
        return self.submit_nowait(lines, count, dialect)


class Hub:
    """Config store, presence sink, validator source and drain signal."""

    def __init__(self) -> None:
        self.draining = False
        self.stored_readings = 0
        self._validator = MeasurementSchemas().validator(10**6, reading_limits(Settings()))

    async def config_state(self, device_id: str) -> ConfigState:
        """No config to push."""
        return ConfigState(device_id, {}, 0, None, None, None, None)

    async def config_states(self, device_ids: Sequence[str]) -> list[ConfigState]:
        """No config to push, for any of them."""
        return [await self.config_state(device_id) for device_id in device_ids]

    async def record_config_ack(
        self, device_id: str, version: int, ok: bool, error: str | None
    ) -> bool:
        """Not used here."""
        return False

    def stored(self, device_id: str, readings: int) -> None:
        """Count stored readings."""
        self.stored_readings += readings

    def validator(self, ns_per_unit: int) -> ReadingsValidator:
        """The general rules, no schema."""
        return self._validator


def readings(seq: int) -> bytes:
    """A readings message with one valid reading."""
    reading = {"name": "m", "time": 1_700_000_000_000, "fields": {"v": 1.0}}
    packed: bytes = msgpack.packb({"type": "readings", "seq": seq, "readings": [reading]})
    return packed


@dataclass
class Running:
    """A session running over a memory connection."""

    session: DeviceSession
    connection: MemoryConnection
    ingest: GatedIngest
    hub: Hub
    task: asyncio.Task[None]

    async def feed(self, *frames: bytes | str, submitted: int | None = None) -> None:
        """Put frames in; wait (bounded) until `submitted` submits were made."""
        for frame in frames:
            self.connection.incoming.put_nowait(frame)
        async with asyncio.timeout(WAIT_S):
            while submitted is not None and len(self.ingest.submitted) < submitted:
                await asyncio.sleep(0)


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    """A session with generous rate limits, stopped (by its task) at the end."""
    settings = Settings(device_messages_per_s=1000, device_readings_per_s=1000)
    hub, ingest, connection = Hub(), GatedIngest(), MemoryConnection()
    ports = SessionPorts(ingest, hub, hub, hub, HubMetrics(), hub)
    session = DeviceSession(
        cast(ServerConnection, connection),
        Handshake("dev-1", 10**6),
        ports,
        session_limits(settings),
    )
    task = asyncio.create_task(session.run())
    yield Running(session, connection, ingest, hub, task)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0), (2, 0, 1)])
async def test_acks_are_sent_in_read_order_as_durability_arrives(
    running: Running, order: tuple[int, int, int]
) -> None:
    """Out-of-order durability, in-order acks, each sent once its turn is durable."""
    await running.feed(readings(0), readings(1), readings(2), submitted=3)
    for n in order:
        running.ingest.submitted[n].set_result(None)
    await running.connection.until(3)
    assert running.connection.kinds() == ["ack 0", "ack 1", "ack 2"]
    assert running.hub.stored_readings == 3


async def test_acks_ready_together_go_out_in_one_write(running: Running) -> None:
    """Messages that became durable together are acked with one socket write, in order;
    one that becomes durable later gets a write of its own."""
    await running.feed(readings(0), readings(1), readings(2), readings(3), submitted=4)
    for n in (2, 0, 1):
        running.ingest.submitted[n].set_result(None)
    await running.connection.until(3)
    assert running.connection.kinds() == ["ack 0", "ack 1", "ack 2"]
    assert running.connection.writes == 1
    running.ingest.submitted[3].set_result(None)
    await running.connection.until(4)
    assert running.connection.kinds() == ["ack 0", "ack 1", "ack 2", "ack 3"]
    assert running.connection.writes == 2
    assert running.hub.stored_readings == 4


@pytest.mark.parametrize(
    ("bad", "expected_close"),
    [
        (msgpack.packb({"type": "nonsense"}), ["error invalid_message", "close 1007"]),
        ("text", ["close 1003"]),
    ],
)
async def test_acks_owed_go_before_the_error_and_the_close(
    running: Running, bad: bytes | str, expected_close: list[str]
) -> None:
    """The messages read before a bad frame are acked first (when durable), then `error`
    where one is due, then the close."""
    await running.feed(readings(0), readings(1), submitted=2)
    await running.feed(bad)
    running.ingest.submitted[1].set_result(None)
    await asyncio.sleep(0)
    assert running.connection.kinds() == []  # message 0 is not durable yet
    running.ingest.submitted[0].set_result(None)
    await running.connection.until(2 + len(expected_close))
    assert running.connection.kinds() == ["ack 0", "ack 1", *expected_close]


async def test_a_frame_read_while_draining_is_not_acked_and_the_close_is_1001(
    running: Running,
) -> None:
    """Draining: what was read is acked, the next frame is left for the device to resend."""
    await running.feed(readings(0), submitted=1)
    running.hub.draining = True
    await running.feed(readings(1))
    running.ingest.submitted[0].set_result(None)
    await running.connection.until(2)
    assert running.connection.kinds() == ["ack 0", "close 1001"]
    assert len(running.ingest.submitted) == 1


async def test_a_message_that_can_no_longer_be_stored_ends_the_acks_and_then_1013(
    running: Running,
) -> None:
    """A failed durability (the pipeline stopping) stops the acks; the next readings message
    gets 1013 at once, not after waiting for acks that will never come."""
    await running.feed(readings(0), readings(1), submitted=2)
    running.ingest.submitted[0].set_result(None)
    running.ingest.submitted[1].set_exception(RuntimeError("pipeline closed"))
    await running.connection.until(1)
    await running.feed(readings(2), submitted=3)
    await running.connection.until(3)
    assert running.connection.kinds() == ["ack 0", "error overloaded", "close 1013"]
    await asyncio.wait_for(running.task, WAIT_S)
