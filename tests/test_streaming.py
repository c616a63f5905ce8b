"""End to end: devices stream readings through a running hub into a real InfluxDB 1.6.7.

Covers acks (order, pipelining, durability), how readings become points (measurement, tags,
field types, timestamps), per-reading rejections, the Telegraf form, one connection per
device, keepalive, graceful stop, and acks only once readings are durable while InfluxDB is
slow or unreachable (written to InfluxDB, or synced to the hub's disk spool).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest
from websockets.asyncio.client import ClientConnection, connect

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer, influxql, quote_ident
from hub.service import HubService
from hub.settings import Settings
from schemas.messages import Ack
from tests.support import add_device, hub_settings, points, running_hub

pytestmark = pytest.mark.integration

WAIT_S = 10.0
DEVICE = "dev-1"
T0_MS = 1_700_000_000_000


def bearer(token: str) -> dict[str, str]:
    """The Authorization header carrying `token`."""
    return {"Authorization": f"Bearer {token}"}


def unpack(frame: bytes | str) -> dict[str, Any]:
    """One hub message."""
    assert isinstance(frame, bytes), f"the hub sent a text frame: {frame!r}"
    message: dict[str, Any] = msgpack.unpackb(frame, raw=False)
    return message


def field_types(influx: LocalServer, db: str, measurement: str) -> dict[str, str]:
    """InfluxDB's type of every field of a measurement."""
    rows = influxql(influx.url, db, f"SHOW FIELD KEYS FROM {quote_ident(measurement)}")
    return {row["fieldKey"]: row["fieldType"] for row in rows}


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Wait (bounded) until `check()` holds."""
    try:
        async with asyncio.timeout(WAIT_S):
            while not check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out waiting until {what}")


T = TypeVar("T")


async def bounded(awaitable: Awaitable[T]) -> T:
    """Await with the test's standard bound, so a hang fails instead of blocking."""
    return await asyncio.wait_for(awaitable, WAIT_S)


@pytest.fixture
def settings(tmp_path: Path, influxdb: LocalServer, influx_db_name: str) -> Settings:
    """Hub settings writing to a fresh database, with no clock limits on `time`: the
    timestamp tests send times from before 1970 to after 2106 (see tests/test_time_range.py)."""
    return hub_settings(
        tmp_path,
        influxdb.url,
        influx_bucket=influx_db_name,
        influx_api="v1",
        min_time="",
        max_future_s=1e10,
    )


@pytest.fixture
def token(settings: Settings) -> str:
    """The token of the registered device `dev-1`."""
    return add_device(settings, DEVICE)


@pytest.fixture
async def service(settings: Settings, token: str) -> AsyncIterator[HubService]:
    """A running hub with `dev-1` registered."""
    async with running_hub(settings) as service:
        yield service


@pytest.fixture
async def device(service: HubService, token: str) -> AsyncIterator[DeviceClient]:
    """`dev-1` connected to the hub."""
    async with DeviceClient(service.url, token) as device:
        yield device


@pytest.fixture
async def raw(service: HubService, token: str) -> AsyncIterator[ClientConnection]:
    """`dev-1` connected with a bare WebSocket connection, to see every frame."""
    async with connect(f"{service.url}/v1/ws", additional_headers=bearer(token)) as connection:
        yield connection


# --- Acks ----------------------------------------------------------------------------------


async def test_pipelined_acks_come_in_the_order_messages_were_sent(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Many messages sent before any ack is read are acked in send order, not seq order."""
    # Small batches written four at a time, so later messages can be durable first.
    settings = hub_settings(
        tmp_path,
        influxdb.url,
        influx_bucket=influx_db_name,
        influx_api="v1",
        batch_size=3,
        max_inflight_writes=4,
    )
    token = add_device(settings, DEVICE)
    seqs = [9, 3, 2**64 - 1, 0, 3, 17, 1, 40, 39, 38, 1000, 2, 5, 4, 6, 8, 7, 12, 11, 10]
    async with (
        running_hub(settings) as service,
        connect(f"{service.url}/v1/ws", additional_headers=bearer(token)) as connection,
    ):
        for n, seq in enumerate(seqs):
            readings = [
                {"name": "order", "time": T0_MS + 100 * n + k, "fields": {"v": float(k)}}
                for k in range(1 + n % 5)
            ]
            await connection.send(
                msgpack.packb({"type": "readings", "seq": seq, "readings": readings})
            )
        acks = [unpack(await bounded(connection.recv())) for _ in seqs]
    assert [ack["type"] for ack in acks] == ["ack"] * len(seqs)
    assert [ack["seq"] for ack in acks] == seqs
    assert [ack["accepted"] for ack in acks] == [1 + n % 5 for n in range(len(seqs))]


async def test_readings_are_in_influxdb_when_their_ack_arrives(
    device: DeviceClient, influxdb: LocalServer, influx_db_name: str
) -> None:
    """At the moment each pipelined message's ack is read, its readings can be queried."""
    acked: list[asyncio.Future[Ack]] = []
    for n in range(15):
        readings = [
            {"name": "durable", "time": T0_MS + 10 * n + k, "tags": {"msg": str(n)},
             "fields": {"v": 1.0}}
            for k in range(3)
        ]  # fmt: skip
        acked.append(await device.send_readings(readings))
    for n, future in enumerate(acked):
        ack = await bounded(future)
        assert ack.accepted == 3
        rows = influxql(influxdb.url, influx_db_name, f"SELECT * FROM durable WHERE msg = '{n}'")
        assert len(rows) == 3, f"message {n} acked but {len(rows)} of 3 readings stored"


# --- Points --------------------------------------------------------------------------------


async def test_device_tag_is_the_authenticated_device(
    device: DeviceClient, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Every point gets tag device=<authenticated id>, replacing a `device` tag sent."""
    ack = await bounded(
        device.store(
            [
                {"name": "env", "time": T0_MS, "tags": {"device": "someone-else", "room": "k"},
                 "fields": {"t": 21.5}},
                {"name": "env", "time": T0_MS + 1, "fields": {"t": 22.5}},
            ]
        )
    )  # fmt: skip
    assert ack.accepted == 2
    rows = points(influxdb, influx_db_name, "env")
    assert [(row["device"], row["room"], row["t"]) for row in rows] == [
        (DEVICE, "k", 21.5),
        (DEVICE, None, 22.5),
    ]
    values = influxql(influxdb.url, influx_db_name, 'SHOW TAG VALUES FROM env WITH KEY = "device"')
    assert [row["value"] for row in values] == [DEVICE]


async def test_plain_numbers_are_stored_as_floats(
    device: DeviceClient, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Without a schema, 21 is written as a float, so a later 21.5 in that field is accepted."""
    first = await bounded(device.store([{"name": "num", "time": T0_MS, "fields": {"n": 21}}]))
    second = await bounded(
        device.store([{"name": "num", "time": T0_MS + 1, "fields": {"n": 21.5}}])
    )
    assert (first.accepted, first.rejected, second.accepted, second.rejected) == (1, [], 1, [])
    assert field_types(influxdb, influx_db_name, "num") == {"n": "float"}
    assert [row["n"] for row in points(influxdb, influx_db_name, "num")] == [21, 21.5]


async def test_schema_int_field_is_stored_as_integer(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A field the measurement schema declares `int` is written as an InfluxDB integer."""
    schema = tmp_path / "schemas.toml"
    schema.write_text(
        '[measurements.counter.fields]\ncount = { type = "int" }\nratio = { type = "float" }\n'
    )
    settings = hub_settings(
        tmp_path / "state",
        influxdb.url,
        influx_bucket=influx_db_name,
        influx_api="v1",
        schemas=schema,
    )
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service, DeviceClient(service.url, token) as device:
        reading = {"name": "counter", "time": T0_MS, "fields": {"count": 21, "ratio": 2}}
        ack = await bounded(device.store([reading]))
    assert (ack.accepted, ack.rejected) == (1, [])
    assert field_types(influxdb, influx_db_name, "counter") == {
        "count": "integer",
        "ratio": "float",
    }
    assert [
        (row["count"], row["ratio"]) for row in points(influxdb, influx_db_name, "counter")
    ] == [(21, 2)]


async def test_bool_and_string_fields_keep_their_types(
    device: DeviceClient, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Bool fields are written as booleans and string fields as strings, values exact."""
    fields = {"door_open": True, "closed": False, "state": "ok", "empty": ""}
    ack = await bounded(device.store([{"name": "kinds", "time": T0_MS, "fields": fields}]))
    assert ack.accepted == 1
    assert field_types(influxdb, influx_db_name, "kinds") == {
        "door_open": "boolean",
        "closed": "boolean",
        "state": "string",
        "empty": "string",
    }
    [row] = points(influxdb, influx_db_name, "kinds")
    assert {key: row[key] for key in fields} == fields


# --- Timestamps ----------------------------------------------------------------------------

PRECISION_TIMES = {
    "s": (1_700_000_000, 10**9),
    "ms": (1_700_000_000_123, 10**6),
    "us": (1_700_000_000_123_456, 10**3),
    "ns": (1_700_000_000_123_456_789, 1),
}


@pytest.mark.parametrize("precision", list(PRECISION_TIMES))
async def test_integer_time_is_read_in_the_connection_precision(
    service: HubService, token: str, influxdb: LocalServer, influx_db_name: str, precision: Any
) -> None:
    """An integer `time` is taken in the `precision` the connection asked for."""
    value, ns_per_unit = PRECISION_TIMES[precision]
    async with DeviceClient(service.url, token, precision=precision) as device:
        ack = await bounded(device.store([{"name": "prec", "time": value, "fields": {"v": 1.0}}]))
    assert ack.accepted == 1
    assert [row["time"] for row in points(influxdb, influx_db_name, "prec")] == [
        value * ns_per_unit
    ]


async def test_default_precision_is_milliseconds(
    device: DeviceClient, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Without a `precision` query parameter, integer times are milliseconds."""
    ack = await bounded(device.store([{"name": "prec", "time": T0_MS, "fields": {"v": 1.0}}]))
    assert ack.accepted == 1
    assert [row["time"] for row in points(influxdb, influx_db_name, "prec")] == [T0_MS * 10**6]


def ts32(seconds: int) -> bytes:
    """A msgpack timestamp 32 (fixext 4, type -1)."""
    return b"\xd6\xff" + struct.pack(">I", seconds)


def ts64(seconds: int, nanoseconds: int) -> bytes:
    """A msgpack timestamp 64 (fixext 8, type -1): 30-bit ns, 34-bit seconds."""
    return b"\xd7\xff" + struct.pack(">Q", nanoseconds << 34 | seconds)


def ts96(seconds: int, nanoseconds: int) -> bytes:
    """A msgpack timestamp 96 (ext 8, length 12, type -1): 32-bit ns, signed 64-bit seconds."""
    return b"\xc7\x0c\xff" + struct.pack(">Iq", nanoseconds, seconds)


TIMESTAMPS = {
    "32bit": (ts32(1_700_000_000), 1_700_000_000 * 10**9),
    "64bit": (ts64(1_700_000_000, 123_456_789), 1_700_000_000_123_456_789),
    "64bit_after_2106": (ts64(5_000_000_000, 987_654_321), 5_000_000_000_987_654_321),
    "96bit_before_1970": (ts96(-14_182_940, 123_456_789), -14_182_940 * 10**9 + 123_456_789),
    "96bit_after_2106": (ts96(7_258_118_400, 1), 7_258_118_400 * 10**9 + 1),
}


def packed(*objects: object) -> bytes:
    """The msgpack encodings of `objects`, concatenated."""
    return b"".join(bytes(msgpack.packb(obj)) for obj in objects)


def readings_frame_with_raw_time(seq: int, name: str, raw_time: bytes) -> bytes:
    """A readings message of one reading whose `time` is the given msgpack bytes, verbatim."""
    reading = b"\x83" + packed("name", name, "fields", {"v": 1.0}, "time") + raw_time
    envelope = packed("type", "readings", "seq", seq, "readings")
    return b"\x83" + envelope + b"\x91" + reading


@pytest.mark.parametrize("encoding", list(TIMESTAMPS))
async def test_msgpack_timestamp_is_stored_to_the_nanosecond(
    raw: ClientConnection, influxdb: LocalServer, influx_db_name: str, encoding: str
) -> None:
    """A `time` sent as a msgpack timestamp, in each of its three encodings, is kept exactly."""
    raw_time, expected_ns = TIMESTAMPS[encoding]
    await raw.send(readings_frame_with_raw_time(7, "stamped", raw_time))
    ack = unpack(await bounded(raw.recv()))
    assert (ack["type"], ack["seq"], ack["accepted"], ack["rejected"]) == ("ack", 7, 1, [])
    assert [row["time"] for row in points(influxdb, influx_db_name, "stamped")] == [expected_ns]


async def test_readings_without_time_are_stamped_at_arrival_and_kept_apart(
    device: DeviceClient, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Time-less readings of one series get the arrival time, distinct per reading: none lost."""
    before = time.time_ns()
    ack = await bounded(
        device.store([{"name": "untimed", "fields": {"v": float(n)}} for n in range(5)])
    )
    after = time.time_ns()
    assert ack.accepted == 5
    rows = points(influxdb, influx_db_name, "untimed")
    assert sorted(row["v"] for row in rows) == [0, 1, 2, 3, 4]
    stamps = [row["time"] for row in rows]
    assert len(set(stamps)) == 5
    assert all(before <= stamp <= after + 5 for stamp in stamps), (before, stamps, after)


# --- Rejected readings ---------------------------------------------------------------------

MIXED: list[dict[str, Any]] = [
    {"name": "mixed", "time": T0_MS, "fields": {"v": 1.0}},
    {"name": "mixed", "time": T0_MS + 1, "fields": {}},
    {"name": "mixed", "time": T0_MS + 2, "fields": {"v": 2.0}},
    {"name": "mixed", "time": T0_MS + 3, "fields": {"v": [1, 2]}},
    {"name": "", "time": T0_MS + 4, "fields": {"v": 3.0}},
    {"name": "mixed", "time": "yesterday", "fields": {"v": 4.0}},
    {"name": "mixed", "time": T0_MS + 6, "fields": {"v": 5.0}, "tags": {"room": 7}},
]


async def test_invalid_readings_are_rejected_by_index_and_the_rest_stored(
    device: DeviceClient, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A message with invalid readings stores the valid ones; the ack lists the others."""
    ack = await bounded(device.store(MIXED))
    assert ack.accepted == 2
    assert [rejection.index for rejection in ack.rejected] == [1, 3, 4, 5, 6]
    assert all(rejection.errors and all(rejection.errors) for rejection in ack.rejected)
    assert [row["v"] for row in points(influxdb, influx_db_name, "mixed")] == [1.0, 2.0]


async def test_connection_stays_usable_after_rejected_readings(
    device: DeviceClient, influxdb: LocalServer, influx_db_name: str
) -> None:
    """After an ack with rejections the same connection keeps storing and acking."""
    await bounded(device.store(MIXED))
    ack = await bounded(device.store([{"name": "after", "time": T0_MS, "fields": {"v": 9.0}}]))
    assert (ack.accepted, ack.rejected) == (1, [])
    assert [row["v"] for row in points(influxdb, influx_db_name, "after")] == [9.0]


# --- Telegraf form -------------------------------------------------------------------------


def telegraf_frame(*metrics: dict[str, Any]) -> bytes:
    """Concatenated Telegraf msgpack metrics, as outputs.websocket sends them."""
    return b"".join(msgpack.packb(metric) for metric in metrics)


def telegraf_metric(n: int, **override: Any) -> dict[str, Any]:
    """A Telegraf metric with a msgpack timestamp, like Telegraf's msgpack serializer."""
    metric: dict[str, Any] = {
        "name": "cpu",
        "time": msgpack.Timestamp(1_700_000_000 + n, 0),
        "tags": {"cpu": f"cpu{n}", "host": "pi"},
        "fields": {"usage_idle": 90.0 + n},
    }
    metric.update(override)
    return metric


def cpu_rows(influx: LocalServer, db: str) -> list[tuple[str, float]]:
    """The stored Telegraf points as (cpu tag, usage_idle)."""
    return [(row["cpu"], row["usage_idle"]) for row in points(influx, db, "cpu")]


async def test_telegraf_metrics_in_one_frame_are_stored(
    raw: ClientConnection, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Concatenated Telegraf metrics in one binary frame are stored with the device tag."""
    await raw.send(telegraf_frame(*(telegraf_metric(n) for n in range(3))))
    await eventually(lambda: len(points(influxdb, influx_db_name, "cpu")) == 3, "3 metrics stored")
    rows = points(influxdb, influx_db_name, "cpu")
    assert [(row["cpu"], row["device"], row["time"]) for row in rows] == [
        (f"cpu{n}", DEVICE, (1_700_000_000 + n) * 10**9) for n in range(3)
    ]


async def test_telegraf_frame_is_not_acked(raw: ClientConnection) -> None:
    """No ack follows a Telegraf frame: the next message received is the next readings' ack."""
    await raw.send(telegraf_frame(telegraf_metric(0), telegraf_metric(1)))
    reading = {"name": "after_telegraf", "time": T0_MS, "fields": {"v": 1.0}}
    await raw.send(msgpack.packb({"type": "readings", "seq": 41, "readings": [reading]}))
    first = unpack(await bounded(raw.recv()))
    assert (first["type"], first["seq"], first["accepted"]) == ("ack", 41, 1)


async def test_invalid_telegraf_metric_is_dropped_and_the_valid_ones_stored(
    raw: ClientConnection, influxdb: LocalServer, influx_db_name: str
) -> None:
    """In a Telegraf frame an invalid metric is not stored; the valid ones around it are."""
    frame = telegraf_frame(
        telegraf_metric(0),
        telegraf_metric(1, fields={"usage_idle": "n/a", "nested": {"x": 1}}),
        telegraf_metric(2),
    )
    await raw.send(frame)
    # The frame's valid metrics are written in one piece, so once they show up, so would
    # the invalid one have.
    await eventually(lambda: len(points(influxdb, influx_db_name, "cpu")) >= 2, "metrics stored")
    assert cpu_rows(influxdb, influx_db_name) == [("cpu0", 90.0), ("cpu2", 92.0)]


async def test_invalid_telegraf_metric_is_logged(
    raw: ClientConnection, caplog: pytest.LogCaptureFixture
) -> None:
    """An invalid Telegraf metric is logged as a warning by the hub."""
    caplog.set_level(logging.WARNING)
    await raw.send(telegraf_frame(telegraf_metric(0), telegraf_metric(1, fields={})))

    def logged() -> bool:
        return any(
            r.levelno >= logging.WARNING
            and r.name.startswith("hub")
            and "Telegraf" in r.getMessage()
            for r in caplog.records
        )

    await eventually(logged, "the invalid metric is logged")


# --- One connection per device -------------------------------------------------------------


async def test_newer_connection_replaces_older_with_4000(
    service: HubService, token: str, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A second connection with the same token closes the first with 4000 and takes over."""
    async with DeviceClient(service.url, token) as older, DeviceClient(service.url, token) as newer:
        code, _reason = await bounded(older.wait_closed())
        assert code == 4000
        ack = await bounded(
            newer.store([{"name": "takeover", "time": T0_MS, "fields": {"v": 1.0}}])
        )
        assert ack.accepted == 1
        assert service.hub.live_devices == {DEVICE}
    assert len(points(influxdb, influx_db_name, "takeover")) == 1


# --- Keepalive -----------------------------------------------------------------------------


async def raw_handshake(port: int, token: str) -> socket.socket:
    """A TCP socket that did the WebSocket opening handshake by hand, and nothing else."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    )
    async with asyncio.timeout(WAIT_S):
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request.encode())
        response = b""
        while not response.endswith(b"\r\n\r\n"):  # byte by byte: read no frame
            chunk = await loop.sock_recv(sock, 1)
            assert chunk, f"connection closed during the handshake: {response!r}"
            response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


PING, CLOSE = 0x9, 0x8


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split unmasked server frames into (opcode, payload); a cut-off last frame is dropped."""
    frames = []
    while len(data) >= 2:
        length, start = data[1] & 0x7F, 2
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, start = int.from_bytes(data[2:10], "big"), 10
        if len(data) < start + length:
            break
        frames.append((data[0] & 0x0F, data[start : start + length]))
        data = data[start + length :]
    return frames


async def wait_live(service: HubService, devices: set[str]) -> None:
    """Wait (bounded) until exactly `devices` have a session."""
    await eventually(lambda: service.hub.live_devices == devices, f"live devices are {devices}")


async def test_device_that_never_answers_pings_is_disconnected(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A client that completes the handshake and then never reads or pongs is dropped."""
    settings = hub_settings(
        tmp_path,
        influxdb.url,
        influx_bucket=influx_db_name,
        influx_api="v1",
        ping_interval_s=0.2,
        ping_timeout_s=0.2,
    )
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service:
        sock = await raw_handshake(service.hub.port, token)
        with sock:
            await wait_live(service, {DEVICE})
            await wait_live(service, set())
            # Only now read what the hub sent: its pings, its close, then the end of the stream.
            loop = asyncio.get_running_loop()
            received = b""
            async with asyncio.timeout(WAIT_S):
                with contextlib.suppress(ConnectionResetError):
                    while chunk := await loop.sock_recv(sock, 65536):
                        received += chunk
    opcodes = [opcode for opcode, _payload in server_frames(received)]
    assert opcodes[0] == PING, opcodes
    assert opcodes[-1] == CLOSE, opcodes


async def test_device_answering_pings_stays_connected(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A client that answers pings outlives several ping intervals and timeouts."""
    settings = hub_settings(
        tmp_path,
        influxdb.url,
        influx_bucket=influx_db_name,
        influx_api="v1",
        ping_interval_s=0.1,
        ping_timeout_s=0.1,
    )
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service, DeviceClient(service.url, token) as device:
        await asyncio.sleep(1.0)
        assert service.hub.live_devices == {DEVICE}
        ack = await bounded(device.store([{"name": "alive", "time": T0_MS, "fields": {"v": 1.0}}]))
        assert ack.accepted == 1


# --- Graceful stop -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[HubService]:
    """A hub the test stops itself; stopped on the way out if the test did not get there."""
    service = HubService(settings)
    await service.start()
    try:
        yield service
    finally:
        if not service.hub.draining:
            await service.stop()


async def test_stop_closes_device_connections_with_1001(settings: Settings, token: str) -> None:
    """`HubService.stop()` closes every device connection with 1001 (going away)."""
    async with started(settings) as service, DeviceClient(service.url, token) as device:
        await bounded(device.store([{"name": "bye", "time": T0_MS, "fields": {"v": 1.0}}]))
        await bounded(service.stop())
        code, _reason = await bounded(device.wait_closed())
    assert code == 1001


async def test_readings_acked_before_stop_are_all_in_influxdb(
    settings: Settings, token: str, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A device streaming while the hub stops: every reading acked before the close is stored."""
    # The device streams far above the default message rate; that limit is not tested here.
    settings = settings.model_copy(update={"device_messages_per_s": 100_000.0})
    async with started(settings) as service, DeviceClient(service.url, token) as device:
        acked: list[asyncio.Future[Ack]] = []

        async def stream() -> None:
            with contextlib.suppress(Exception):  # sending stops when the hub closes
                for n in range(100_000):
                    reading = {"name": "stream", "time": T0_MS + n, "fields": {"n": float(n)}}
                    acked.append(await device.send_readings([reading]))
                    await asyncio.sleep(0.001)

        streaming = asyncio.create_task(stream())
        await eventually(lambda: sum(f.done() for f in acked) >= 20, "20 acks")
        await bounded(service.stop())
        code, _reason = await bounded(device.wait_closed())
        await bounded(streaming)
    assert code == 1001
    acked_n = [n for n, future in enumerate(acked) if future.done() and not future.exception()]
    stored_n = {int(row["n"]) for row in points(influxdb, influx_db_name, "stream")}
    assert len(acked_n) >= 20
    assert set(acked_n) <= stored_n


# --- InfluxDB slow or unreachable ----------------------------------------------------------
# An ack means durable: written to InfluxDB, or synced to the hub's disk spool.


class GatedInflux:
    """A loopback port in front of InfluxDB: refusing, then holding, then forwarding.

    Its socket is bound at once (so nobody else takes the port) but not listening, so
    connection attempts are refused as by a stopped server. `listen()` accepts connections
    but holds requests unanswered (a server that has not confirmed the write yet);
    `release()` forwards everything to InfluxDB from then on.
    """

    def __init__(self, target: LocalServer) -> None:
        self._target_port = int(target.url.rsplit(":", 1)[1])
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def listen(self) -> None:
        """Accept connections, holding their requests until `release()`."""
        self._server = await asyncio.start_server(self._forward, sock=self._sock)

    def release(self) -> None:
        """Forward held and new connections to InfluxDB."""
        self._released.set()

    async def open(self) -> None:
        """Accept and forward from now on."""
        self.release()
        if self._server is None:
            await self.listen()

    async def close(self) -> None:
        """Stop forwarding and drop every forwarded connection."""
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        else:
            self._sock.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            await self._released.wait()
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._pipes.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


@pytest.fixture
async def gate(influxdb: LocalServer) -> AsyncIterator[GatedInflux]:
    """InfluxDB behind a gate that starts refusing connections."""
    gated = GatedInflux(influxdb)
    try:
        yield gated
    finally:
        await gated.close()


@pytest.fixture
def gated_settings(tmp_path: Path, gate: GatedInflux, influx_db_name: str) -> Settings:
    """Hub settings writing through the gate; a held write is never given up on meanwhile."""
    return hub_settings(
        tmp_path, gate.url, influx_bucket=influx_db_name, influx_api="v1", write_deadline_s=60.0
    )


def outage_readings(name: str, count: int = 3, text: str = "") -> list[dict[str, Any]]:
    """`count` readings of measurement `name`, with a string field `text` when given."""
    fields: dict[str, Any] = {"text": text} if text else {}
    return [
        {"name": name, "time": T0_MS + n, "fields": {"v": float(n), **fields}} for n in range(count)
    ]


def spool_bytes(settings: Settings) -> int:
    """Bytes in the hub's spool directory."""
    return sum(path.stat().st_size for path in settings.spool_dir.rglob("*") if path.is_file())


async def not_acked_within(ack: asyncio.Future[Ack], seconds: float) -> bool:
    """True when `ack` is still pending after `seconds` (the only way to see an absence)."""
    done, _ = await asyncio.wait({ack}, timeout=seconds)
    return not done


async def test_no_ack_before_influxdb_confirms_the_write(
    gated_settings: Settings, gate: GatedInflux
) -> None:
    """While InfluxDB holds the write unanswered, the readings are not acked."""
    token = add_device(gated_settings, DEVICE)
    await gate.listen()
    async with running_hub(gated_settings) as service:
        async with DeviceClient(service.url, token) as device:
            ack = await device.send_readings(outage_readings("held"))
            assert await not_acked_within(ack, 1.0), f"acked before InfluxDB answered: {ack}"
        with contextlib.suppress(ConnectionError):  # failed by the client's own close
            await ack
        gate.release()  # so that stopping the hub need not wait for its flush deadline


async def test_ack_follows_influxdb_confirmation_and_readings_are_stored(
    gated_settings: Settings, gate: GatedInflux, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Once InfluxDB answers the held write the ack arrives, and the readings are stored."""
    token = add_device(gated_settings, DEVICE)
    await gate.listen()
    async with running_hub(gated_settings) as service, DeviceClient(service.url, token) as device:
        ack = await device.send_readings(outage_readings("held"))
        assert await not_acked_within(ack, 0.3)
        gate.release()
        result = await bounded(ack)
        stored = [row["v"] for row in points(influxdb, influx_db_name, "held")]
    assert result.accepted == 3
    assert stored == [0.0, 1.0, 2.0]


async def test_unreachable_influxdb_readings_are_acked_once_in_the_spool(
    gated_settings: Settings, gate: GatedInflux, influxdb: LocalServer, influx_db_name: str
) -> None:
    """With nothing listening at InfluxDB's address, the ack comes once the readings are spooled."""
    token = add_device(gated_settings, DEVICE)
    async with running_hub(gated_settings) as service, DeviceClient(service.url, token) as device:
        assert spool_bytes(gated_settings) == 0
        ack = await bounded(device.store(outage_readings("spooled")))
        assert ack.accepted == 3
        assert spool_bytes(gated_settings) > 0
        assert points(influxdb, influx_db_name, "spooled") == []


async def test_spooled_readings_reach_influxdb_when_it_is_back(
    gated_settings: Settings, gate: GatedInflux, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Readings acked from the spool during an outage are written once InfluxDB is reachable."""
    token = add_device(gated_settings, DEVICE)
    async with running_hub(gated_settings) as service, DeviceClient(service.url, token) as device:
        ack = await bounded(device.store(outage_readings("spooled")))
        assert ack.accepted == 3
        await gate.open()
        await eventually(
            lambda: len(points(influxdb, influx_db_name, "spooled")) == 3, "spooled readings stored"
        )
    assert [row["v"] for row in points(influxdb, influx_db_name, "spooled")] == [0.0, 1.0, 2.0]


@pytest.fixture
def small_spool_settings(gated_settings: Settings) -> Settings:
    """A spool with room for one small batch only; no presence points competing for it."""
    return gated_settings.model_copy(update={"spool_max_bytes": 400, "presence_flush_s": 3600.0})


async def test_no_ack_while_influxdb_is_unreachable_and_the_spool_is_full(
    small_spool_settings: Settings, gate: GatedInflux
) -> None:
    """When neither InfluxDB nor the spool can take a batch, its readings are not acked."""
    token = add_device(small_spool_settings, DEVICE)
    async with running_hub(small_spool_settings) as service:
        async with DeviceClient(service.url, token) as device:
            first = await bounded(device.store(outage_readings("small", count=1)))
            assert first.accepted == 1  # spooled; the spool is now too full for the next
            ack = await device.send_readings(outage_readings("big", text="x" * 400))
            assert await not_acked_within(ack, 1.0), f"acked, yet stored nowhere: {ack}"
        with contextlib.suppress(ConnectionError):  # failed by the client's own close
            await ack
        await gate.open()  # so that stopping the hub need not wait for its flush deadline


async def test_withheld_ack_comes_once_influxdb_is_back_and_readings_are_stored(
    small_spool_settings: Settings, gate: GatedInflux, influxdb: LocalServer, influx_db_name: str
) -> None:
    """An ack withheld (InfluxDB down, spool full) arrives when InfluxDB is back, data stored."""
    token = add_device(small_spool_settings, DEVICE)
    async with (
        running_hub(small_spool_settings) as service,
        DeviceClient(service.url, token) as device,
    ):
        await bounded(device.store(outage_readings("small", count=1)))
        ack = await device.send_readings(outage_readings("big", text="x" * 400))
        assert await not_acked_within(ack, 0.3)
        await gate.open()
        result = await bounded(ack)
        stored = [row["v"] for row in points(influxdb, influx_db_name, "big")]
    assert result.accepted == 3
    assert stored == [0.0, 1.0, 2.0]


async def test_stop_acks_in_flight_readings_before_closing_with_1001(
    gated_settings: Settings, gate: GatedInflux, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Readings the hub holds when asked to stop are stored and acked before the 1001 close."""
    token = add_device(gated_settings, DEVICE)
    await gate.listen()
    async with started(gated_settings) as service, DeviceClient(service.url, token) as device:
        acks = [
            await device.send_readings(
                [{"name": "inflight", "time": T0_MS + n, "fields": {"v": 1.0}}]
            )
            for n in range(10)
        ]
        # All ten are in the hub's hands (submitted, their write held) before it stops.
        await eventually(lambda: service.hub.pipeline.pending >= 10, "the hub holds 10 readings")
        stopping = asyncio.create_task(service.stop())
        await asyncio.sleep(0.1)
        gate.release()
        await bounded(stopping)
        code, _reason = await bounded(device.wait_closed())
        results = [
            ack.result().accepted if ack.done() and not ack.exception() else None for ack in acks
        ]
    assert results == [1] * 10
    assert code == 1001
    assert len(points(influxdb, influx_db_name, "inflight")) == 10
