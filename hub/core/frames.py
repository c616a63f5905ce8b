"""Frames that could be expensive: read by their msgpack headers before anything is built.

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
byte instead (`object_kind`).

The readings are then decoded and checked a slice at a time: `hub.slices`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from hub.core.protocol import (
    DeviceEvent,
    ReadingsFrame,
    TelegrafFrame,
    decode_frame,
    decoder_limits,
    describe_decoder_error,
    plain_readings_envelope,
    validate_envelope,
)
from hub.errors import InvalidMessage
from hub.settings import Settings
from schemas.messages import ConfigAck

FAST_PATH_BYTES = 16 * 1024
"""Frames up to this size are decoded whole: at most this many objects, a few ms of work."""
_MAP_HEADERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])
ARRAY_HEADERS = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])
_STR_HEADERS = frozenset([*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB])


_DEFAULTS = Settings.model_fields


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """What one device frame may hold: `max_readings_per_message`, `max_nesting_depth` and
    `max_objects_per_message` (their defaults unless given)."""

    max_readings: int
    max_depth: int = _DEFAULTS["max_nesting_depth"].default
    max_objects: int = _DEFAULTS["max_objects_per_message"].default


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


def object_kind(frame: bytes, offset: int) -> str:
    """'map', 'array', 'str' or 'other': what the object starting at `offset` is ('other'
    past the end, where reading it raises `OutOfData`)."""
    if offset >= len(frame):
        return "other"
    header = frame[offset]
    if header in _MAP_HEADERS:
        return "map"
    if header in ARRAY_HEADERS:
        return "array"
    return "str" if header in _STR_HEADERS else "other"


def item_unpacker(frame: bytes, max_readings: int) -> Any:
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
    unpacker = item_unpacker(frame, limits.max_readings)
    first = object_kind(frame, 0)
    if first != "map":
        kind = "list" if first == "array" else type(unpacker.unpack()).__name__
        raise InvalidMessage(f"a frame must be a msgpack map, not {kind}")
    message: dict[str, Any] = {}
    spans: list[int] | None = None
    for _ in range(unpacker.read_map_header()):
        if object_kind(frame, unpacker.tell()) != "str":
            raise InvalidMessage("not valid msgpack: map keys must be strings")
        key = unpacker.unpack()
        where = unpacker.tell()
        value_kind = object_kind(frame, where)
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
    unpacker = item_unpacker(frame, limits.max_readings)
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
