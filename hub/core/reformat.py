"""Re-check a batch formatted for one kind of server before it goes to another. Pure code.

A batch is formatted for the dialect of the server known when its readings arrived (see
`hub.dialects`); it may be written later to a server of another kind: a spooled batch
replayed after the hub was pointed elsewhere, or a batch formatted before the server first
answered (`STRICT`). Its text is read back into points with the rules it was written
with, and each point is formatted again for the target: the same point, spelled for the
target, or refused with the reason the target cannot store it exactly. Nothing is ever
written as a different point.

Only text `hub.lineprotocol.format_point` produced is read here (the spool's checksums
keep other bytes out); anything else is a `ValueError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hub.core.dialects import Dialect
from hub.core.lineprotocol import FieldValue, format_point

_MEASUREMENT_ESCAPABLE = frozenset(", ")
_KEY_ESCAPABLE = frozenset(", =")
_QUOTED_FIELD_KEY_ESCAPABLE = frozenset(', ="')  # Dialect.escapes_quotes_in_field_keys


@dataclass(frozen=True, slots=True)
class ParsedPoint:
    """One point read back from a line."""

    measurement: str
    tags: dict[str, str]
    fields: dict[str, FieldValue]
    time_ns: int


@dataclass(slots=True)
class Reformatted:
    """A batch spelled for its target: the lines kept, and those refused with the reason."""

    body: bytes
    points: int
    refused: list[tuple[str, str]] = field(default_factory=list)
    """(the line as it was, why the target cannot store it exactly)."""


def reformat_batch(body: bytes, source: Dialect, target: Dialect) -> Reformatted:
    """`body`, formatted for `source`, as `target` must be written: every point formatted
    again for `target`, those it refuses left out and listed with the reason."""
    text = body.decode("utf-8")
    lines: list[str] = []
    refused: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        start = position
        try:
            point, position = parse_point(text, position, source)
        except ValueError as exc:  # not text this hub wrote: keep all that is left aside
            refused.append((text[start:], f"cannot be read as {source.value} line protocol: {exc}"))
            break
        original = text[start:position]
        position += 1  # the line feed between points
        try:
            lines.append(format_point(*_point_args(point), target))
        except ValueError as exc:
            refused.append((original, f"{exc} (on a {target.value} server)"))
    return Reformatted("\n".join(lines).encode("utf-8"), len(lines), refused)


def _point_args(point: ParsedPoint) -> tuple[str, dict[str, str], dict[str, FieldValue], int]:
    return point.measurement, point.tags, point.fields, point.time_ns


def parse_point(text: str, position: int, dialect: Dialect) -> tuple[ParsedPoint, int]:
    """The point of the line at `position` in `text`, and where that line ends."""
    doubled = dialect.doubles_backslashes
    field_keys = (
        _QUOTED_FIELD_KEY_ESCAPABLE if dialect.escapes_quotes_in_field_keys else _KEY_ESCAPABLE
    )
    measurement, position = _name(text, position, _MEASUREMENT_ESCAPABLE, ", ", doubled)
    tags: dict[str, str] = {}
    while _at(text, position) == ",":
        key, position = _name(text, position + 1, _KEY_ESCAPABLE, "=", doubled)
        _expect(text, position, "=")
        value, position = _name(text, position + 1, _KEY_ESCAPABLE, ", ", doubled)
        tags[key] = value
    _expect(text, position, " ")
    fields: dict[str, FieldValue] = {}
    separator = " "
    while _at(text, position) == separator:
        key, position = _name(text, position + 1, field_keys, "=", doubled)
        _expect(text, position, "=")
        fields[key], position = _field_value(text, position + 1)
        separator = ","
    if not fields:
        raise ValueError(f"no fields at offset {position}")
    _expect(text, position, " ")
    end = text.find("\n", position)
    end = len(text) if end == -1 else end
    try:
        time_ns = int(text[position + 1 : end])
    except ValueError:
        raise ValueError(f"no timestamp at offset {position}") from None
    return ParsedPoint(measurement, tags, fields, time_ns), end


def _at(text: str, position: int) -> str:
    return text[position] if position < len(text) else ""


def _expect(text: str, position: int, char: str) -> None:
    if _at(text, position) != char:
        raise ValueError(f"expected {char!r} at offset {position}")


def _name(
    text: str, position: int, escapable: frozenset[str], ends: str, doubled: bool
) -> tuple[str, int]:
    # The inverse of hub.lineprotocol's escaping: a backslash before an escapable character
    # (or, doubled, before another backslash) stands for that character; any other is itself.
    out = []
    end = len(text)
    while position < end:
        char = text[position]
        if char == "\\" and position + 1 < end:
            following = text[position + 1]
            if following in escapable or (doubled and following == "\\"):
                out.append(following)
                position += 2
                continue
        elif char in ends or char == "\n":
            break
        out.append(char)
        position += 1
    return "".join(out), position


def _field_value(text: str, position: int) -> tuple[FieldValue, int]:
    if _at(text, position) == '"':
        out = []
        position += 1
        while position < len(text):
            char = text[position]
            if char == "\\" and position + 1 < len(text):
                out.append(text[position + 1])
                position += 2
                continue
            if char == '"':
                return "".join(out), position + 1
            out.append(char)
            position += 1
        raise ValueError("unterminated string value")
    end = position
    while end < len(text) and text[end] not in ", \n":
        end += 1
    word = text[position:end]
    if word in ("true", "false"):
        return word == "true", end
    try:
        if word.endswith("i"):
            return int(word[:-1]), end
        return float(word), end
    except ValueError:
        raise ValueError(f"bad field value {word!r} at offset {position}") from None
