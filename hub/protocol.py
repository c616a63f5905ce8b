"""Decoding device frames into protocol events, and encoding hub messages. No I/O here.

A frame is one msgpack map with a `type` key, or (the Telegraf form) a stream of concatenated
Telegraf metrics, recognised by a first map with `name` and `fields` and no `type`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from hub.errors import InvalidMessage
from schemas.messages import ConfigAck, ReadingsMessage


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


def decode_frame(frame: bytes, max_readings: int) -> DeviceEvent:
    """Decode one binary frame; raise `InvalidMessage` when it breaks the protocol."""
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        max_buffer_size=max(len(frame), 1),
        timestamp=0,
    )
    unpacker.feed(frame)
    try:
        first = unpacker.unpack()
    except msgpack.OutOfData:
        raise InvalidMessage("empty or truncated msgpack") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise InvalidMessage(f"not valid msgpack: {_describe(exc)}") from None
    if not isinstance(first, dict):
        raise InvalidMessage(f"a frame must be a msgpack map, not {type(first).__name__}")
    if "type" not in first:
        if "name" in first and "fields" in first:
            return _telegraf(first, unpacker, len(frame), max_readings)
        raise InvalidMessage("the map has no 'type' key")
    if unpacker.tell() != len(frame):
        raise InvalidMessage("trailing bytes after the message map")
    kind = first["type"]
    if kind == "readings":
        envelope = _validate(_ENVELOPE, first)
        if len(envelope.readings) > max_readings:
            raise InvalidMessage(
                f"readings: {len(envelope.readings)} readings, at most {max_readings} a message"
            )
        return ReadingsFrame(seq=envelope.seq, readings=envelope.readings)
    if kind == "config_ack":
        return _validate(ConfigAck, first)
    raise InvalidMessage(f"unknown message type {kind!r}"[:200])


def encode(message: BaseModel) -> bytes:
    """Pack a hub -> device message as one msgpack map."""
    packed: bytes = msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)
    return packed


def _telegraf(
    first: dict[str, Any], unpacker: Any, frame_size: int, max_readings: int
) -> TelegrafFrame:
    metrics: list[Any] = [first]
    undecodable = 0
    consumed = unpacker.tell()
    try:
        for metric in unpacker:
            consumed = unpacker.tell()
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


def _validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidMessage(format_validation_error(exc, limit=3)) from None


def format_validation_error(exc: ValidationError, limit: int = 10) -> str:
    """One line per problem, `path: message`, at most `limit` of them."""
    return "; ".join(
        f"{'.'.join(str(part) for part in err['loc'])}: {err['msg']}" if err["loc"] else err["msg"]
        for err in exc.errors(include_url=False)[:limit]
    )


def _describe(exc: Exception) -> str:
    return str(exc)[:200] or type(exc).__name__
