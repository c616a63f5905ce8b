"""Fuzzing: hostile frames get the answer the protocol promises, and nothing else changes.

Hypothesis draws structured-but-wrong messages (any msgpack value in any position, NaN and
infinities, integers at and past every bound, non-string keys, extension types, line-protocol
injection in every string) and raw ones (random bytes, truncated frames, deep nesting, huge
declared lengths, invalid UTF-8).

- Against the pure decoder and validator (many examples): only `InvalidMessage` is ever
  raised; an ack accounts for every reading; every accepted reading becomes exactly one
  line-protocol point carrying exactly its own measurement, tags and fields.
- Against a real hub (in a thread, with a real InfluxDB): each frame gets what the pure
  answer says (error + 1007, 1009, an ack, or nothing), the hub stays up, and a well-behaved
  device on the same hub is acked after every example and has every reading in InfluxDB.
- Memory is measured across both runs and must stay bounded.

`HUB_FUZZ_EXAMPLES` sets the number of examples (see scripts/fuzz.sh for the long run).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer, influxql
from hub.errors import InvalidMessage
from hub.measurements import MeasurementSchemas, ReadingLimits
from hub.protocol import ReadingsFrame, TelegrafFrame, decode_frame
from hub.readings import MAX_REASON_CHARS, MAX_REASONS_PER_READING, prepare_readings
from hub.service import HubService
from hub.settings import Settings
from schemas.messages import Ack
from tests.support import add_device, hub_settings

EXAMPLES = int(os.environ.get("HUB_FUZZ_EXAMPLES", "0"))
PURE_EXAMPLES = EXAMPLES or 1500
LIVE_EXAMPLES = EXAMPLES or 250
WAIT_S = 10.0
MS = 10**6
DEVICE = "dev-fuzz"
MAX_BYTES = 64 * 1024
MAX_READINGS = 50
MAX_DEPTH = 8
LIMITS = ReadingLimits(max_fields=8, max_tags=4, max_name_chars=64, max_string_chars=256)
PROBE_SEQ = 2**64 - 17
MEMORY_BOUND_MIB = 64

# --- Strategies ------------------------------------------------------------------------------

INJECTIONS = [
    "\n", "\r", "\0", ",", "=", " ", "\\", '"', "#", "\t", "'", "time", "device", "\u2028",
    "a\nb,c=d e", "x\\", "\\ ", "\\,", "\\=", '\\"', "m,device=evil", 'x" y=1', "Küche 温度 🌡",
]  # fmt: skip
INT_EDGES = [
    0, 1, -1, 2**31, 2**32, 2**53, 2**53 + 1, 2**63 - 2, 2**63 - 1, 2**63, 2**64 - 1,
    -(2**31), -(2**53), -(2**63) + 2, -(2**63) + 1, -(2**63),
]  # fmt: skip

texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(INJECTIONS),
    st.builds(
        lambda a, b, c: a + b + c,
        st.text(max_size=4),
        st.sampled_from(INJECTIONS),
        st.text(max_size=4),
    ),
    st.integers(0, 400).map(lambda n: "x" * n),
)
integers = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from(INT_EDGES))
floats = st.one_of(
    st.floats(),  # NaN and infinities included
    st.floats(width=32),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0, 2.0**70, 1e308]),
)
timestamps = st.builds(
    msgpack.Timestamp,
    st.integers(-(2**34), 2**34 - 1) | st.sampled_from([0, -1, 2**33, 9_223_372_036]),
    st.integers(0, 999_999_999),
)
extensions = st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    integers,
    floats,
    texts,
    st.binary(max_size=16),
    timestamps,
    extensions,
    st.integers(20, 40).map(lambda n: "9" * n),  # "integers past 64 bits", as text
)
bad_keys = st.one_of(integers, st.booleans(), st.none(), st.binary(max_size=4), floats)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
non_string_keys = st.dictionaries(bad_keys, values, min_size=1, max_size=2)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` four times in five, else `bad`: frames wrong in one place more than in many."""
    return st.one_of(good, good, good, good, bad)


values = mostly(values, non_string_keys)


names = mostly(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True), texts)
plain = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.integers(-(2**53), 2**53)
)
good_values = mostly(plain, st.one_of(integers, floats, texts))
times_ms = mostly(st.integers(0, 2**41), st.integers(-(2**63) // MS - 2, (2**63 - 2) // MS + 2))
good_reading = st.fixed_dictionaries(
    {
        "name": names,
        "fields": st.dictionaries(names, good_values, min_size=1, max_size=LIMITS.max_fields + 1),
    },
    optional={
        "tags": st.dictionaries(names, names, max_size=LIMITS.max_tags + 1),
        "time": times_ms | timestamps,
    },
)
bad_reading = st.one_of(
    st.fixed_dictionaries(
        {
            "name": mostly(texts, values),
            "fields": mostly(st.dictionaries(texts, values, max_size=4), values),
        },
        optional={
            "tags": mostly(st.dictionaries(texts, values, max_size=4), values),
            "time": values,
            "extra": values,
        },
    ),
    values,
)
readings = mostly(good_reading, bad_reading)
envelopes = st.one_of(
    st.fixed_dictionaries(
        {
            "type": mostly(st.just("readings"), values),
            "seq": mostly(st.integers(0, 2**64 - 1), values),
            "readings": mostly(
                st.lists(readings, min_size=1, max_size=6), st.lists(readings) | values
            ),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("config_ack"),
            "version": mostly(st.integers(0, 2**64 - 1), values),
            "ok": mostly(st.booleans(), values),
        },
        optional={"error": mostly(texts, values)},
    ),
    st.dictionaries(texts, values, max_size=4),
    st.fixed_dictionaries(
        {
            "type": st.just("readings"),
            "seq": st.just(1),
            "readings": st.lists(good_reading, min_size=1, max_size=2),
        },
        optional={"x": values},
    ),
)
telegraf = st.lists(readings, min_size=1, max_size=5)


def pack(value: Any) -> bytes | None:
    """msgpack of `value`, or None if msgpack cannot encode it (e.g. lone surrogates)."""
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True, datetime=False)
    except (ValueError, TypeError, OverflowError, UnicodeEncodeError):
        return None
    return packed


HEADERS = [
    b"\xdc",
    b"\xdd",
    b"\xde",
    b"\xdf",
    b"\xd9",
    b"\xda",
    b"\xdb",
    b"\xc4",
    b"\xc5",
    b"\xc6",
    b"\xc7",
    b"\xc8",
    b"\xc9",
]


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One binary frame a hostile or broken device might send."""
    kind = draw(
        st.sampled_from(
            ["message"] * 6
            + ["telegraf"] * 2
            + [
                "value",
                "bytes",
                "truncated",
                "deep",
                "huge_length",
                "bad_utf8",
                "negative_ext",
                "oversized",
            ]
        )
    )
    if kind in ("message", "truncated", "bad_utf8", "oversized"):
        frame = pack(draw(envelopes)) or b"\x80"
    elif kind == "telegraf":
        frame = b"".join(pack(metric) or b"" for metric in draw(telegraf))
    elif kind == "value":
        frame = pack(draw(values)) or b"\xc0"
    elif kind == "bytes":
        return draw(st.binary(max_size=200))
    elif kind == "deep":
        depth = draw(st.integers(1, 3000))
        opener = draw(st.sampled_from([b"\x91", b"\x81\xa1a"]))
        return b"\x81\xa4type" + opener * depth + draw(st.binary(max_size=4))
    elif kind == "huge_length":
        length: int = draw(st.sampled_from([2**16 - 1, 2**31, 2**32 - 1]))
        head: bytes = draw(st.sampled_from(HEADERS))
        size = {
            b"\xdc": 2,
            b"\xde": 2,
            b"\xda": 2,
            b"\xc5": 2,
            b"\xc8": 2,
            b"\xd9": 1,
            b"\xc4": 1,
            b"\xc7": 1,
        }.get(head, 4)
        declared = (length % (1 << (8 * size))).to_bytes(size, "big")
        tail: bytes = draw(st.binary(max_size=8))
        return b"\x81\xa4type" + head + declared + tail
    else:  # negative_ext: reserved extension types other than the timestamp
        code = draw(st.integers(-128, -2))
        return b"\x81\xa4time\xd6" + code.to_bytes(1, "big", signed=True) + b"\x00" * 4
    if kind == "truncated":
        return frame[: draw(st.integers(0, max(0, len(frame) - 1)))]
    if kind == "bad_utf8":
        start = draw(st.integers(0, len(frame)))
        return frame[:start] + b"\xa3\xff\xfe\xc0" + frame[start:]
    if kind == "oversized":
        return frame + b"\xc0" * MAX_BYTES
    return frame


# --- The answer the protocol promises --------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What the hub must do with a frame: close with `close_code`, or send `ack` (or nothing)."""

    close_code: int | None = None
    ack: Ack | None = None


def line_protocol_points(lines: str) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    """Parse line protocol as InfluxDB does: (measurement, tags, fields with raw values)."""
    points = []
    for line in lines.split("\n") if lines else []:
        at = 0

        def read(stops: str, escapable: str, line: str = line) -> str:
            nonlocal at
            out = []
            while at < len(line) and line[at] not in stops:
                if line[at] == "\\" and at + 1 < len(line) and line[at + 1] in escapable:
                    at += 1
                out.append(line[at])
                at += 1
            return "".join(out)

        measurement = read(", ", ", ")
        tags: dict[str, str] = {}
        while line[at] == ",":
            at += 1
            key = read("=", ",= ")
            at += 1
            assert key not in tags, f"tag {key!r} twice in {line!r}"
            tags[key] = read(", ", ",= ")
        at += 1  # the space before the fields
        fields: dict[str, str] = {}
        while True:
            key = read("=", ",= ")
            at += 1
            if line[at] == '"':
                end = at + 1
                while line[end] != '"':
                    end += 2 if line[end] == "\\" else 1
                fields[key], at = line[at : end + 1], end + 1
            else:
                fields[key] = read(", ", "")
            assert key, f"empty field key in {line!r}"
            if line[at] == " ":
                break
            at += 1
        timestamp = line[at + 1 :]
        assert timestamp.lstrip("-").isdigit(), f"bad timestamp in {line!r}"
        points.append((measurement, tags, fields))
    return points


def expected_answer(frame: bytes) -> Answer:
    """The pure core's answer to `frame`, after checking every promise it makes."""
    if len(frame) > MAX_BYTES:
        return Answer(close_code=1009)
    try:
        event = decode_frame(frame, MAX_READINGS, MAX_DEPTH)
    except InvalidMessage as refusal:
        assert refusal.message
        return Answer(close_code=1007)
    if not isinstance(event, ReadingsFrame | TelegrafFrame):
        return Answer()
    raw = event.readings if isinstance(event, ReadingsFrame) else event.metrics
    validator = MeasurementSchemas().validator(MS, LIMITS)
    prepared = prepare_readings(raw, validator, DEVICE, MS, 1_700_000_000 * 10**9)
    indices = [rejection.index for rejection in prepared.rejected]
    assert indices == sorted(set(indices)) and all(0 <= i < len(raw) for i in indices)
    assert prepared.accepted + len(indices) == len(raw)
    for rejection in prepared.rejected:
        assert 1 <= len(rejection.errors) <= MAX_REASONS_PER_READING
        assert all(0 < len(error) <= MAX_REASON_CHARS for error in rejection.errors)
    points = line_protocol_points(prepared.lines)
    accepted = [reading for i, reading in enumerate(raw) if i not in set(indices)]
    assert len(points) == prepared.accepted == len(accepted)
    for (measurement, tags, fields), reading in zip(points, accepted, strict=True):
        assert measurement == reading["name"]
        sent_tags = {k: v for k, v in reading.get("tags", {}).items() if v and k != "device"}
        assert tags == {**sent_tags, "device": DEVICE}
        assert list(fields) == list(reading["fields"])
    if isinstance(event, TelegrafFrame):
        return Answer()
    ack = Ack(seq=event.seq, accepted=prepared.accepted, rejected=prepared.rejected)
    assert len(msgpack.packb(ack.model_dump())) <= 64 * 1024 + len(raw) * 64
    return Answer(ack=ack)


def rss_mib() -> float:
    """This process's resident memory, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# --- Pure ------------------------------------------------------------------------------------

_pure_memory: list[float] = []


@settings(max_examples=PURE_EXAMPLES, deadline=None, database=None)
@given(frame=frames())
def test_the_core_answers_every_frame_as_promised(frame: bytes) -> None:
    """Decoding and validating any frame gives error+1007, 1009, an ack or nothing; an ack
    accounts for every reading; accepted readings become exactly their own points."""
    if len(_pure_memory) < 2:
        _pure_memory.append(rss_mib())
    expected_answer(frame)
    _pure_memory[1:] = [rss_mib()]


def test_memory_stayed_bounded_while_the_core_was_fuzzed() -> None:
    """Resident memory grew less than the bound over the pure fuzz run."""
    assert len(_pure_memory) == 2, "run with test_the_core_answers_every_frame_as_promised"
    grown = _pure_memory[1] - _pure_memory[0]
    assert grown < MEMORY_BOUND_MIB, f"RSS grew {grown:.1f} MiB"


# --- A real hub -----------------------------------------------------------------------------

T = TypeVar("T")


class HubThread:
    """A hub and a well-behaved device, running in their own thread and event loop."""

    def __init__(self, settings: Settings, good_token: str) -> None:
        self.settings = settings
        self.good_token = good_token
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-hub", daemon=True)
        self.service = HubService(settings)
        self.good: DeviceClient | None = None
        self.good_acked = 0

    def call(self, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run `work()` in the hub's loop and wait (bounded) for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(work(), self.loop)
        return future.result(WAIT_S * 3)

    def start(self) -> None:
        """Start the thread, the hub, and connect the good device."""
        self.thread.start()

        async def start() -> None:
            await self.service.start()
            self.good = DeviceClient(self.service.url, self.good_token)
            await self.good.connect()

        self.call(start)

    def store_good_reading(self) -> None:
        """The good device sends one reading and must get it acked."""

        async def store() -> Ack:
            assert self.good is not None
            reading = {
                "name": "good_device",
                "time": 1_600_000_000_000 + self.good_acked,
                "fields": {"v": 1.0},
            }
            return await asyncio.wait_for(self.good.store([reading]), WAIT_S)

        ack = self.call(store)
        assert (ack.accepted, ack.rejected) == (1, []), ack
        self.good_acked += 1

    def stop(self) -> None:
        """Close the good device, stop the hub, end the thread."""

        async def stop() -> None:
            if self.good is not None:
                await self.good.close()
            await self.service.stop()

        try:
            self.call(stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT_S)
            self.loop.close()


@dataclass
class Seen:
    """What the fuzzing device received, and how its connection ended."""

    messages: list[dict[str, Any]]
    close_code: int | None


async def send_one(url: str, token: str, frame: bytes) -> Seen:
    """Send `frame` and then a probe reading; read until the probe's ack or the close."""
    probe = msgpack.packb(
        {
            "type": "readings",
            "seq": PROBE_SEQ,
            "readings": [{"name": "probe", "fields": {"v": 1.0}}],
        }
    )
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT_S):
        connection = await connect(
            url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None
        )
        with contextlib.suppress(ConnectionClosed):
            await connection.send(frame)
            await connection.send(probe)
            while True:
                message = msgpack.unpackb(await connection.recv(), raw=False)
                messages.append(message)
                if message.get("type") == "ack" and message.get("seq") == PROBE_SEQ:
                    break
        await connection.close()
    return Seen(messages, connection.close_code)


@pytest.fixture
def hub(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> Iterator[tuple[HubThread, str]]:
    """A running fuzz hub (small limits, no rate limits) and the fuzzing device's token."""
    hub_config = hub_settings(
        tmp_path,
        influxdb.url,
        influx_bucket=influx_db_name,
        influx_api="v1",
        max_message_bytes=MAX_BYTES,
        max_readings_per_message=MAX_READINGS,
        max_nesting_depth=MAX_DEPTH,
        max_fields_per_reading=LIMITS.max_fields,
        max_tags_per_reading=LIMITS.max_tags,
        max_name_chars=LIMITS.max_name_chars,
        max_string_chars=LIMITS.max_string_chars,
        device_messages_per_s=1e6,
        device_readings_per_s=1e9,
        health_enabled=False,
    )
    token = add_device(hub_config, DEVICE)
    thread = HubThread(hub_config, add_device(hub_config, "dev-good"))
    thread.start()
    try:
        yield thread, token
    finally:
        thread.stop()


def check_seen(seen: Seen, answer: Answer) -> None:
    """The hub did what `answer` says."""
    kinds = [message.get("type") for message in seen.messages]
    if answer.close_code == 1007:
        assert kinds == ["error"] and seen.messages[0]["code"] == "invalid_message", seen
        assert seen.close_code == 1007, seen
    elif answer.close_code is not None:
        assert kinds == [] and seen.close_code == answer.close_code, seen
    elif answer.ack is not None:
        assert kinds == ["ack", "ack"], seen
        got = Ack.model_validate(seen.messages[0])
        assert (got.seq, got.accepted) == (answer.ack.seq, answer.ack.accepted), seen
        assert [r.index for r in got.rejected] == [r.index for r in answer.ack.rejected], seen
    else:
        assert kinds == ["ack"] and seen.close_code == 1000, seen


def test_a_real_hub_answers_every_frame_as_promised_and_keeps_serving(
    hub: tuple[HubThread, str], influxdb: LocalServer, influx_db_name: str
) -> None:
    """Each fuzz frame gets its promised answer from a live hub, and a well-behaved device on
    the same hub is acked after every one, with all its readings in InfluxDB; memory bounded."""
    thread, token = hub
    url = f"{thread.service.url}/v1/ws"
    memory: list[float] = []

    @settings(
        max_examples=LIVE_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(frame=frames())
    def one_frame(frame: bytes) -> None:
        if len(memory) == 20:  # after a warm-up: imports, caches, first connections
            memory.append(rss_mib())
        answer = expected_answer(frame)
        check_seen(asyncio.run(send_one(url, token, frame)), answer)
        thread.store_good_reading()
        memory.append(rss_mib())

    one_frame()
    grown = memory[-1] - memory[20] if len(memory) > 21 else 0.0
    assert grown < MEMORY_BOUND_MIB, f"RSS grew {grown:.1f} MiB over the live fuzz run"
    thread.call(thread.service.hub.pipeline.drain)
    stored = influxql(influxdb.url, influx_db_name, 'SELECT count("v") FROM "good_device"')
    assert stored and stored[0]["count"] == thread.good_acked, stored
