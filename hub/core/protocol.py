"""Decoding device frames into protocol events, and encoding hub messages. No I/O here.

A frame is one msgpack map with a `type` key, or (the Telegraf form) a stream of concatenated
Telegraf metrics, recognised by a first map with `name` and `fields` and no `type`.

The decoder trusts nothing a frame declares. Lengths are bounded before anything is allocated
(a string or map by the frame's own size, an array by `max_readings`: the readings list is the
longest array of the protocol); map keys must be strings (msgpack-python also lets `bin`
through, which validation refuses where keys matter); no extension type but the timestamp
(-1); and containers nest at most `max_depth` deep (a readings message needs 4), checked
level by level without recursion. The readings of a readings message are checked after
validation (`check_readings_depth`), only where it rejected a reading or ignored a key: what
it accepted nests two levels by construction. The same rule, without walking every valid
reading twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import msgpack
from pydantic import BaseModel, ValidationError

from hub.errors import InvalidMessage
from schemas.messages import (
    ACK_LISTED_BYTES,
    MAX_HUB_FRAME_BYTES,
    UINT64_MAX,
    ConfigAck,
    ReadingsMessage,
)


@dataclass(frozen=True, slots=True)
class ReadingsFrame:
    """A `readings` message whose envelope is valid; readings not validated yet."""

    seq: int
    readings: list[Any]


@dataclass(frozen=True, slots=True)
class TelegrafFrame:
    """Telegraf metrics; `undecodable` counts trailing bytes that were not a metric."""

    metrics: list[Any]
    undecodable: int = 0


DeviceEvent = ReadingsFrame | TelegrafFrame | ConfigAck

_ENVELOPE = ReadingsMessage[Any]


DEFAULT_MAX_DEPTH = 8


def decoder_limits(frame: bytes, max_readings: int) -> dict[str, Any]:
    """msgpack-python options that bound what decoding `frame` may allocate (see above)."""
    size = max(len(frame), 1)
    return {
        "raw": False,
        "strict_map_key": True,
        "timestamp": 0,
        "ext_hook": _refuse_extension,
        "max_str_len": size,
        "max_bin_len": size,
        "max_array_len": max_readings,
        "max_map_len": size // 2,
        "max_ext_len": TIMESTAMP_MAX_BYTES,
    }


def decode_frame(
    frame: bytes, max_readings: int, max_depth: int = DEFAULT_MAX_DEPTH
) -> DeviceEvent:
    """Decode one binary frame; raise `InvalidMessage` when it breaks the protocol.

    It builds every object of the frame in one call: `hub.frames.decode_device_frame` sends
    only small frames here, and scans larger ones first.
    """
    size = max(len(frame), 1)
    limits = decoder_limits(frame, max_readings)
    try:
        # The usual frame: one message map, nothing after it. unpackb is cheaper than an
        # Unpacker; anything else (a Telegraf stream, trailing bytes, an error to describe)
        # takes the Unpacker below.
        first = msgpack.unpackb(frame, **limits)
        single = type(first) is dict and "type" in first
    except Exception:  # decoded again below, by the Unpacker that says what is wrong
        single = False
    if single:
        unpacker = None
    else:
        unpacker = msgpack.Unpacker(max_buffer_size=size, **limits)
        unpacker.feed(frame)
        try:
            first = unpacker.unpack()
        except msgpack.OutOfData:
            raise InvalidMessage("empty or truncated msgpack") from None
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise InvalidMessage(
                f"not valid msgpack: {describe_decoder_error(exc, max_readings)}"
            ) from None
    if not isinstance(first, dict):
        raise InvalidMessage(f"a frame must be a msgpack map, not {type(first).__name__}")
    if first.get("type") == "readings" and type(first.get("readings")) is list:
        # The readings themselves are checked when validation rejects them (see
        # `check_readings_depth`): a valid reading's shape is bounded already.
        check_depth({key: value for key, value in first.items() if key != "readings"}, max_depth)
    else:
        check_depth(first, max_depth)
    if "type" not in first:
        if "name" in first and "fields" in first and unpacker is not None:
            return _telegraf(first, unpacker, len(frame), max_readings, max_depth)
        raise InvalidMessage("the map has no 'type' key")
    if unpacker is not None and unpacker.tell() != len(frame):
        raise InvalidMessage("trailing bytes after the message map")
    kind = first["type"]
    if kind == "readings":
        frame_readings = plain_readings_envelope(first)
        if frame_readings is None:  # something to explain: the model says what
            envelope = validate_envelope(first)
            frame_readings = ReadingsFrame(seq=envelope.seq, readings=envelope.readings)
        if len(frame_readings.readings) > max_readings:
            raise InvalidMessage(
                f"readings: {len(frame_readings.readings)} readings, at most {max_readings} a "
                "message"
            )
        return frame_readings
    if kind == "config_ack":
        return validate_envelope(first, ConfigAck)
    if isinstance(kind, str):
        raise InvalidMessage(f"unknown message type {kind[:100]!r}")
    raise InvalidMessage(f"'type' must be a string, not {type(kind).__name__}")


def plain_readings_envelope(message: dict[str, Any]) -> ReadingsFrame | None:
    """The envelope of a `readings` map that `ReadingsMessage` accepts as it is, or None.

    Every readings message passes here, so the usual shape (exactly `type`, an unsigned
    64-bit `seq` and a non-empty list) is checked directly, without building a model;
    anything else returns None and goes to `ReadingsMessage`, which explains what is wrong.
    tests/test_protocol.py checks that both accept exactly the same envelopes.
    """
    seq = message.get("seq")
    readings = message.get("readings")
    if (
        len(message) == 3
        and type(seq) is int
        and 0 <= seq <= UINT64_MAX
        and type(readings) is list
        and readings
    ):
        return ReadingsFrame(seq, readings)
    return None


TIMESTAMP_MAX_BYTES = 12
"""The largest msgpack timestamp (timestamp 96); no other extension is read."""


def check_depth(value: dict[str, Any] | list[Any], max_depth: int) -> None:
    """Raise `InvalidMessage` if maps and arrays nest deeper than `max_depth` in `value`.

    Breadth first, one level at a time: no recursion, and each value is looked at once.
    """
    level: list[Any] = [value]
    for _ in range(max_depth):
        level = [
            item
            for container in level
            for item in (container.values() if type(container) is dict else container)
            if type(item) is dict or type(item) is list
        ]
        if not level:
            return
    raise InvalidMessage(f"maps and arrays nest deeper than {max_depth} levels")


READING_LEVEL = 3
"""How deep a reading sits in a readings message: the message map, its list, the reading."""


def check_readings_depth(
    readings: list[Any], indices: Iterable[int], max_depth: int = DEFAULT_MAX_DEPTH
) -> None:
    """Apply `check_depth` to the readings at `indices`, each counted from its message map.

    `decode_frame` leaves a readings message's readings to this: what validation accepted
    holds maps of scalars, so only rejected readings, and the keys validation ignored, can
    nest too deep.
    """
    for index in indices:
        reading = readings[index]
        # A reading that is not a map is rejected as it is, without looking inside: a large
        # frame's scan (`hub.frames`) never builds one, so its depth is not known there.
        if type(reading) is dict:
            check_depth(reading, max_depth - READING_LEVEL + 1)


def _refuse_extension(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of the protocol")


def encode(message: BaseModel) -> bytes:
    """Pack a hub -> device message as one msgpack map."""
    packed: bytes = msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)
    return packed


MAX_REASONS_PER_READING = 5
MAX_REASON_CHARS = 300
"""What an ack says about one rejected reading at most: its first reasons, each cut."""


def cut_reasons(errors: list[str]) -> list[str]:
    """A rejected reading's reasons as an ack carries them (see the constants above)."""
    return [
        error if len(error) <= MAX_REASON_CHARS else error[: MAX_REASON_CHARS - 1] + "…"
        for error in errors[:MAX_REASONS_PER_READING]
    ]


def encode_ack(seq: int, accepted: int, reasons: Mapping[int, list[str]]) -> bytes:
    """The `ack` of message `seq` whose rejected readings (by index) had `reasons`.

    At most `MAX_HUB_FRAME_BYTES` long however many readings were rejected: `rejected`
    entries in index order while they fit in `ACK_LISTED_BYTES`, then the other rejected
    indices as `rejected_ranges` while the frame has room (see `Ack`). When everything is
    listed these are the bytes of `encode(Ack(...))`; no model is built, since one of these
    goes out for every readings message.
    """
    message: dict[str, Any] = {"type": "ack", "seq": seq, "accepted": accepted, "rejected": []}
    if not reasons:
        packed: bytes = msgpack.packb(message, use_bin_type=True)
        return packed
    listed = message["rejected"]
    used = 5  # the largest array header (array 32), whatever the count turns out to be
    indices = sorted(reasons)
    for position, index in enumerate(indices):
        entry = {"index": index, "errors": cut_reasons(reasons[index])}
        used += len(msgpack.packb(entry, use_bin_type=True))
        if used > ACK_LISTED_BYTES:
            message["rejected_ranges"] = _index_ranges(
                indices[position:],
                MAX_HUB_FRAME_BYTES - len(msgpack.packb(message, use_bin_type=True)) - 4,
            )
            break
        listed.append(entry)
    packed = msgpack.packb(message, use_bin_type=True)
    return packed


def _index_ranges(indices: list[int], room: int) -> list[list[int]]:
    """`indices` (increasing) as [first, last] runs, as many as `room` bytes hold packed
    (with the key and the largest array header)."""
    ranges: list[list[int]] = []
    room -= len(msgpack.packb("rejected_ranges")) + 5
    for index in indices:
        if ranges and ranges[-1][1] == index - 1:
            room -= _uint_size(index) - _uint_size(index - 1)
            if room < 0:
                break
            ranges[-1][1] = index
            continue
        room -= 1 + 2 * _uint_size(index)  # a fixarray of two
        if room < 0:
            break
        ranges.append([index, index])
    return ranges


def _uint_size(value: int) -> int:
    """Bytes msgpack takes for a non-negative integer."""
    return (
        1
        if value < 2**7
        else 2
        if value < 2**8
        else 3
        if value < 2**16
        else 5
        if value < 2**32
        else 9
    )


def config_frame_problem(config: dict[str, Any], max_depth: int = DEFAULT_MAX_DEPTH) -> str | None:
    """Why `config` cannot go to a device in a `config` message, or None if it can.

    The frame must fit in `MAX_HUB_FRAME_BYTES` (with the largest version number) and nest
    no deeper than a device frame may (`max_depth`, the message map counting as a level):
    a device that parses what it sends can parse what it receives.
    """
    message = {"type": "config", "version": UINT64_MAX, "config": config}
    try:
        size = len(msgpack.packb(message, use_bin_type=True))
    except (ValueError, OverflowError, TypeError) as exc:
        return f"msgpack cannot carry it: {exc}"
    if size > MAX_HUB_FRAME_BYTES:
        return f"its frame would be {size} bytes; at most {MAX_HUB_FRAME_BYTES}"
    try:
        check_depth(message, max_depth)
    except InvalidMessage:
        return (
            f"it nests deeper than the {max_depth} levels a device frame may "
            "(max_nesting_depth), counting the message map and the config itself"
        )
    return None


def _telegraf(
    first: dict[str, Any], unpacker: Any, frame_size: int, max_readings: int, max_depth: int
) -> TelegrafFrame:
    metrics: list[Any] = [first]
    undecodable = 0
    consumed = unpacker.tell()
    try:
        for metric in unpacker:
            consumed = unpacker.tell()
            if type(metric) is dict:  # not a map: rejected without a look inside, as readings
                check_depth(metric, max_depth)
            metrics.append(metric)
            if len(metrics) > max_readings:
                raise InvalidMessage(f"Telegraf frame holds more than {max_readings} metrics")
    except InvalidMessage:
        raise
    except (ValueError, TypeError, msgpack.UnpackException):
        undecodable = 1
    # Iteration also stops quietly at a truncated tail; where the last metric ended tells.
    if consumed < frame_size:
        undecodable = 1
    return TelegrafFrame(metrics=metrics, undecodable=undecodable)


M = TypeVar("M", bound=BaseModel)


@overload
def validate_envelope(data: dict[str, Any]) -> ReadingsMessage[Any]: ...
@overload
def validate_envelope(data: dict[str, Any], model: type[M]) -> M: ...
def validate_envelope(data: dict[str, Any], model: type[BaseModel] = _ENVELOPE) -> BaseModel:
    """`data` as `model` (the readings envelope by default), or `InvalidMessage` saying why."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidMessage(format_validation_error(exc, limit=3)) from None


MAX_ERROR_CHARS = 1000
"""The longest `error` message text: a location may hold a device's key of any length."""


def format_validation_error(exc: ValidationError, limit: int = 10) -> str:
    """One line per problem, `path: message`, at most `limit` of them, each path part cut
    to 100 characters and the whole to `MAX_ERROR_CHARS`."""
    text = "; ".join(
        f"{'.'.join(str(part)[:100] for part in err['loc'])}: {err['msg']}"
        if err["loc"]
        else err["msg"]
        for err in exc.errors(include_url=False)[:limit]
    )
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def describe_decoder_error(exc: Exception, max_readings: int) -> str:
    """What a msgpack decoding error means for a device, in one line."""
    text = str(exc)
    if "exceeds max_array_len" in text:
        # The only array the protocol has is the readings list.
        return f"an array of {text.split()[0]} items; at most {max_readings} readings a message"
    if isinstance(exc, msgpack.StackError):
        return "maps and arrays nest too deep"
    return text[:200] or type(exc).__name__
