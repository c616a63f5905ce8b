"""Frames that could be expensive: read by their msgpack headers, decoded a slice at a time.

No I/O here. Decoding, validating and freeing cost about a quarter of a microsecond per
msgpack object, and a frame of N bytes holds at most N objects (every object takes at least
one byte). So a frame of at most `FAST_PATH_BYTES` costs a few milliseconds whatever it
holds, and goes to `hub.protocol.decode_frame` whole, as it always did: the usual message,
tens of readings, pays nothing here.

A larger frame is scanned first, and nothing in it is built yet: the message map key by key
(values the protocol wants as scalars are skipped, not decoded, when they are containers),
then each reading (or Telegraf metric) as a byte span found by `Unpacker.skip()`, which walks
an object in C without building it (~10 ns an object). `read_map_header` and
`read_array_header` raise `ValueError` on a type mismatch without consuming anything, but
consume the header when they succeed, so the kind of the next object is read from its first
byte instead (`_kind`).

The readings are then decoded and validated in slices of at most `SLICE_BYTES`
(`prepare_in_slices`), yielding between slices so that the caller can let the event loop run:

- a reading that is a msgpack array is refused as the container it is: the validator sees an
  empty list in its place, so it is rejected with the same reason as in a small frame, and
  none of its contents is built;
- a reading larger than `SLICE_BYTES` has its headers walked first, and is rejected without
  being built if it holds more than `MAX_READING_OBJECTS` objects (a smaller reading cannot,
  since objects never outnumber bytes);
- every decoded slice is counted and depth-checked in one breadth-first pass; past
  `max_objects` objects in the frame, it is refused (`InvalidMessage`, close 1007).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from hub.errors import InvalidMessage
from hub.protocol import (
    DEFAULT_MAX_DEPTH,
    DeviceEvent,
    ReadingsFrame,
    TelegrafFrame,
    decode_frame,
    decoder_limits,
    describe_decoder_error,
    plain_readings_envelope,
    validate_envelope,
)
from hub.readings import PreparedReadings
from schemas.messages import ConfigAck

FAST_PATH_BYTES = 16 * 1024
"""Frames up to this size are decoded whole: at most this many objects, a few ms of work."""
SLICE_BYTES = FAST_PATH_BYTES
"""Readings decoded and validated between two yields: the same bound, for the same reason."""
MAX_READING_OBJECTS = SLICE_BYTES
"""A reading holding more msgpack objects is rejected without being built. The largest
valid reading holds about 300 (100 fields, 32 tags); keys the hub ignores make up the rest."""
WALK_YIELD_OBJECTS = 4096
"""Objects a header walk visits between two yields."""

READING_TOO_BIG = f"a reading may hold at most {MAX_READING_OBJECTS} msgpack objects"

_MAP_HEADERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])
_ARRAY_HEADERS = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])
_STR_HEADERS = frozenset([*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB])


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """What one device frame may hold; the settings of the same meaning."""

    max_readings: int
    max_depth: int = DEFAULT_MAX_DEPTH
    max_objects: int = 2**18


@dataclass(frozen=True, slots=True)
class ItemSpans:
    """Readings (or metrics) of a frame, not decoded: item i is `frame[bounds[i]:bounds[i + 1]]`."""

    frame: bytes
    bounds: list[int]

    def __len__(self) -> int:
        return len(self.bounds) - 1


@dataclass(frozen=True, slots=True)
class SlicedReadings:
    """A large `readings` message whose envelope is valid; readings still undecoded."""

    seq: int
    readings: ItemSpans


@dataclass(frozen=True, slots=True)
class SlicedTelegraf:
    """A large Telegraf frame; `undecodable` counts a trailing part that was not a metric."""

    metrics: ItemSpans
    undecodable: int = 0


FrameEvent = DeviceEvent | SlicedReadings | SlicedTelegraf


def decode_device_frame(frame: bytes, limits: FrameLimits) -> FrameEvent:
    """Decode a frame, or scan a large one; `InvalidMessage` if it breaks the protocol."""
    if len(frame) <= min(FAST_PATH_BYTES, limits.max_objects):
        return decode_frame(frame, limits.max_readings, limits.max_depth)
    return scan_frame(frame, limits)


def event_items(event: FrameEvent) -> int:
    """How many readings (or metrics) an event carries, decoded or not; 0 for a `config_ack`."""
    if isinstance(event, ReadingsFrame | SlicedReadings):
        return len(event.readings)
    if isinstance(event, TelegrafFrame | SlicedTelegraf):
        return len(event.metrics)
    return 0


class _Skipped:
    """Stands for a container skipped where the protocol wants a scalar (the model refuses it)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<container>"


def _kind(frame: bytes, offset: int) -> str:
    """'map', 'array', 'str' or 'other': what the object starting at `offset` is ('other'
    past the end, where reading it raises `OutOfData`)."""
    if offset >= len(frame):
        return "other"
    header = frame[offset]
    if header in _MAP_HEADERS:
        return "map"
    if header in _ARRAY_HEADERS:
        return "array"
    return "str" if header in _STR_HEADERS else "other"


def _unpacker(frame: bytes, max_readings: int) -> Any:
    unpacker = msgpack.Unpacker(max_buffer_size=len(frame), **decoder_limits(frame, max_readings))
    unpacker.feed(frame)
    return unpacker


def scan_frame(frame: bytes, limits: FrameLimits) -> FrameEvent:
    """A frame's event, its readings (or metrics) left undecoded as byte spans, and its
    envelope read without building any container; `InvalidMessage` as `decode_frame`.

    `decode_device_frame` uses it for frames over `FAST_PATH_BYTES`; it gives the same
    answer for any frame (tests/test_frame_scan.py compares them).
    """
    try:
        return _scan_or_raise(frame, limits)
    except msgpack.OutOfData:
        raise InvalidMessage("empty or truncated msgpack") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise InvalidMessage(
            f"not valid msgpack: {describe_decoder_error(exc, limits.max_readings)}"
        ) from None


def _scan_or_raise(frame: bytes, limits: FrameLimits) -> FrameEvent:
    unpacker = _unpacker(frame, limits.max_readings)
    first = _kind(frame, 0)
    if first != "map":
        kind = "list" if first == "array" else type(unpacker.unpack()).__name__
        raise InvalidMessage(f"a frame must be a msgpack map, not {kind}")
    message: dict[str, Any] = {}
    spans: list[int] | None = None
    for _ in range(unpacker.read_map_header()):
        if _kind(frame, unpacker.tell()) != "str":
            raise InvalidMessage("not valid msgpack: map keys must be strings")
        key = unpacker.unpack()
        where = unpacker.tell()
        value_kind = _kind(frame, where)
        if key == "readings" and value_kind == "array":
            count = unpacker.read_array_header()
            if count > limits.max_readings:
                raise InvalidMessage(
                    f"readings: {count} readings, at most {limits.max_readings} a message"
                )
            spans = _spans(unpacker, count)
            message[key] = spans[1:]  # a list as long as the readings, for the envelope checks
        elif value_kind in ("map", "array"):
            unpacker.skip()
            message[key] = _Skipped()
        else:
            message[key] = unpacker.unpack()
    if "type" not in message:
        if "name" in message and "fields" in message:
            return _telegraf(frame, limits)
        raise InvalidMessage("the map has no 'type' key")
    if unpacker.tell() != len(frame):
        raise InvalidMessage("trailing bytes after the message map")
    kind = message["type"]
    if kind == "readings":
        if spans is not None and plain_readings_envelope(message) is not None:
            return SlicedReadings(message["seq"], ItemSpans(frame, spans))
        validate_envelope(message)  # explains what is wrong, as for a small frame
        raise InvalidMessage("readings: Input should be a valid list")
    if kind == "config_ack":
        return validate_envelope(message, ConfigAck)
    if isinstance(kind, str):
        raise InvalidMessage(f"unknown message type {kind[:100]!r}")
    raise InvalidMessage(f"'type' must be a string, not {type(kind).__name__}")


def _spans(unpacker: Any, count: int) -> list[int]:
    bounds = [unpacker.tell()]
    for _ in range(count):
        unpacker.skip()  # C, builds nothing; msgpack's own stack limit still applies
        bounds.append(unpacker.tell())
    return bounds


def _telegraf(frame: bytes, limits: FrameLimits) -> SlicedTelegraf:
    unpacker = _unpacker(frame, limits.max_readings)
    bounds = [0]
    undecodable = 0
    while bounds[-1] < len(frame):
        if len(bounds) > limits.max_readings:
            raise InvalidMessage(f"Telegraf frame holds more than {limits.max_readings} metrics")
        try:
            unpacker.skip()
        except (ValueError, TypeError, msgpack.UnpackException):
            undecodable = 1  # a truncated or broken tail: the metrics before it still count
            break
        bounds.append(unpacker.tell())
    return SlicedTelegraf(ItemSpans(frame, bounds), undecodable)


PrepareSlice = Callable[[list[Any], int], PreparedReadings]
"""Validate and format decoded readings, the first of which has the given index in its
message (for time-less readings' stamps); reasons indexed from 0 within the slice."""


def prepare_in_slices(
    items: ItemSpans, prepare: PrepareSlice, limits: FrameLimits, *, stream: bool = False
) -> Generator[None, None, PreparedReadings]:
    """Decode, check and prepare `items` a slice at a time (`slice_plan`); yields between
    slices, and while walking a large reading.

    The result is what `prepare` would return for all of them at once. Raises
    `InvalidMessage` when the frame holds more than `limits.max_objects` objects, nests
    deeper than `limits.max_depth`, or does not decode; in a Telegraf `stream` an
    undecodable metric ends it instead, counted in `undecodable`, as `decode_frame` does.
    """
    parts: list[PreparedReadings] = []
    objects = 0
    for part in slice_plan(items):
        try:
            if part.big:
                walked = yield from _walk(items, part.first, limits.max_readings)
                if walked is None:
                    parts.append(_too_big(part.first))  # indexed in the message already
                    objects += MAX_READING_OBJECTS
                    continue
            readings = _decode(items, part, limits.max_readings)
            broken = False
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            readings = [] if part.big else _decodable_prefix(items, part, limits.max_readings)
            if not stream or part.first + len(readings) == 0:  # a frame's first map must decode
                detail = describe_decoder_error(exc, limits.max_readings)
                raise InvalidMessage(f"not valid msgpack: {detail}") from None
            broken = True
        if objects + len(items.frame) - items.bounds[part.first] <= limits.max_objects:
            # Whatever the rest holds, it cannot pass the cap (objects never outnumber
            # bytes): no need to count, and prepare_readings checks the depth that matters.
            objects += items.bounds[part.end] - items.bounds[part.first]
        else:
            objects += check_depth_counting(readings, limits.max_depth)
        if objects > limits.max_objects:
            raise InvalidMessage(f"a frame may hold at most {limits.max_objects} msgpack objects")
        if readings:
            parts.append(prepare(readings, part.first).shifted(part.first))
        del readings  # freed here, while it is still in the CPU's cache
        if broken:
            parts.append(PreparedReadings("", 0, {}, undecodable=1))
            break
        yield
    return merge_prepared(parts)


def _decodable_prefix(items: ItemSpans, part: Slice, max_readings: int) -> list[Any]:
    """The readings of `part` before the first that does not decode, one at a time."""
    readings: list[Any] = []
    for index in range(part.first, part.end):
        if index in part.arrays:
            readings.append([])
            continue
        body = items.frame[items.bounds[index] : items.bounds[index + 1]]
        try:
            readings.append(msgpack.unpackb(body, **decoder_limits(body, max_readings)))
        except (ValueError, TypeError, msgpack.UnpackException):
            break
    return readings


def prepare_list_in_slices(
    readings: list[Any], prepare: PrepareSlice
) -> Generator[None, None, PreparedReadings]:
    """`prepare` readings decoded already (a small frame), `SLICE_ITEMS` at a time with a
    yield between: 5,000 readings of one byte each still cost milliseconds to reject."""
    parts: list[PreparedReadings] = []
    for first in range(0, len(readings), SLICE_ITEMS):
        if first:
            yield
        parts.append(prepare(readings[first : first + SLICE_ITEMS], first).shifted(first))
    return merge_prepared(parts)


SLICE_ITEMS = 1024
"""Readings in one slice at most: a reading that is one byte (nil, an empty array) costs no
decoding but a microsecond or two to reject."""


@dataclass(frozen=True, slots=True)
class Slice:
    """Readings `first` to `end` (exclusive) of a message, prepared between two yields."""

    first: int
    end: int
    big: bool = False
    """One reading larger than `SLICE_BYTES`: its headers are walked before it is decoded."""
    arrays: tuple[int, ...] = ()
    """Indices of its readings that are arrays: refused as they are, never decoded."""


def slice_plan(items: ItemSpans) -> Iterator[Slice]:
    """Slices covering `items` in order: at most `SLICE_BYTES` of the frame and `SLICE_ITEMS`
    readings each, or one reading larger than `SLICE_BYTES` alone."""
    frame, bounds = items.frame, items.bounds
    count = len(items)
    first = 0
    while first < count:
        start = bounds[first]
        # The furthest end whose readings fit in a slice: a binary search, not a walk.
        last = min(count, first + SLICE_ITEMS)
        end = bisect.bisect_right(bounds, start + SLICE_BYTES, first + 1, last + 1) - 1
        if end <= first:  # one reading larger than a slice
            if frame[start] in _ARRAY_HEADERS:
                yield Slice(first, first + 1, arrays=(first,))
            else:
                yield Slice(first, first + 1, big=True)
            first += 1
            continue
        arrays = tuple(i for i in range(first, end) if frame[bounds[i]] in _ARRAY_HEADERS)
        yield Slice(first, end, arrays=arrays)
        first = end


def _decode(items: ItemSpans, part: Slice, max_readings: int) -> list[Any]:
    """The readings of `part`, decoded, with an empty list standing for each array reading:
    the validator refuses it as it would the array, whose contents are never built."""
    readings: list[Any] = []
    start = part.first
    for stop in (*part.arrays, part.end):
        if start < stop:
            body = items.frame[items.bounds[start] : items.bounds[stop]]
            packed = b"\xdd" + (stop - start).to_bytes(4, "big") + body  # array 32 of them
            readings += msgpack.unpackb(packed, **decoder_limits(packed, max_readings))
        if stop < part.end:
            readings.append([])
        start = stop + 1
    return readings


def _walk(items: ItemSpans, index: int, max_readings: int) -> Generator[None, None, int | None]:
    """Objects in item `index`, counted from its headers; None past `MAX_READING_OBJECTS`.
    Yields every `WALK_YIELD_OBJECTS` objects."""
    body = items.frame[items.bounds[index] : items.bounds[index + 1]]
    unpacker = _unpacker(body, max_readings)
    most = MAX_READING_OBJECTS
    pending = 1  # objects still to visit
    seen = 0
    while pending:
        pending -= 1
        seen += 1
        if seen > most:
            return None
        kind = _kind(body, unpacker.tell())
        if kind == "map":
            pending += 2 * unpacker.read_map_header()
        elif kind == "array":
            pending += unpacker.read_array_header()
        else:
            unpacker.skip()
        if seen % WALK_YIELD_OBJECTS == 0:
            yield
    return seen


def _too_big(index: int) -> PreparedReadings:
    return PreparedReadings(lines="", accepted=0, reasons={index: [READING_TOO_BIG]})


def check_depth_counting(readings: list[Any], max_depth: int) -> int:
    """Objects in `readings`, the list itself not counted; `InvalidMessage` if they nest
    deeper than a frame may (`max_depth`), the list sitting at level 2 as in a message.

    Breadth first like `hub.protocol.check_depth`: every value looked at once, no recursion.
    """
    count = len(readings)
    level: list[Any] = [item for item in readings if type(item) is dict or type(item) is list]
    for _ in range(max_depth - 2):  # readings are level 3; levels 3 .. max_depth may nest
        if not level:
            return count
        count += sum(2 * len(c) if type(c) is dict else len(c) for c in level)
        level = [
            item
            for container in level
            for item in (container.values() if type(container) is dict else container)
            if type(item) is dict or type(item) is list
        ]
    if level:
        raise InvalidMessage(f"maps and arrays nest deeper than {max_depth} levels")
    return count


def merge_prepared(parts: list[PreparedReadings]) -> PreparedReadings:
    """Parts of one message's readings, prepared slice by slice, as one `PreparedReadings`;
    each part's reasons indexed within the whole message."""
    if len(parts) == 1:
        return parts[0]
    reasons: dict[int, list[str]] = {}
    for part in parts:
        reasons.update(part.reasons)
    return PreparedReadings(
        lines="\n".join(part.lines for part in parts if part.lines),
        accepted=sum(part.accepted for part in parts),
        reasons=reasons,
        undecodable=sum(part.undecodable for part in parts),
    )
