"""The protocol's bad-input table, row by row, against a running hub and a real InfluxDB.

The misbehaving device uses a bare WebSocket connection so that every frame it sends and
receives is visible. In every test a well-behaved device is connected to the same hub
before the bad input and must still be acked afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer, influxql
from hub.service import HubService
from hub.settings import Settings
from tests.support import add_device, hub_settings, points, running_hub

pytestmark = pytest.mark.integration

WAIT_S = 10.0
T0_MS = 1_700_000_000_000
MAX_BYTES = 4096
MAX_READINGS = 10


def pack(obj: object) -> bytes:
    """Plain msgpack, as a device would send it."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def reading(n: int, name: str = "bad_input", **fields: Any) -> dict[str, Any]:
    """A valid reading number `n`."""
    return {"name": name, "time": T0_MS + n, "fields": fields or {"v": float(n)}}


def readings_message(seq: int, readings: list[dict[str, Any]]) -> bytes:
    """A well-formed readings message."""
    return pack({"type": "readings", "seq": seq, "readings": readings})


@dataclass
class Outcome:
    """What a misbehaving device saw: every hub message, then the close code."""

    messages: list[dict[str, Any]]
    close_code: int | None

    @property
    def kinds(self) -> list[str]:
        """The `type` of every message received, in order."""
        return [str(message.get("type")) for message in self.messages]


@dataclass
class Hub:
    """A running hub with a misbehaving and a well-behaved device registered."""

    service: HubService
    bad_token: str
    good: DeviceClient


async def misbehave(hub: Hub, *frames: bytes | str) -> Outcome:
    """Send `frames` as the bad device and read until the hub closes the connection."""
    url = f"{hub.service.url}/v1/ws"
    headers = {"Authorization": f"Bearer {hub.bad_token}"}
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT_S):
        async with connect(url, additional_headers=headers, max_size=None) as connection:
            with contextlib.suppress(ConnectionClosed):  # the hub may close mid-way
                for frame in frames:
                    await connection.send(frame)
            with contextlib.suppress(ConnectionClosed):
                while True:
                    frame = await connection.recv()
                    assert isinstance(frame, bytes), frame
                    messages.append(msgpack.unpackb(frame, raw=False))
        return Outcome(messages, connection.close_code)


async def assert_good_device_still_acked(hub: Hub, n: int = 0) -> None:
    """The well-behaved device's readings are still stored and acked."""
    ack = await asyncio.wait_for(hub.good.store([reading(n, name="good_device")]), WAIT_S)
    assert (ack.accepted, ack.rejected) == (1, [])


def measurements(influx: LocalServer, db: str) -> set[str]:
    """Every measurement in the database."""
    return {row["name"] for row in influxql(influx.url, db, "SHOW MEASUREMENTS")}


@contextlib.asynccontextmanager
async def hub_with_devices(settings: Settings) -> AsyncIterator[Hub]:
    """Start a hub, register both devices, connect the good one."""
    bad_token = add_device(settings, "dev-bad")
    good_token = add_device(settings, "dev-good")
    async with running_hub(settings) as service, DeviceClient(service.url, good_token) as good:
        yield Hub(service, bad_token, good)


@pytest.fixture
async def hub(tmp_path: Path, influxdb: LocalServer, influx_db_name: str) -> AsyncIterator[Hub]:
    """A hub with small frame and message limits."""
    settings = hub_settings(
        tmp_path,
        influxdb.url,
        influx_bucket=influx_db_name,
        influx_api="v1",
        max_message_bytes=MAX_BYTES,
        max_readings_per_message=MAX_READINGS,
    )
    async with hub_with_devices(settings) as hub:
        yield hub


# --- A reading that breaks its schema ------------------------------------------------------

SCHEMA = """\
accept_unknown_measurements = true

[measurements.environment]
tags = ["room"]

[measurements.environment.fields]
temperature = { type = "float", min = -40, max = 85, required = true }
door_open = { type = "bool" }
"""

BREAKING = {
    "wrong_type": ({"temperature": "hot"}, {}, "temperature"),
    "out_of_range": ({"temperature": 100.0}, {}, "temperature"),
    "required_missing": ({"door_open": True}, {}, "temperature"),
    "bool_as_int": ({"temperature": 20.0, "door_open": 1}, {}, "door_open"),
    "unknown_field": ({"temperature": 20.0, "pressure": 1000.0}, {}, "pressure"),
    "unknown_tag": ({"temperature": 20.0}, {"floor": "2"}, "floor"),
    "empty_fields": ({}, {}, "fields"),
    "nan": ({"temperature": float("nan")}, {}, "temperature"),
}


@pytest.mark.parametrize("case", list(BREAKING))
async def test_schema_breaking_reading_is_rejected_and_the_rest_stored(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str, case: str
) -> None:
    """A reading breaking its schema is rejected with a reason; the others are stored."""
    schema = tmp_path / "schemas.toml"
    schema.write_text(SCHEMA)
    settings = hub_settings(
        tmp_path / "state", influxdb.url, influx_bucket=influx_db_name, influx_api="v1",
        schemas=schema,
    )  # fmt: skip
    fields, tags, named = BREAKING[case]
    bad = {"name": "environment", "time": T0_MS + 1, "fields": fields, "tags": tags}
    valid = [
        {"name": "environment", "time": T0_MS + n, "fields": {"temperature": 20.0 + n},
         "tags": {"room": "k"}}
        for n in (0, 2)
    ]  # fmt: skip
    async with hub_with_devices(settings) as hub:
        async with DeviceClient(hub.service.url, hub.bad_token) as device:
            ack = await asyncio.wait_for(device.store([valid[0], bad, valid[1]]), WAIT_S)
            assert ack.accepted == 2
            assert [rejection.index for rejection in ack.rejected] == [1]
            assert any(named in error for error in ack.rejected[0].errors), ack.rejected
            # The connection stays: the next message is stored and acked.
            again = await asyncio.wait_for(device.store([reading(3)]), WAIT_S)
            assert again.accepted == 1
        await assert_good_device_still_acked(hub)
    stored = [row["temperature"] for row in points(influxdb, influx_db_name, "environment")]
    assert stored == [20.0, 22.0]


# --- Frames that break the protocol: error, then 1007 --------------------------------------

VALID = readings_message(1, [reading(1)])

INVALID_FRAMES = {
    # not msgpack
    "never_used_byte": b"\xc1",
    "truncated": VALID[:-3],
    "empty_frame": b"",
    # not a map
    "array": pack([{"type": "readings", "seq": 1, "readings": [reading(1)]}]),
    "string": pack("readings"),
    "integer": pack(42),
    "nil": pack(None),
    "non_string_key": pack({1: "readings", "type": "readings"}),
    # no type / unknown type
    "no_type": pack({"seq": 1, "readings": [reading(1)]}),
    "unknown_type": pack({"type": "reading", "seq": 1, "readings": [reading(1)]}),
    "hub_message_type": pack({"type": "ack", "seq": 1, "accepted": 1}),
    "type_not_a_string": pack({"type": 1, "seq": 1, "readings": [reading(1)]}),
    "type_as_bin": pack({"type": b"readings", "seq": 1, "readings": [reading(1)]}),
    # malformed envelope
    "seq_missing": pack({"type": "readings", "readings": [reading(1)]}),
    "seq_negative": pack({"type": "readings", "seq": -1, "readings": [reading(1)]}),
    "seq_string": pack({"type": "readings", "seq": "1", "readings": [reading(1)]}),
    "seq_float": pack({"type": "readings", "seq": 1.0, "readings": [reading(1)]}),
    "readings_missing": pack({"type": "readings", "seq": 1}),
    "readings_not_a_list": pack({"type": "readings", "seq": 1, "readings": reading(1)}),
    "readings_empty": pack({"type": "readings", "seq": 1, "readings": []}),
    "too_many_readings": readings_message(1, [reading(n) for n in range(MAX_READINGS + 1)]),
    "trailing_byte": VALID + b"\x00",
    "two_messages": VALID + readings_message(2, [reading(2)]),
    "unknown_envelope_key": pack({"type": "readings", "seq": 1, "readings": [reading(1)], "x": 1}),
    "config_ack_bad_version": pack({"type": "config_ack", "version": -1, "ok": True}),
}


@pytest.mark.parametrize("case", list(INVALID_FRAMES))
async def test_invalid_frame_gets_an_error_then_close_1007(hub: Hub, case: str) -> None:
    """A frame that is not msgpack, not a map, untyped or a bad envelope: error, then 1007."""
    outcome = await misbehave(hub, INVALID_FRAMES[case])
    assert outcome.kinds == ["error"], outcome.messages
    assert outcome.messages[0]["code"] == "invalid_message"
    assert outcome.messages[0]["message"]
    assert outcome.close_code == 1007
    await assert_good_device_still_acked(hub)


@pytest.mark.parametrize("case", ["too_many_readings", "trailing_byte", "two_messages"])
async def test_readings_of_an_invalid_frame_are_not_stored(
    hub: Hub, influxdb: LocalServer, influx_db_name: str, case: str
) -> None:
    """Valid-looking readings inside a frame refused for its envelope are not stored."""
    await misbehave(hub, INVALID_FRAMES[case])
    await assert_good_device_still_acked(hub)  # the good device's point is written after
    assert measurements(influxdb, influx_db_name) & {"bad_input"} == set()


async def test_acks_of_earlier_messages_arrive_before_the_close(
    hub: Hub, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Messages sent before a bad frame are stored and acked, in order, before error and 1007."""
    frames = [readings_message(seq, [reading(seq)]) for seq in range(1, 6)]
    outcome = await misbehave(hub, *frames, b"\xc1")
    assert outcome.kinds == ["ack"] * 5 + ["error"], outcome.messages
    assert [message["seq"] for message in outcome.messages[:5]] == [1, 2, 3, 4, 5]
    assert outcome.close_code == 1007
    assert len(points(influxdb, influx_db_name, "bad_input")) == 5
    await assert_good_device_still_acked(hub)


# --- Text frame: 1003 ----------------------------------------------------------------------


async def test_text_frame_closes_with_1003(hub: Hub) -> None:
    """A text frame closes the connection with 1003."""
    outcome = await misbehave(hub, '{"type": "readings", "seq": 1, "readings": []}')
    assert "ack" not in outcome.kinds
    assert outcome.close_code == 1003
    await assert_good_device_still_acked(hub)


# --- Oversized frame: 1009 -----------------------------------------------------------------


async def test_frame_over_max_message_bytes_closes_with_1009(
    hub: Hub, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A frame larger than max_message_bytes closes the connection with 1009, nothing stored."""
    frame = readings_message(1, [reading(0, text="x" * MAX_BYTES)])
    assert len(frame) > MAX_BYTES
    outcome = await misbehave(hub, frame)
    assert "ack" not in outcome.kinds
    assert outcome.close_code == 1009
    await assert_good_device_still_acked(hub)
    assert "bad_input" not in measurements(influxdb, influx_db_name)


async def test_frame_at_max_message_bytes_is_accepted(hub: Hub) -> None:
    """A frame of exactly max_message_bytes is within the limit and acked."""
    padding = MAX_BYTES - len(readings_message(1, [reading(0, text="")]))
    frame = readings_message(1, [reading(0, text="x" * padding)])
    frame = readings_message(1, [reading(0, text="x" * (padding - (len(frame) - MAX_BYTES)))])
    assert len(frame) == MAX_BYTES
    async with DeviceClient(hub.service.url, hub.bad_token) as device:
        ack = await asyncio.wait_for(await device.send_raw(frame, seq=1), WAIT_S)
    assert ack.accepted == 1


# --- Over the rate limit: error, then 1008 -------------------------------------------------


async def test_over_message_rate_gets_an_error_then_close_1008(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Messages beyond the per-device message rate and burst: error rate_limited, then 1008."""
    # 0.5 messages a second with a 2 s burst: one message now, the next only 2 s later.
    settings = hub_settings(
        tmp_path, influxdb.url, influx_bucket=influx_db_name, influx_api="v1",
        device_messages_per_s=0.5, device_burst_s=2.0,
    )  # fmt: skip
    async with hub_with_devices(settings) as hub:
        # Two frames only: frames the hub never reads would hold up its closing handshake.
        frames = [readings_message(seq, [reading(seq)]) for seq in (1, 2)]
        outcome = await misbehave(hub, *frames)
        assert outcome.kinds == ["ack", "error"], outcome.messages
        assert outcome.messages[0]["seq"] == 1
        assert outcome.messages[1]["code"] == "rate_limited"
        assert outcome.close_code == 1008
        await assert_good_device_still_acked(hub)


async def test_over_reading_rate_gets_an_error_then_close_1008(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A message with more readings than the per-device reading burst: error, then 1008."""
    # 5 readings a second with a 1 s burst: a 6-reading message can never fit.
    settings = hub_settings(
        tmp_path, influxdb.url, influx_bucket=influx_db_name, influx_api="v1",
        device_readings_per_s=5.0, device_burst_s=1.0,
    )  # fmt: skip
    async with hub_with_devices(settings) as hub:
        outcome = await misbehave(hub, readings_message(1, [reading(n) for n in range(6)]))
        assert outcome.kinds == ["error"], outcome.messages
        assert outcome.messages[0]["code"] == "rate_limited"
        assert outcome.close_code == 1008
        await assert_good_device_still_acked(hub)


async def test_within_rate_limits_is_accepted(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Exactly the burst of messages and readings a device is allowed is acked in full."""
    settings = hub_settings(
        tmp_path, influxdb.url, influx_bucket=influx_db_name, influx_api="v1",
        device_messages_per_s=0.5, device_burst_s=4.0, device_readings_per_s=2.5,
    )  # fmt: skip
    # Burst: 2 messages and 10 readings.
    async with hub_with_devices(settings) as hub:
        async with DeviceClient(hub.service.url, hub.bad_token) as device:
            first = await device.send_readings([reading(n) for n in range(5)])
            second = await device.send_readings([reading(n) for n in range(5, 10)])
            acks = await asyncio.wait_for(asyncio.gather(first, second), WAIT_S)
        assert [ack.accepted for ack in acks] == [5, 5]


async def test_bad_frame_followed_by_more_frames_still_closes_cleanly(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    """Frames sent after the bad one are read and dropped, so the close handshake completes
    with 1007 on both sides instead of the hub timing out (1006)."""
    caplog.set_level("INFO", logger="hub.server")
    later = [readings_message(seq, [reading(seq)]) for seq in range(2, 20)]
    outcome = await misbehave(hub, b"\xc1", *later)
    assert outcome.close_code == 1007
    for _ in range(100):
        if any("dev-bad disconnected" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.05)
    closes = [r.getMessage() for r in caplog.records if "dev-bad disconnected" in r.getMessage()]
    assert closes and "1007" in closes[0], closes
    await assert_good_device_still_acked(hub)
