"""Readings of a large frame, decoded, checked and prepared a slice at a time. No I/O here.

`hub.frames` scans a large frame into byte spans without building anything; its readings are
decoded and validated here, in slices of at most `SLICE_BYTES` and
`SLICE_ITEMS` readings (`slice_plan`, `prepare_in_slices`), yielding between slices so that
the caller can let the event loop run (a small frame of many readings is prepared
`SLICE_ITEMS` at a time too: `prepare_list_in_slices`):

- a reading that is a msgpack array is refused as the container it is: the validator sees an
  empty list in its place, so it is rejected with the same reason as in a small frame, and
  none of its contents is built;
- a reading larger than `SLICE_BYTES` has its headers walked first, and is rejected without
  being built if it holds more than `MAX_READING_OBJECTS` objects (a smaller reading cannot,
  since objects never outnumber bytes);
- every decoded slice is counted and depth-checked in one breadth-first pass, unless the rest
  of the frame has fewer bytes than the cap has room for; past `max_objects` objects in the
  frame, it is refused (`InvalidMessage`, close 1007).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from hub.core.frames import (
    ARRAY_HEADERS,
    FAST_PATH_BYTES,
    FrameLimits,
    ItemSpans,
    item_unpacker,
    object_kind,
)
from hub.core.protocol import decoder_limits, describe_decoder_error
from hub.core.readings import PreparedReadings
from hub.errors import InvalidMessage

SLICE_BYTES = FAST_PATH_BYTES
"""Readings decoded and validated between two yields: the same bound, for the same reason."""
MAX_READING_OBJECTS = SLICE_BYTES
"""A reading holding more msgpack objects is rejected without being built. The largest
valid reading holds about 300 (100 fields, 32 tags); keys the hub ignores make up the rest."""
WALK_YIELD_OBJECTS = 4096
"""Objects a header walk visits between two yields."""

READING_TOO_BIG = f"a reading may hold at most {MAX_READING_OBJECTS} msgpack objects"

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
            if frame[start] in ARRAY_HEADERS:
                yield Slice(first, first + 1, arrays=(first,))
            else:
                yield Slice(first, first + 1, big=True)
            first += 1
            continue
        arrays = tuple(i for i in range(first, end) if frame[bounds[i]] in ARRAY_HEADERS)
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
    unpacker = item_unpacker(body, max_readings)
    most = MAX_READING_OBJECTS
    pending = 1  # objects still to visit
    seen = 0
    while pending:
        pending -= 1
        seen += 1
        if seen > most:
            return None
        kind = object_kind(body, unpacker.tell())
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
