"""From a message's raw readings to line protocol and an ack's verdicts. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hub.lineprotocol import format_point
from hub.measurements import ReadingsValidator
from schemas.messages import Rejection

DEVICE_TAG = "device"


@dataclass(frozen=True, slots=True)
class PreparedReadings:
    """The accepted readings as line protocol, and why the others were rejected."""

    lines: str
    accepted: int
    rejected: list[Rejection]


def prepare_readings(
    readings: list[Any],
    validator: ReadingsValidator,
    device_id: str,
    ns_per_unit: int,
    arrival_ns: int,
    multiline_strings: bool = False,
) -> PreparedReadings:
    """Validate readings and format the valid ones as points of `device_id`.

    Readings whose text InfluxDB cannot store exactly are rejected too (see
    `hub.lineprotocol`). A reading without `time` is stamped `arrival_ns + its index`: the
    arrival time, kept distinct so that time-less readings of one series in one message do
    not overwrite each other in InfluxDB.
    """
    valid, reasons = validator.validate(readings)
    indices = (
        range(len(readings))
        if not reasons
        else [index for index in range(len(readings)) if index not in reasons]
    )
    lines = []
    for index, reading in zip(indices, valid, strict=True):
        stamp = reading.get("time")
        if stamp is None:
            time_ns = arrival_ns + index
        elif type(stamp) is int:
            time_ns = stamp * ns_per_unit
        else:
            time_ns = stamp.to_unix_nano()
        tags = reading.get("tags")
        if tags:
            tags[DEVICE_TAG] = device_id
        else:
            tags = {DEVICE_TAG: device_id}
        try:
            lines.append(
                format_point(reading["name"], tags, reading["fields"], time_ns, multiline_strings)
            )
        except ValueError as exc:  # text line protocol cannot carry exactly
            reasons[index] = [str(exc)]
    return PreparedReadings(
        lines="\n".join(lines),
        accepted=len(lines),
        rejected=[
            Rejection(index=index, errors=errors) for index, errors in sorted(reasons.items())
        ],
    )
