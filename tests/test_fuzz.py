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
import gc
import os
import threading
import time
from collections.abc import Coroutine, Iterator
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
from hub.core.dialects import Dialect
from hub.core.fieldtypes import CONFLICT_MARK
from hub.core.measurements import MeasurementSchemas, ReadingLimits
from hub.core.protocol import (
    MAX_REASON_CHARS,
    MAX_REASONS_PER_READING,
    ReadingsFrame,
    TelegrafFrame,
    decode_frame,
)
from hub.core.readings import prepare_readings
from hub.errors import InvalidMessage
from hub.options import time_limits
from hub.settings import Settings
from schemas.messages import Ack
from tests.support import HubProcess, add_device, hub_settings

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
CORE_MEMORY_BOUND_MIB = 16
HUB_MEMORY_BOUND_MIB = 48
WARM_UP = 50

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


_VALIDATOR = MeasurementSchemas().validator(MS, LIMITS)


_TIME_LIMITS = time_limits(Settings())  # the default min_time and max_future_s


def expected_answer(frame: bytes, dialect: Dialect = Dialect.STRICT) -> Answer:
    """The pure core's answer to `frame`, after checking every promise it makes.

    In a dialect whose string values may hold line feeds (a hub writing to InfluxDB
    itself), points are counted, not parsed back, which the strict mode does.
    """
    multiline_strings = dialect.multiline_strings
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
    arrival_ns = time.time_ns()  # as the hub's clock, for the times it refuses
    prepared = prepare_readings(
        raw, _VALIDATOR, DEVICE, MS, arrival_ns, dialect, MAX_DEPTH, _TIME_LIMITS
    )
    indices = [rejection.index for rejection in prepared.rejected]
    assert indices == sorted(set(indices)) and all(0 <= i < len(raw) for i in indices)
    assert prepared.accepted + len(indices) == len(raw)
    for rejection in prepared.rejected:
        assert 1 <= len(rejection.errors) <= MAX_REASONS_PER_READING
        assert all(0 < len(error) <= MAX_REASON_CHARS for error in rejection.errors)
    accepted = [reading for i, reading in enumerate(raw) if i not in set(indices)]
    assert prepared.accepted == len(accepted)
    points = [] if multiline_strings else line_protocol_points(prepared.lines)
    assert multiline_strings or len(points) == prepared.accepted
    for (measurement, tags, fields), reading in zip(points, accepted, strict=False):
        assert measurement == reading["name"]
        sent_tags = {k: v for k, v in reading.get("tags", {}).items() if v and k != "device"}
        assert tags == {**sent_tags, "device": DEVICE}
        assert list(fields) == list(reading["fields"])
    if isinstance(event, TelegrafFrame):
        return Answer()
    ack = Ack(seq=event.seq, accepted=prepared.accepted, rejected=prepared.rejected)
    assert len(msgpack.packb(ack.model_dump())) <= 64 * 1024 + len(raw) * 64
    return Answer(ack=ack)


def rss_mib(pid: int | str = "self") -> float:
    """Resident memory of a process (this one by default), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


# --- Pure ------------------------------------------------------------------------------------

_seen_frames: list[bytes] = []
REPLAYS = 4


@pytest.mark.integration  # pure, but a fuzz run of seconds: kept out of the fast unit layer
@settings(max_examples=PURE_EXAMPLES, deadline=None, database=None)
@given(frame=frames())
def test_the_core_answers_every_frame_as_promised(frame: bytes) -> None:
    """Decoding and validating any frame gives error+1007, 1009, an ack or nothing; an ack
    accounts for every reading; accepted readings become exactly their own points."""
    if len(_seen_frames) < 5000:
        _seen_frames.append(frame)
    expected_answer(frame)


@pytest.mark.integration  # replays the frames above: the same layer as the fuzz run
def test_memory_stays_bounded_while_the_core_answers_fuzz_frames() -> None:
    """Answering the fuzz frames again and again does not grow resident memory.

    Hypothesis's own bookkeeping grows while it draws, so the frames it drew are replayed
    here, without it: the first pass warms the caches, growth is measured over the rest.
    """
    assert _seen_frames, "run with test_the_core_answers_every_frame_as_promised"
    for frame in _seen_frames:
        expected_answer(frame)
    gc.collect()
    before = rss_mib()
    for _ in range(REPLAYS - 1):
        for frame in _seen_frames:
            expected_answer(frame)
    gc.collect()
    grown = rss_mib() - before
    assert grown < CORE_MEMORY_BOUND_MIB, f"RSS grew {grown:.1f} MiB over {REPLAYS - 1} replays"


# --- A real hub -----------------------------------------------------------------------------


class GoodDevice:
    """A well-behaved device with one long-lived connection, in its own thread and loop."""

    def __init__(self, url: str, token: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="good-device")
        self.thread.daemon = True
        self.client = DeviceClient(url, token)
        self.acked = 0

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(WAIT_S * 3)

    def connect(self) -> None:
        """Start the thread and connect."""
        self.thread.start()
        self._run(self.client.connect())

    def store_reading(self) -> None:
        """Send one reading and require its ack."""
        reading = {
            "name": "good_device",
            "time": 1_600_000_000_000 + self.acked,
            "fields": {"v": 1.0},
        }
        ack = self._run(asyncio.wait_for(self.client.store([reading]), WAIT_S))
        assert (ack.accepted, ack.rejected) == (1, []), ack
        self.acked += 1

    def close(self) -> None:
        """Close the connection and end the thread."""
        try:
            self._run(self.client.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT_S)
            self.loop.close()


T = TypeVar("T")


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
) -> Iterator[tuple[HubProcess, str]]:
    """`hub serve` as a child process (small limits, no rate limits), and the fuzzing
    device's token. A process of its own, so that its memory can be measured alone."""
    state = tmp_path / "state"
    registry = hub_settings(state, None)
    token = add_device(registry, DEVICE)
    limits = {
        "HUB_MAX_MESSAGE_BYTES": MAX_BYTES,
        "HUB_MAX_READINGS_PER_MESSAGE": MAX_READINGS,
        "HUB_MAX_NESTING_DEPTH": MAX_DEPTH,
        "HUB_MAX_FIELDS_PER_READING": LIMITS.max_fields,
        "HUB_MAX_TAGS_PER_READING": LIMITS.max_tags,
        "HUB_MAX_NAME_CHARS": LIMITS.max_name_chars,
        "HUB_MAX_STRING_CHARS": LIMITS.max_string_chars,
        "HUB_DEVICE_MESSAGES_PER_S": 1e6,
        "HUB_DEVICE_READINGS_PER_S": 1e9,
        "HUB_FLUSH_INTERVAL_S": 0.02,
    }
    env = {name: str(value) for name, value in limits.items()}
    process = HubProcess(state, influxdb, influx_db_name, "--influx-api", "v1", env=env)
    asyncio.run(process.start())
    try:
        yield process, token
    finally:
        asyncio.run(process.stop())


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
        promised = {r.index for r in answer.ack.rejected}
        # The hub also refuses a field whose type conflicts with what an earlier frame of
        # the run stored (one catalog per hub, `hub.fieldtypes`): only for that reason.
        conflicts = {r.index for r in got.rejected if CONFLICT_MARK in r.errors[0]} - promised
        assert got.rejected_indices() == promised | conflicts, seen
        assert (got.seq, got.accepted) == (answer.ack.seq, answer.ack.accepted - len(conflicts))
    else:
        assert kinds == ["ack"] and seen.close_code == 1000, seen


@pytest.mark.e2e
def test_a_real_hub_answers_every_frame_as_promised_and_keeps_serving(
    hub: tuple[HubProcess, str], influxdb: LocalServer, influx_db_name: str
) -> None:
    """Each fuzz frame gets its promised answer from a running hub, a well-behaved device on
    the same hub is acked after every one and has all its readings in InfluxDB, and the
    hub's resident memory stays bounded."""
    process, token = hub
    assert process.process is not None
    pid = process.process.pid
    state = process.state_dir
    good_device = GoodDevice(process.url, add_device(hub_settings(state, None), "dev-good"))
    good_device.connect()
    memory: list[float] = []

    @settings(
        max_examples=LIVE_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(frame=frames())
    def one_frame(frame: bytes) -> None:
        answer = expected_answer(frame, Dialect.INFLUXDB_1)  # the hub writes to InfluxDB 1.6
        check_seen(asyncio.run(send_one(f"{process.url}/v1/ws", token, frame)), answer)
        good_device.store_reading()
        memory.append(rss_mib(pid))

    try:
        one_frame()
    finally:
        good_device.close()
    warm = memory[min(WARM_UP, len(memory) - 1)]
    grown = memory[-1] - warm
    assert grown < HUB_MEMORY_BOUND_MIB, (
        f"the hub's RSS grew {grown:.1f} MiB (from {warm:.1f}) over {len(memory)} frames"
    )
    # Every acked reading of the good device reaches InfluxDB (the hub flushes within 20 ms).
    deadline = time.monotonic() + WAIT_S
    while True:
        rows = influxql(influxdb.url, influx_db_name, 'SELECT count("v") FROM "good_device"')
        if rows and rows[0]["count"] == good_device.acked:
            break
        assert time.monotonic() < deadline, (rows, good_device.acked)
        time.sleep(0.05)
