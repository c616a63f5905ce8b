"""Large frames, read by their msgpack headers and prepared a slice at a time; no sockets.

`hub.frames` and `hub.slices` must give the answer the one-call decoder gives (same readings
stored, same rejections, same refusals), while never building a reading that is an array,
never decoding more than a slice between two yields, and refusing a frame past its object
cap.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings

from hub.core.dialects import Dialect
from hub.core.frames import (
    FAST_PATH_BYTES,
    FrameLimits,
    ItemSpans,
    SlicedReadings,
    SlicedTelegraf,
    decode_device_frame,
    scan_frame,
)
from hub.core.measurements import MeasurementSchemas, ReadingLimits
from hub.core.protocol import ReadingsFrame, TelegrafFrame, decode_frame, decoder_limits
from hub.core.readings import PreparedReadings, prepare_readings
from hub.core.slices import (
    MAX_READING_OBJECTS,
    READING_TOO_BIG,
    SLICE_BYTES,
    SLICE_ITEMS,
    check_depth_counting,
    prepare_in_slices,
    prepare_list_in_slices,
    slice_plan,
)
from hub.errors import InvalidMessage
from schemas.messages import ConfigAck
from tests.test_fuzz import frames as fuzz_frames

pytestmark = pytest.mark.unit

MS = 10**6
ARRIVAL_NS = 1_700_000_000 * 10**9
LIMITS = FrameLimits(max_readings=5000)
VALIDATOR = MeasurementSchemas().validator(MS, ReadingLimits.defaults())
GOOD: dict[str, Any] = {"name": "env", "tags": {"room": "hall"}, "fields": {"t": 21.5}}


def pack(obj: object) -> bytes:
    """msgpack as a device would send it."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def message(readings: list[Any], seq: int = 1) -> bytes:
    """A readings message."""
    return pack({"type": "readings", "seq": seq, "readings": readings})


def prepare(readings: list[Any], first_index: int) -> PreparedReadings:
    """What a session does with a slice."""
    return prepare_readings(readings, VALIDATOR, "dev", MS, ARRIVAL_NS + first_index)


def run(steps: Any) -> tuple[PreparedReadings, int]:
    """Drive `prepare_in_slices` to the end: its result and how many times it yielded."""
    yields = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value, yields
        yields += 1


def answer(frame: bytes, decode: Callable[[bytes, FrameLimits], Any], limits: FrameLimits) -> Any:
    """What the hub would do with `frame` decoded by `decode`, comparable between decoders."""
    undecodable = None
    try:
        event = decode(frame, limits)
        if isinstance(event, ReadingsFrame | TelegrafFrame):
            raw = event.readings if isinstance(event, ReadingsFrame) else event.metrics
            depth = limits.max_depth
            strict = Dialect.STRICT
            prepared = prepare_readings(raw, VALIDATOR, "dev", MS, ARRIVAL_NS, strict, depth)
        elif isinstance(event, SlicedReadings):
            prepared, _ = run(prepare_in_slices(event.readings, prepare, limits))
        elif isinstance(event, SlicedTelegraf):
            prepared, _ = run(prepare_in_slices(event.metrics, prepare, limits, stream=True))
        else:
            return ("config_ack", event)
    except InvalidMessage:
        return "invalid"
    if isinstance(event, TelegrafFrame | SlicedTelegraf):
        undecodable = event.undecodable or prepared.undecodable
    seq = getattr(event, "seq", None)
    return (seq, undecodable, prepared.lines, prepared.accepted, prepared.reasons)


def undecodable_array_item(frame: bytes) -> bool:
    """Whether a reading (or metric) of `frame` is an array that does not decode alone.

    The one place where the scan answers differently, by design: it never builds an array
    reading, so what is wrong inside one (bad UTF-8, a non-string key, an unknown
    extension) goes unseen, and the reading is rejected like any array.
    """
    try:
        event = scan_frame(frame, FrameLimits(max_readings=10**6, max_depth=10**6))
    except InvalidMessage:
        return False
    if not isinstance(event, SlicedReadings | SlicedTelegraf):
        return False
    items = event.readings if isinstance(event, SlicedReadings) else event.metrics
    for index in range(len(items)):
        body = items.frame[items.bounds[index] : items.bounds[index + 1]]
        if body[:1] and body[0] in (*range(0x90, 0xA0), 0xDC, 0xDD):
            try:
                msgpack.unpackb(body, **decoder_limits(body, 10**6))
            except (ValueError, TypeError, msgpack.UnpackException):
                return True
    return False


def one_call(frame: bytes, limits: FrameLimits) -> Any:
    return decode_frame(frame, limits.max_readings, limits.max_depth)


def assert_same(frame: bytes, limits: FrameLimits = LIMITS) -> Any:
    """The scan gives the one-call decoder's answer; return it."""
    expected = answer(frame, one_call, limits)
    assert answer(frame, scan_frame, limits) == expected
    return expected


# --- The same answer as the one-call decoder ------------------------------------------------


ODD_READINGS: list[Any] = [
    GOOD,
    {"name": "env", "fields": {"t": 1}},  # no time: stamped arrival + index
    [],
    [1, [2, [3]]],
    None,
    "text",
    {"name": "env", "fields": {"t": None}},
    {"name": "env", "fields": {"t": 1.0}, "ignored": {"a": [1, 2, {"b": None}]}},
    {"name": "", "fields": {}},
    {"fields": {"t": 1.0}},
    7,
    {"name": "env", "fields": {"t": 1.0}, "time": msgpack.Timestamp(1_700_000_000, 5)},
]


@pytest.mark.parametrize("copies", [1, 100, 416])
def test_mixed_readings_get_the_same_answer(copies: int) -> None:
    """Valid, invalid, array, scalar and time-less readings: same lines, counts, reasons."""
    found = assert_same(message(ODD_READINGS * copies))
    assert found != "invalid" and found[3] == 4 * copies  # four are valid


@pytest.mark.parametrize(
    "frame",
    [
        pack({"type": "readings", "seq": 1, "readings": [GOOD], "x": [[{}] * 100] * 100}),
        pack({"type": "readings", "seq": [[{}] * 100] * 100, "readings": [GOOD]}),
        pack({"type": "readings", "seq": 1, "readings": {"a": [{}] * 10000}}),
        pack({"type": "readings", "seq": 1, "readings": []}),
        pack({"type": ["x"] * 10000, "seq": 1}),
        pack({"type": "nonsense", "x": "y" * 20000}),
        pack({"type": "readings", "seq": 1, "readings": [GOOD] * 10}) + b"\xc0" * 20000,
        pack({"type": "readings", "seq": -1, "readings": [GOOD] * 2000}),
        pack({"type": "readings", "seq": 1, "readings": [GOOD] * 6000}),
        pack({"seq": 1, "readings": [GOOD] * 2000}),
        pack([GOOD] * 2000),
        pack("x" * 20000),
        pack({"type": "readings", "seq": 1, "readings": [{**GOOD, "x": [[[[[[[1]]]]]]]}] * 900}),
        pack({"type": "readings", "seq": 1, "readings": [GOOD] * 900})[:-5],
    ],
    ids=[
        "container-beside-readings",
        "container-seq",
        "readings-a-map",
        "readings-empty",
        "type-a-list",
        "unknown-type",
        "trailing-bytes",
        "negative-seq",
        "too-many-readings",
        "no-type",
        "an-array",
        "a-string",
        "deep-reading",
        "truncated",
    ],
)
def test_bad_envelopes_are_refused_the_same_way(frame: bytes) -> None:
    """Every malformed large frame is refused by the scan as by the one-call decoder."""
    assert assert_same(frame) == "invalid"


def test_large_config_ack_is_the_same() -> None:
    """A config_ack with a long error text (a large frame) decodes to the same model."""
    frame = pack({"type": "config_ack", "version": 3, "ok": False, "error": "e" * 30000})
    assert len(frame) > FAST_PATH_BYTES
    expected = assert_same(frame)
    assert expected[0] == "config_ack" and isinstance(expected[1], ConfigAck)


@pytest.mark.parametrize("tail", [b"", b"\x92\x01"], ids=["whole", "truncated-tail"])
def test_large_telegraf_stream_is_the_same(tail: bytes) -> None:
    """A Telegraf stream over the fast-path size: same metrics stored, same truncated tail."""
    metric = {**GOOD, "time": msgpack.Timestamp(1_700_000_000, 0)}
    frame = b"".join(pack(m) for m in [metric, [1, 2], {"name": "x"}] * 600) + tail
    event = decode_device_frame(frame, LIMITS)
    assert isinstance(event, SlicedTelegraf)
    assert assert_same(frame)[1] == (1 if tail else 0)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(fuzz_frames())
def test_fuzzed_frames_get_the_same_answer(frame: bytes) -> None:
    """Whatever the fuzzer's hostile frames hold, scan and one-call decoder agree, but for
    what is wrong inside an array reading, which the scan never decodes."""
    limits = FrameLimits(max_readings=50, max_depth=8)
    expected = answer(frame, one_call, limits)
    if answer(frame, scan_frame, limits) != expected:
        assert undecodable_array_item(frame), frame


# --- What the scan never builds -------------------------------------------------------------


def hostile_arrays() -> bytes:
    """Issue 16's frame: 5,000 readings, each an array of 205 empty maps (~1 MiB)."""
    return message([[{}] * 205] * 5000)


def peak_bytes(work: Callable[[], object]) -> int:
    """The most memory Python allocated while `work` ran."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_array_readings_are_rejected_without_being_built() -> None:
    """The million empty maps of issue 16's frame are never built: memory stays near the
    frame's size (one-call decoding allocates dozens of MiB), and every reading is rejected."""
    frame = hostile_arrays()
    result: list[PreparedReadings] = []

    def scan_and_prepare() -> None:
        event = decode_device_frame(frame, LIMITS)
        assert isinstance(event, SlicedReadings)
        result.append(run(prepare_in_slices(event.readings, prepare, LIMITS))[0])

    scanned = peak_bytes(scan_and_prepare)
    whole = peak_bytes(lambda: decode_frame(frame, 5000))
    print(f"peak memory: scan {scanned / 2**20:.1f} MiB, one-call decode {whole / 2**20:.1f} MiB")
    assert scanned < 8 * 2**20 < whole
    assert result[0].accepted == 0 and sorted(result[0].reasons) == list(range(5000))


def test_a_reading_over_the_object_cap_is_rejected_unbuilt() -> None:
    """A reading over SLICE_BYTES holding more than MAX_READING_OBJECTS objects is rejected
    with its reason; one as large holding few objects (long strings) is accepted."""
    crowded = {**GOOD, "junk": [None] * (MAX_READING_OBJECTS + 10)}
    roomy = {"name": "env", "fields": {f"s{n}": "x" * 4000 for n in range(6)}}
    event = scan_frame(message([GOOD, crowded, roomy]), LIMITS)
    assert isinstance(event, SlicedReadings)
    prepared, _ = run(prepare_in_slices(event.readings, prepare, LIMITS))
    assert prepared.accepted == 2
    assert prepared.reasons == {1: [READING_TOO_BIG]}


def test_frame_over_the_object_cap_is_refused() -> None:
    """A frame whose readings hold more than max_objects objects is refused (1007)."""
    frame = message([{**GOOD, "junk": [None] * 200}] * 200)
    limits = FrameLimits(max_readings=5000, max_objects=20_000)
    event = decode_device_frame(frame, limits)
    assert isinstance(event, SlicedReadings)
    with pytest.raises(InvalidMessage, match="at most 20000 msgpack objects"):
        run(prepare_in_slices(event.readings, prepare, limits))
    generous = FrameLimits(max_readings=5000, max_objects=100_000)
    assert run(prepare_in_slices(event.readings, prepare, generous))[0].accepted == 200


def test_frames_within_the_cap_in_bytes_take_the_fast_path() -> None:
    """A frame no longer than the object cap cannot exceed it (each object is at least a
    byte), so it is decoded whole; a longer one is scanned."""
    small = message([GOOD] * 100)
    assert len(small) < FAST_PATH_BYTES
    assert isinstance(decode_device_frame(small, LIMITS), ReadingsFrame)
    tight = FrameLimits(max_readings=5000, max_objects=len(small) - 1)
    assert isinstance(decode_device_frame(small, tight), SlicedReadings)


def test_object_count_is_exact() -> None:
    """check_depth_counting counts every key, value, map and array below the list."""
    readings: list[Any] = [GOOD, [1, [2]], {"a": {"b": []}}, None]
    # GOOD: map + 3 keys + "env" + tags map + 1 pair + fields map + 1 pair = 1+3+1+1+2+1+2
    assert check_depth_counting(readings, 8) == 11 + 4 + 5 + 1
    with pytest.raises(InvalidMessage, match="nest deeper than 4"):
        check_depth_counting([{"a": {"b": [1]}}], 4)
    assert check_depth_counting([{"a": {"b": 1}}], 4) == 5


# --- Bounded work between two yields --------------------------------------------------------


def spans(frame: bytes) -> ItemSpans:
    event = scan_frame(frame, LIMITS)
    assert isinstance(event, SlicedReadings)
    return event.readings


BIG_STRING: dict[str, Any] = {**GOOD, "s": "x" * 40_000}


@pytest.mark.parametrize(
    "readings",
    [
        [GOOD] * 5000,
        [[{}] * 205] * 5000,
        [{**GOOD, "junk": [None] * 190}] * 5000,
        [GOOD, BIG_STRING, [1] * 3000, GOOD] * 5,
    ],
    ids=["valid", "arrays", "junk-keys", "mixed-big"],
)
def test_no_slice_decodes_more_than_slice_bytes(readings: list[Any]) -> None:
    """Slices cover every reading once, in order; each decodes at most SLICE_BYTES (so at most
    that many objects) and holds at most SLICE_ITEMS readings, unless it is one large reading,
    which is header-walked first."""
    items = spans(message(readings))
    plan = list(slice_plan(items))
    assert [p.first for p in plan] == [0] + [p.end for p in plan[:-1]]
    assert plan[-1].end == len(items)
    for part in plan:
        decoded = sum(
            items.bounds[i + 1] - items.bounds[i]
            for i in range(part.first, part.end)
            if i not in part.arrays
        )
        if part.big:
            assert part.end - part.first == 1 and decoded > SLICE_BYTES
        else:
            assert decoded <= SLICE_BYTES and part.end - part.first <= SLICE_ITEMS


def test_preparing_a_large_frame_yields_between_slices() -> None:
    """A 5000-reading frame is prepared in many steps, with the same result as in one."""
    readings = [{"name": "env", "fields": {"t": float(n)}} for n in range(5000)]
    items = spans(message(readings))
    prepared, yields = run(prepare_in_slices(items, prepare, LIMITS))
    assert yields >= len(items.frame) // SLICE_BYTES
    whole = prepare(readings, 0)
    assert (prepared.lines, prepared.accepted, prepared.reasons) == (
        whole.lines,
        whole.accepted,
        whole.reasons,
    )


def test_many_small_readings_are_prepared_in_slices_too() -> None:
    """A small frame of 5,000 one-byte readings is prepared SLICE_ITEMS at a time, with the
    result of one call."""
    readings: list[Any] = [None, GOOD, {"name": "env", "fields": {"t": 2.0}}] * 1700
    prepared, yields = run(prepare_list_in_slices(readings, prepare))
    assert yields == (len(readings) - 1) // SLICE_ITEMS
    whole = prepare(readings, 0)
    assert (prepared.lines, prepared.accepted, prepared.reasons) == (
        whole.lines,
        whole.accepted,
        whole.reasons,
    )
