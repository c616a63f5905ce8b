"""Pure parts of the MicroPython client: its msgpack codec against the `msgpack` package,
its WebSocket framing against RFC 6455, its readings buffer and its reconnect policy."""

from __future__ import annotations

import datetime
import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sensorhub import mpack, policy, wsframe
from sensorhub.buffer import ReadingsBuffer, check_reading, encode_reading_body
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

# --- msgpack ------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=30,
)


@pytest.mark.unit
@given(values)
def test_encoding_decodes_with_msgpack(value: Any) -> None:
    """What the client encodes, the `msgpack` package decodes to the same value."""
    assert msgpack.unpackb(mpack.encode(value), raw=False, strict_map_key=False) == value


@pytest.mark.unit
@given(values)
def test_decoding_what_msgpack_encodes(value: Any) -> None:
    """What `msgpack` encodes (any integer or float width), the client decodes."""
    assert mpack.decode(msgpack.packb(value, use_bin_type=True)) == value


@pytest.mark.unit
@given(values)
def test_integers_and_headers_use_the_smallest_form(value: Any) -> None:
    """The client's bytes are msgpack's own bytes (both pick the smallest encoding)."""
    assert mpack.encode(value) == msgpack.packb(value, use_bin_type=True)


@pytest.mark.unit
@given(st.floats(width=32, allow_nan=False))
def test_float32_is_decoded(value: float) -> None:
    """A float32 from the hub (or msgpack's use_single_float) decodes to its value."""
    assert mpack.decode(msgpack.packb(value, use_single_float=True)) == value


@pytest.mark.unit
@given(
    st.integers(min_value=-(2**40), max_value=2**40),
    st.integers(min_value=0, max_value=999_999_999),
)
def test_timestamps_round_trip_with_msgpack(seconds: int, nanoseconds: int) -> None:
    """Timestamps in all three sizes mean the same instant to msgpack and to the client."""
    packed = mpack.encode(mpack.Timestamp(seconds, nanoseconds))
    theirs = msgpack.unpackb(packed)
    assert (theirs.seconds, theirs.nanoseconds) == (seconds, nanoseconds)
    mine = mpack.decode(msgpack.packb(msgpack.Timestamp(seconds, nanoseconds)))
    assert mine == mpack.Timestamp(seconds, nanoseconds)
    assert packed == msgpack.packb(msgpack.Timestamp(seconds, nanoseconds))


@pytest.mark.unit
def test_other_extensions_are_kept_opaque() -> None:
    """An extension type other than -1 decodes to `Ext` with its code and bytes."""
    assert mpack.decode(msgpack.packb(msgpack.ExtType(5, b"abc"))) == mpack.Ext(5, b"abc")


@pytest.mark.unit
@given(values)
def test_truncated_data_is_refused(value: Any) -> None:
    """Every strict prefix of an encoding is refused as truncated, never misread."""
    packed = mpack.encode(value)
    for end in range(len(packed)):
        with pytest.raises(mpack.Truncated):
            mpack.decode(packed[:end])


@pytest.mark.unit
def test_malformed_input_is_refused() -> None:
    """Trailing bytes, the unused 0xc1, deep nesting and a huge count are errors."""
    for bad in (b"\x01\x02", b"\xc1", b"\x91" * 40 + b"\x00", b"\xdd\xff\xff\xff\xff"):
        with pytest.raises(ValueError):
            mpack.decode(bad)


@pytest.mark.unit
def test_map_prefix_reads_an_ack_cut_short() -> None:
    """An ack cut anywhere in its `rejected` list still yields type, seq and accepted."""
    ack = msgpack.packb(
        {"type": "ack", "seq": 7, "accepted": 1,
         "rejected": [{"index": i, "errors": ["x" * 50]} for i in range(50)]}
    )  # fmt: skip
    head = len(msgpack.packb({"type": "ack", "seq": 7, "accepted": 1})) + 9
    for end in range(head, len(ack)):
        entries, complete = mpack.decode_map_prefix(ack[:end])
        assert entries == {"type": "ack", "seq": 7, "accepted": 1}
        assert not complete
    entries, complete = mpack.decode_map_prefix(ack)
    assert complete and len(entries["rejected"]) == 50  # type: ignore[arg-type]


@pytest.mark.unit
def test_refuses_what_msgpack_cannot_hold() -> None:
    """Integers outside int64/uint64 and unknown types are refused with a clear error."""
    with pytest.raises(OverflowError):
        mpack.encode(2**64)
    with pytest.raises(OverflowError):
        mpack.encode(-(2**63) - 1)
    with pytest.raises(TypeError, match="cannot encode set"):
        mpack.encode({1, 2})


# --- WebSocket framing --------------------------------------------------------------------


def parse_as_server(data: bytes | bytearray, max_size: int | None = None) -> Frame:
    """The frame `data` holds, read by websockets' own parser as the hub reads it."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=True, max_size=max_size)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    raise AssertionError("incomplete frame")


@pytest.mark.unit
@given(st.binary(max_size=70_000), st.binary(min_size=4, max_size=4))
def test_client_frames_parse_as_masked_frames(payload: bytes, key: bytes) -> None:
    """Every payload length (7-bit, 16-bit, 64-bit forms) comes out unmasked and intact."""
    frame = parse_as_server(wsframe.encode_frame(wsframe.OP_BINARY, payload, key))
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.BINARY, True, payload)


@pytest.mark.unit
@given(st.binary(max_size=2000), st.binary(min_size=4, max_size=4))
def test_chunked_masking_equals_the_bytewise_definition(payload: bytes, key: bytes) -> None:
    """Masking 256 bytes at a time gives RFC 6455's byte-by-byte XOR."""
    assert wsframe.mask(payload, key) == bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """An unmasked frame as the hub sends it."""
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        return struct.pack(">BB", first, size) + payload
    if size < 65536:
        return struct.pack(">BBH", first, 126, size) + payload
    return struct.pack(">BBQ", first, 127, size) + payload


@pytest.mark.unit
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=8), st.integers(1, 97))
def test_reader_splits_a_stream_into_frames(payloads: list[bytes], chunk: int) -> None:
    """Frames arriving in arbitrary chunks come out whole; longer ones truncated to the
    buffer, their rest skipped, and the next frame still read."""
    stream = b"".join(server_frame(wsframe.OP_BINARY, p) for p in payloads)
    reader = wsframe.FrameReader(max_payload=100)
    seen: list[tuple[bytes, int, bool]] = []
    for start in range(0, len(stream), chunk):
        piece = stream[start : start + chunk]
        while piece:
            space = reader.space()
            count = min(len(space), len(piece))
            space[:count] = piece[:count]
            reader.received(count)
            piece = piece[count:]
            while (frame := reader.next()) is not None:
                seen.append((bytes(frame.payload), frame.length, frame.truncated))
    assert seen == [(p[:100], len(p), len(p) > 100) for p in payloads]


@pytest.mark.unit
def test_reader_refuses_what_a_server_must_not_send() -> None:
    """A masked frame, reserved bits, or a long or fragmented control frame: 1002."""
    for bad in (
        b"\x82\x81abcd\x00",
        b"\xc2\x00",
        server_frame(wsframe.OP_PING, b"x" * 126),
        server_frame(wsframe.OP_PING, b"", fin=False),
    ):
        reader = wsframe.FrameReader(200)
        reader.feed(bad)
        with pytest.raises(wsframe.ProtocolViolation) as raised:
            reader.next()
        assert raised.value.code == 1002


@pytest.mark.unit
def test_close_payloads() -> None:
    """A close frame's code and reason, both ways; none at all is 1005."""
    assert wsframe.parse_close(wsframe.close_payload(4001, "revoked")) == (4001, "revoked")
    assert wsframe.parse_close(b"") == (1005, "")
    assert len(wsframe.close_payload(1000, "é" * 100)) <= 125


# --- readings buffer ----------------------------------------------------------------------


def add(buffer: ReadingsBuffer, index: int, time_ms: int | None = 1_750_000_000_000) -> bool:
    """Add reading number `index` to `buffer`."""
    entries, body = encode_reading_body("env", {"n": index}, {"room": "a"})
    return buffer.add(entries, body, time_ms, 0)


@pytest.mark.unit
def test_message_frame_is_a_valid_readings_message() -> None:
    """A message decodes to the protocol's envelope with every reading's keys and time."""
    buffer = ReadingsBuffer(100, 10, 16384)
    for index in range(3):
        add(buffer, index)
    message = buffer.next_message(lambda unix_ms, ticks: unix_ms)
    assert message is not None
    decoded = msgpack.unpackb(message.frame(2**40))
    assert decoded == {
        "type": "readings",
        "seq": 2**40,
        "readings": [
            {"name": "env", "time": 1_750_000_000_000, "tags": {"room": "a"}, "fields": {"n": i}}
            for i in range(3)
        ],
    }


@pytest.mark.unit
def test_buffer_bound_drops_the_oldest_pending_reading() -> None:
    """At the bound the oldest pending reading goes; readings already in messages stay."""
    buffer = ReadingsBuffer(5, 2, 16384)
    for index in range(4):
        add(buffer, index)
    buffer.next_message(lambda unix_ms, ticks: unix_ms)  # readings 0 and 1 in a message
    assert add(buffer, 4)
    assert not add(buffer, 5)  # 2 is dropped for it
    assert buffer.dropped == 1 and buffer.held() == 5
    pending = [msgpack.unpackb(mpack_reading(r))["fields"]["n"] for r in buffer.pending]
    assert pending == [3, 4, 5]


def mpack_reading(item: object) -> bytes:
    """A pending reading's bytes, with its time if it has none yet."""
    if isinstance(item, bytes):
        return item
    from sensorhub.buffer import Sample, finish_reading

    assert isinstance(item, Sample)
    return finish_reading(item.entries, item.body, item.unix_ms)


@pytest.mark.unit
def test_messages_respect_the_byte_limit() -> None:
    """A message never exceeds max_message_bytes, however many readings wait."""
    buffer = ReadingsBuffer(1000, 1000, 500)
    for index in range(100):
        add(buffer, index)
    sizes = []
    while (message := buffer.next_message(lambda unix_ms, ticks: unix_ms)) is not None:
        sizes.append(len(message.frame(2**63)))
    assert max(sizes) <= 500 and sum(len(m.readings) for m in buffer.unacked) == 100


@pytest.mark.unit
def test_reading_checks_say_what_is_wrong() -> None:
    """Readings the hub would refuse are refused at `add`, with the reason."""
    cases: list[tuple[Any, Any, Any, str]] = [
        ("", {"t": 1}, None, "non-empty"),
        ("env", {}, None, "at least one field"),
        ("env", {"t": math.nan}, None, "NaN"),
        ("env", {"t": [1]}, None, "float, int, bool or str"),
        ("env", {"t": 1}, {"room": 3}, "str to str"),
    ]
    for name, fields, tags, reason in cases:
        with pytest.raises((ValueError, TypeError), match=reason):
            check_reading(name, fields, tags)


@pytest.mark.unit
def test_untimed_samples_get_their_time_when_grouped() -> None:
    """A sample without a clock gets the time `resolve` gives when its message is made;
    with none, it goes without `time` (the hub stamps it)."""
    buffer = ReadingsBuffer(10, 10, 16384)
    add(buffer, 0, None)
    add(buffer, 1, None)
    first = buffer.next_message(lambda unix_ms, ticks: None)
    assert first is not None
    assert [("time" in r) for r in msgpack.unpackb(first.frame(1))["readings"]] == [False] * 2
    add(buffer, 2, None)
    second = buffer.next_message(lambda unix_ms, ticks: 1_750_000_000_123)
    assert second is not None
    (reading,) = msgpack.unpackb(second.frame(2))["readings"]
    when = datetime.datetime.fromtimestamp(reading["time"] / 1000, datetime.UTC)
    assert when.year == 2025


# --- reconnect policy ---------------------------------------------------------------------


@pytest.mark.unit
def test_policy_per_close_code() -> None:
    """4001 stops; 1007 drops the refused message; 1009 splits; 4000 waits long."""
    assert policy.after_close(4001)[0] == policy.STOP
    assert policy.after_close(1007)[0] == policy.DROP_OLDEST
    assert policy.after_close(1009)[0] == policy.SPLIT
    assert policy.after_close(4000) == (policy.RETRY, 60)
    assert policy.after_close(1006) == (policy.RETRY, 0)
    assert policy.after_refusal(503, 5) == (policy.RETRY, 5)
    assert policy.after_refusal(429, 300) == (policy.RETRY, 300)
    assert policy.after_refusal(401, None)[0] == policy.STOP


@pytest.mark.unit
def test_backoff_is_jittered_and_capped() -> None:
    """Waits stay within [floor, floor + min(cap, base * 2**attempt)] and are not all equal."""
    waits = [policy.backoff_ms(attempt, 1000, 8000) for attempt in range(30) for _ in range(5)]
    assert all(0 <= w <= 8000 for w in waits) and len(set(waits)) > 10
    assert all(5000 <= policy.backoff_ms(0, 1000, 8000, 5) <= 6000 for _ in range(50))


# --- tolerance of what a later hub may send -------------------------------------------------


@pytest.mark.integration
def test_acks_with_unknown_keys_and_collapsed_rejections_are_read() -> None:
    """An ack with extra keys, and `rejected` entries with extra keys or fewer entries than
    rejected readings, still acks its message; rejections are counted from `accepted`."""
    from sensorhub import HubClient
    from sensorhub.ws import WebSocket

    from sensorhub_client.connection import parse_ack

    client = HubClient("ws://127.0.0.1:1", "t" * 32, max_batch=10)
    for index in range(10):
        client.add("env", {"n": index}, time_ms=1_750_000_000_000 + index)
    message = client.buffer.next_message(client.clock.resolve)
    assert message is not None
    message.sent, message.seq = True, 5
    client.ws = WebSocket(1024)
    ack = {
        "type": "ack", "seq": 5, "accepted": 4, "budget": "exceeded",
        "rejected": [{"index": 0, "errors": ["x"], "count": 6}],
    }  # fmt: skip
    client._on_message(wsframe.OP_BINARY, memoryview(msgpack.packb(ack)), False)
    assert (client.acked, client.rejected, client.buffer.held()) == (4, 6, 0)
    parsed = parse_ack(ack)
    assert (parsed.seq, parsed.accepted, [r.index for r in parsed.rejected]) == (5, 4, [0])
