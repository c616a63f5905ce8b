"""The wire messages of device protocol v1, as pydantic models.

One place for the contract: the hub validates what devices send with these types and the
device simulator builds what it sends from them. `schemas.export` writes their JSON Schema
beside this file for firmware authors in other languages.

Every frame is one msgpack map; the models below describe that map. Readings are TypedDicts,
not models: the hub validates a whole message's readings in one call and wants plain dicts
back, with no object built per reading.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, NotRequired, TypeVar

import msgpack
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    InstanceOf,
    StrictBool,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    with_config,
)
from typing_extensions import TypedDict

PROTOCOL_VERSION = 1
UINT64_MAX = 2**64 - 1
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
TIME_MIN_NS = -(2**63) + 2
TIME_MAX_NS = 2**63 - 2
"""The timestamps InfluxDB accepts, in nanoseconds (about 1677-09-21 to 2262-04-11)."""

Uint64 = Annotated[StrictInt, Field(ge=0, le=UINT64_MAX)]

MsgpackTimestamp = Annotated[
    InstanceOf[msgpack.Timestamp],
    WithJsonSchema(
        {
            "description": "msgpack timestamp extension (type -1), any of its three sizes",
            "x-msgpack-ext": -1,
        }
    ),
]
"""A msgpack timestamp as decoded by msgpack-python (`msgpack.Timestamp`)."""

Time = Annotated[
    StrictInt | MsgpackTimestamp,
    Field(
        description="msgpack timestamp (ext -1), or an integer in the connection's precision "
        "(query parameter `precision`: s, ms (default), us, ns). Absent: time of arrival."
    ),
]

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
FieldValue = Annotated[
    StrictBool | FiniteFloat | StrictStr,
    Field(description="float, integer, bool or string; NaN and infinities are refused"),
]
"""A field value when no measurement schema says otherwise: integers become floats."""

MeasurementName = Annotated[StrictStr, Field(min_length=1)]


@with_config(ConfigDict(extra="allow"))
class Reading(TypedDict):
    """One reading: the shape of Telegraf's msgpack metric. Other keys are ignored."""

    name: MeasurementName
    fields: Annotated[dict[StrictStr, FieldValue], Field(min_length=1)]
    tags: NotRequired[dict[StrictStr, StrictStr]]
    time: NotRequired[Time]


ReadingT = TypeVar("ReadingT")


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# Device -> hub


class ReadingsMessage(_Message, Generic[ReadingT]):
    """`readings`: a batch of readings, acknowledged by one `ack` echoing `seq`.

    Parametrised by the reading type so the hub can check the envelope alone
    (`ReadingsMessage[Any]`) and validate the readings separately, each on its own.
    """

    type: Literal["readings"]
    seq: Uint64
    readings: Annotated[list[ReadingT], Field(min_length=1)]


class ConfigAck(_Message):
    """`config_ack`: the device's answer to a `config` message."""

    type: Literal["config_ack"]
    version: Uint64
    ok: StrictBool
    error: StrictStr | None = None


# Hub -> device


class Rejection(_Message):
    """Why one reading of a `readings` message was not stored."""

    index: Annotated[StrictInt, Field(ge=0)]
    errors: list[StrictStr]


MAX_HUB_FRAME_BYTES = 64 * 1024
"""The largest frame the hub sends a device (an `ack`, a `config`), in bytes."""
ACK_LISTED_BYTES = 40 * 1024
"""Of an ack, what its `rejected` entries may take; past it, rejections go to
`rejected_ranges`, which the rest of `MAX_HUB_FRAME_BYTES` holds."""

IndexRange = Annotated[
    tuple[Annotated[StrictInt, Field(ge=0)], Annotated[StrictInt, Field(ge=0)]],
    Field(description="[first, last]: readings first to last (inclusive) were rejected"),
]


class Ack(_Message):
    """`ack`: every accepted reading of message `seq` is durable.

    `rejected` lists the first rejected readings with their reasons, each entry exact; when
    they would not fit in `ACK_LISTED_BYTES`, the other rejected readings are given by index
    in `rejected_ranges` (sent only then), as many ranges as fit in `MAX_HUB_FRAME_BYTES`.
    `accepted` is always exact: a message of n readings had n - accepted rejected.
    """

    type: Literal["ack"] = "ack"
    seq: Uint64
    accepted: Annotated[StrictInt, Field(ge=0)]
    rejected: list[Rejection] = []
    rejected_ranges: Annotated[
        list[IndexRange],
        Field(
            description="rejected readings not listed in `rejected`, as index ranges in "
            "order; present only when `rejected` could not list them all",
            # The usual ack stays the four keys every v1 device knows.
            exclude_if=lambda ranges: not ranges,
        ),
    ] = []

    def rejected_indices(self) -> set[int]:
        """Every reading index the ack names as rejected, listed or in a range."""
        indices = {rejection.index for rejection in self.rejected}
        for first, last in self.rejected_ranges:
            indices.update(range(first, last + 1))
        return indices


class Config(_Message):
    """`config`: the device's whole desired configuration at `version`."""

    type: Literal["config"] = "config"
    version: Uint64
    config: dict[StrictStr, Any]


class ErrorMessage(_Message):
    """`error`: sent before the hub closes the connection for a protocol error."""

    type: Literal["error"] = "error"
    code: StrictStr
    message: StrictStr


DEVICE_MESSAGES: dict[str, type[BaseModel]] = {
    "readings": ReadingsMessage[Reading],
    "config_ack": ConfigAck,
}
HUB_MESSAGES: dict[str, type[BaseModel]] = {
    "ack": Ack,
    "config": Config,
    "error": ErrorMessage,
}
