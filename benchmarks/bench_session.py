"""The device session's own cost per message: `DeviceSession` reading, submitting, acking.

    python benchmarks/bench_session.py [--batch 1] [--messages 20000] [--rounds 5]
    python benchmarks/bench_session.py --idle 2000

Runs one `hub.gateway.session.DeviceSession` over an in-memory connection that hands it
`--messages` readings messages of `--batch` readings (the simulator's, as in bench_core.py)
and takes its acks; the ingest port completes each submit on the next loop turn, as a
pipeline with room does. Prints the best process-CPU microseconds per message and per
reading over `--rounds` rounds: the whole session path (decode, rate checks, validate,
format, submit, durability, ordered ack) without sockets or InfluxDB. With `--batch 1` the
session's own share (state machine, futures, ack sender) is largest. `--idle N` instead
prints the Python objects one idle session holds (tracemalloc over N of them; the
connection itself and websockets' objects are not included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import tomllib
import tracemalloc
from collections.abc import AsyncIterator, Sequence
from typing import cast

import msgpack
from websockets.asyncio.server import ServerConnection

from device_sim.sensors import SCHEMA_TOML
from hub.core.dialects import Dialect
from hub.core.fieldtypes import FieldTypes
from hub.core.handshake import Handshake
from hub.core.measurements import MeasurementSchemas, ReadingsValidator, SchemaFile
from hub.core.session import SessionLimits
from hub.gateway.session import DeviceSession
from hub.gateway.session_ports import SessionPorts
from hub.ops.metrics import HubMetrics
from hub.options import session_limits
from hub.registry.records import ConfigState
from hub.settings import Settings

UNLIMITED_RATES = {
    "device_messages_per_s": 1e12,
    "device_readings_per_s": 1e12,
    "device_bytes_per_s": 1e12,
}
"""The device rate limits out of the way: one session here sends far faster than a device."""


def messages(batch: int, count: int) -> list[bytes]:
    """`count` readings messages of `batch` readings each, seq 0, 1, ... (bench_core.py's)."""
    base = 1_700_000_000_000
    readings = [
        {
            "name": "environment",
            "time": base + n,
            "tags": {"room": "kitchen"},
            "fields": {"temperature": 21.5, "humidity": 48.25, "pressure": 1013.2, "battery": 3.9},
        }
        for n in range(batch)
    ]
    return [
        msgpack.packb({"type": "readings", "seq": seq, "readings": readings})
        for seq in range(count)
    ]


class MemoryConnection:
    """Hands out frames, a loop turn each (as a socket read), counts what is sent, and
    closes (as a device would) once every message is acked.

    Acks ready together are written at once through `send_context()`, `protocol` and
    `transport`, as on a websockets connection; here nothing is framed on either path.
    """

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.sent = 0
        self.writes = 0
        self.all_acked = asyncio.Event()
        self.protocol = self
        self.transport = self
        self._queued: list[bytes] = []

    @contextlib.asynccontextmanager
    async def send_context(self) -> AsyncIterator[None]:
        """Always open."""
        yield

    def send_binary(self, message: bytes) -> None:
        """Queue a message (the protocol's part)."""
        self._queued.append(message)

    def data_to_send(self) -> list[bytes]:
        """The queued messages."""
        queued, self._queued = self._queued, []
        return queued

    def writelines(self, messages: list[bytes]) -> None:
        """Count the messages of one write (the transport's part)."""
        self.writes += 1
        self._count(len(messages))

    def _count(self, messages: int) -> None:
        self.sent += messages
        if self.sent == len(self.frames):
            self.all_acked.set()

    async def _frames(self) -> AsyncIterator[bytes]:
        for frame in self.frames:
            await asyncio.sleep(0)
            yield frame
        await self.all_acked.wait()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._frames()

    async def send(self, message: bytes) -> None:
        """Count an ack sent."""
        self.writes += 1
        self._count(1)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Nothing to close."""

    async def recv(self) -> bytes:
        """Nothing more comes."""
        await asyncio.Future()
        return b""


class ImmediateIngest:
    """An ingest port with room for everything; each submit is durable a loop turn later."""

    dialect = Dialect.INFLUXDB_1
    field_types: FieldTypes | None = FieldTypes()

    def has_room(self, count: int) -> bool:
        """Always room."""
        return True

    def submit_nowait(
        self, lines: str, count: int, dialect: Dialect | None = None
    ) -> asyncio.Future[None]:
        """Durable on the next loop turn."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(done.set_result, None)
        return done

    async def submit(
        self, lines: str, count: int, dialect: Dialect | None = None
    ) -> asyncio.Future[None]:
        """Never waits: there is always room."""
        return self.submit_nowait(lines, count, dialect)


class BenchHub:
    """The config store, presence sink, validator source and drain signal, all idle."""

    draining = False

    def __init__(self, validator: ReadingsValidator) -> None:
        self._validator = validator

    async def config_state(self, device_id: str) -> ConfigState:
        """No config to push."""
        return ConfigState(device_id, {}, 0, None, None, None, None)

    async def config_states(self, device_ids: Sequence[str]) -> list[ConfigState]:
        """No config to push, for any of them."""
        return [await self.config_state(device_id) for device_id in device_ids]

    async def record_config_ack(
        self, device_id: str, version: int, ok: bool, error: str | None
    ) -> bool:
        """Never called here."""
        return False

    def stored(self, device_id: str, readings: int) -> None:
        """Presence is not measured here."""

    def validator(self, ns_per_unit: int) -> ReadingsValidator:
        """The simulator's schema."""
        return self._validator


def idle_ports(validator: ReadingsValidator) -> SessionPorts:
    """Ports that take everything at once (shared by every session, as the hub's are)."""
    hub = BenchHub(validator)
    return SessionPorts(ImmediateIngest(), hub, hub, hub, HubMetrics(), hub)


def new_session(connection: object, ports: SessionPorts, limits: SessionLimits) -> DeviceSession:
    """A session over `connection`."""
    return DeviceSession(
        cast(ServerConnection, connection), Handshake("bench-1", 10**6), ports, limits
    )


BENCH_LIMITS = session_limits(Settings().model_copy(update=UNLIMITED_RATES))


async def idle_bytes(sessions: int, validator: ReadingsValidator) -> float:
    """Bytes of Python objects per session of `sessions` idle ones (made, nothing read)."""
    connections = [MemoryConnection([]) for _ in range(sessions)]
    tracemalloc.start()
    ports = idle_ports(validator)
    before = tracemalloc.take_snapshot()
    made = [new_session(connection, ports, BENCH_LIMITS) for connection in connections]
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    del made
    return grown / sessions


async def one_round(frames: list[bytes], validator: ReadingsValidator) -> tuple[float, int]:
    """Process-CPU seconds for one session over `frames`, every ack sent; and the writes."""
    connection = MemoryConnection(frames)
    session = new_session(connection, idle_ports(validator), BENCH_LIMITS)
    started = time.process_time()
    await session.run()
    elapsed = time.process_time() - started
    assert connection.sent == len(frames), (connection.sent, len(frames))
    return elapsed, connection.writes


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle", type=int, default=0, help="measure N idle sessions' memory")
    args = parser.parse_args()
    source = SchemaFile.model_validate(tomllib.loads(SCHEMA_TOML))
    validator = MeasurementSchemas(source).validator(10**6)
    if args.idle:
        per_session = asyncio.run(idle_bytes(args.idle, validator))
        print(f"{args.idle} idle sessions: {per_session:.0f} bytes of Python objects each")
        return
    frames = messages(args.batch, args.messages)
    best, writes = min(asyncio.run(one_round(frames, validator)) for _ in range(args.rounds))
    per_message = best / args.messages * 1e6
    print(
        f"{args.batch} reading(s) a message, {args.messages} messages, best of {args.rounds}: "
        f"{per_message:.2f} us/message, {per_message / args.batch:.2f} us/reading (process CPU), "
        f"acks in {writes} writes"
    )


if __name__ == "__main__":
    main()
