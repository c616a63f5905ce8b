"""From a message's raw readings to line protocol and an ack's verdicts. No I/O here."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hub.core.dialects import Dialect
from hub.core.fieldtypes import FieldTypes
from hub.core.lineprotocol import format_point
from hub.core.measurements import ReadingsValidator
from hub.core.protocol import DEFAULT_MAX_DEPTH, check_readings_depth, cut_reasons
from hub.settings import Settings, parse_rfc3339_ns
from schemas.messages import TIME_MIN_NS, Rejection

DEVICE_TAG = "device"

REASONS_BUDGET_CHARS = 64 * 1024
"""Reason text kept per message; rejections past it get `REASONS_OMITTED`, so that what waits
for an ack stays small however many readings were wrong (the ack itself lists only the first
40 KiB of entries: `hub.protocol.encode_ack`)."""
REASONS_OMITTED = "too many errors to list"


@dataclass(frozen=True, slots=True)
class PreparedReadings:
    """The accepted readings as line protocol, and why the others were rejected."""

    lines: str
    accepted: int
    reasons: dict[int, list[str]]
    """Why each rejected reading (by index in its message) was rejected, unbounded."""
    undecodable: int = 0
    """Telegraf metrics that could not be decoded (a stream ends at the first)."""

    @property
    def rejected(self) -> list[Rejection]:
        """The rejections in index order, their text bounded (`rejections`); as models, for
        tests and tools: the hub encodes acks from `reasons` (`hub.protocol.encode_ack`)."""
        return rejections(self.reasons)

    def shifted(self, first_index: int) -> PreparedReadings:
        """The same, for readings that start at `first_index` of their message."""
        if not first_index or not self.reasons:
            return self
        reasons = {index + first_index: errors for index, errors in self.reasons.items()}
        return PreparedReadings(self.lines, self.accepted, reasons)


@dataclass(frozen=True, slots=True)
class TimeLimits:
    """Times no working clock produces: before `earliest_ns` (None: no such bound), or more
    than `max_future_ns` after the hub's clock (settings `min_time`, `max_future_s`)."""

    earliest_ns: int | None
    max_future_ns: int

    @classmethod
    def of(cls, settings: Settings) -> TimeLimits:
        """The limits `settings` set (cached: looked up for every message)."""
        return _time_limits(settings.min_time, settings.max_future_s)

    def problem(self, time_ns: int, now_ns: int) -> str | None:
        """Why a reading stamped `time_ns` is refused when the hub's clock says `now_ns`."""
        if self.earliest_ns is not None and time_ns < self.earliest_ns:
            return (
                f"time: {_rfc3339(time_ns)} is before {_rfc3339(self.earliest_ns)}, "
                "the earliest accepted (clock not set?)"
            )
        if time_ns > now_ns + self.max_future_ns:
            return (
                f"time: {_rfc3339(time_ns)} is more than {self.max_future_ns / 1e9:g} s "
                f"after the hub's clock ({_rfc3339(now_ns)}): in the future"
            )
        return None


NO_TIME_LIMITS = TimeLimits(None, 2**63)
"""Only InfluxDB's own range, which the validator checks."""


@functools.lru_cache(maxsize=8)
def _time_limits(min_time: str, max_future_s: float) -> TimeLimits:
    return TimeLimits(parse_rfc3339_ns(min_time) if min_time else None, int(max_future_s * 1e9))


def _rfc3339(time_ns: int) -> str:
    seconds, ns = divmod(time_ns, 1_000_000_000)
    try:
        text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    except (OverflowError, OSError, ValueError):  # beyond datetime's years 1-9999
        return f"{time_ns} ns"
    return f"{text}.{ns:09d}Z".replace(".000000000Z", "Z")


def prepare_readings(
    readings: list[Any],
    validator: ReadingsValidator,
    device_id: str,
    ns_per_unit: int,
    arrival_ns: int,
    dialect: Dialect = Dialect.STRICT,
    max_depth: int = DEFAULT_MAX_DEPTH,
    time_limits: TimeLimits = NO_TIME_LIMITS,
    field_types: FieldTypes | None = None,
) -> PreparedReadings:
    """Validate readings and format the valid ones as points of `device_id`.

    Readings whose text the server (of kind `dialect`) cannot store exactly are rejected
    too (see `hub.dialects`), and so are readings whose `time` is outside `time_limits`
    (measured from `arrival_ns`, the hub's clock). A reading without `time` is stamped
    `arrival_ns + its index`: the arrival time, kept distinct so that time-less readings of
    one series in one message do not overwrite each other in InfluxDB.

    Rejected readings, and accepted ones with keys validation ignored, are checked against
    `max_depth` (the frame's nesting limit), which `decode_frame` leaves to this step; one
    nesting too deep raises `InvalidMessage` for the whole frame.

    With `field_types`, a reading whose field has another type than the one its measurement
    holds is rejected, and an accepted one teaches its fields' types (see `hub.fieldtypes`).
    """
    valid, reasons = validator.validate(readings)
    indices = (
        range(len(readings))
        if not reasons
        else [index for index in range(len(readings)) if index not in reasons]
    )
    # Where decode_frame left the nesting limit: rejected readings, and accepted ones with
    # keys the validator ignored (it leaves out unknown keys). Raises InvalidMessage.
    unchecked = list(reasons)
    lines = []
    # Refused outside [earliest, latest]; one comparison per reading on the hot path.
    earliest = TIME_MIN_NS if time_limits.earliest_ns is None else time_limits.earliest_ns
    latest = arrival_ns + time_limits.max_future_ns
    for index, reading in zip(indices, valid, strict=True):
        if len(reading) != len(readings[index]):
            unchecked.append(index)
        stamp = reading.get("time")
        if stamp is None:
            time_ns = arrival_ns + index
        else:
            time_ns = stamp * ns_per_unit if type(stamp) is int else stamp.to_unix_nano()
            if not earliest <= time_ns <= latest:
                reasons[index] = [time_limits.problem(time_ns, arrival_ns) or "time"]
                continue
        tags = reading.get("tags")
        if tags:
            tags[DEVICE_TAG] = device_id
        else:
            tags = {DEVICE_TAG: device_id}
        try:
            line = format_point(
                reading["name"], tags, reading["fields"], time_ns, dialect
            )
        except ValueError as exc:  # text line protocol cannot carry exactly
            reasons[index] = [str(exc)]
            continue
        if field_types is not None and (
            conflict := field_types.check(reading["name"], reading["fields"], time_ns)
        ):
            reasons[index] = [conflict]
            continue
        lines.append(line)
    if unchecked:
        check_readings_depth(readings, unchecked, max_depth)
    return PreparedReadings(lines="\n".join(lines), accepted=len(lines), reasons=reasons)


def bounded_reasons(reasons: dict[int, list[str]]) -> dict[int, list[str]]:
    """`reasons` in index order, their text bounded: each reading's by `cut_reasons`, and
    past `REASONS_BUDGET_CHARS` in all to `REASONS_OMITTED` (what a queued ack holds, up to
    `max_unacked_messages` of them per connection)."""
    budget = REASONS_BUDGET_CHARS
    omitted = [REASONS_OMITTED]  # one list shared by every reading past the budget
    result = {}
    for index, errors in sorted(reasons.items()):
        if budget > 0:
            kept = cut_reasons(errors)
            budget -= sum(map(len, kept))
        else:
            kept = omitted
        result[index] = kept
    return result


def rejections(reasons: dict[int, list[str]]) -> list[Rejection]:
    """The `Rejection`s of `bounded_reasons(reasons)`."""
    return [
        Rejection.model_construct(index=index, errors=list(errors))
        for index, errors in bounded_reasons(reasons).items()
    ]
