r"""InfluxDB line protocol formatting for the hub's hot path, and what it must refuse.

Every rule below was checked by writing to a real InfluxDB 1.6.7 (`/write?precision=ns`,
read back with InfluxQL, both `SELECT * FROM /.*/` and by quoted name) and a real
VictoriaMetrics 1.79 (`/write` and `/api/v2/write`, read back with `/api/v1/export`); see
tests/test_lineprotocol_roundtrip.py. "Refused" means `format_point` raises ValueError and
`unrepresentable` or `point_problem` returns the reason, so the hub rejects the reading
instead of storing something else. The rules are the union of both servers', so a
reading that is accepted reads back exactly from InfluxDB and never adds a point on
either server.

===================  =========================  =========================================
text                 where                      written as / refused because
===================  =========================  =========================================
space                measurement, tags, fkey    `\ ` (unescaped: ends the section)
comma                measurement, tags, fkey    `\,` (unescaped: starts a tag / field)
`=`                  tag key/value, field key   `\=`; as is in a measurement (an escape
                                                there would be kept by VictoriaMetrics)
`"`                  measurement, tags          as is (no quoting outside field values)
`"`                  field key                  refused: VictoriaMetrics reads it as a
                                                quote and loses the point's other fields,
                                                and keeps the backslash of `\"`
LF (\n)              measurement, tags, fkey    refused: both servers end the line there,
                                                the rest becomes another point; no escape
                                                exists (`\n` is read as backslash + n)
CR (\r), NUL         measurement, tags, fkey    refused: stored exactly, but InfluxQL
                                                cannot quote them (its scanner turns CR
                                                into a line end, NUL into end of input),
                                                so no query could name them; a leading
                                                NUL is also stripped
backslash + other    measurement, tags, fkey    as is: both read a lone `\` literally
trailing backslash   measurement, tags, fkey    refused: it escapes the separator after
                                                it, on both servers
`\` before `\`,      measurement, tags, fkey    refused: VictoriaMetrics reads `\\` as
space `,` `=` `"`                               one backslash, InfluxDB as two; InfluxDB
                                                drops the backslash of `\"`, `\=` in
                                                measurements and field keys; any escape
                                                added reads back differently on one side
leading tab          measurement, field key     refused: InfluxDB strips it as whitespace
leading `#`          measurement                refused: the line becomes a comment and
                                                is dropped without an error
"" (empty)           measurement, keys          refused: a parse error
"" (empty)           tag value                  tag omitted: InfluxDB refuses `t=`, and a
                                                missing tag already reads as "" (`t = ''`)
`time`               tag key, field key         refused: InfluxDB refuses the point (tag)
                                                or silently drops the field
tab, non-ASCII,      anywhere else              as is: "Küche 温度", emoji, other control
`'`, `#`                                        characters, U+2028 all read back exactly
string field value   field value                `"…"` with `\` -> `\\` and `"` -> `\"`:
                                                exact on InfluxDB, including a trailing
                                                backslash, tabs, CR and non-ASCII
LF in a string       field value                refused: exact on InfluxDB, but
value                                           VictoriaMetrics splits lines at every LF,
                                                even inside quotes, so the text after it
                                                would be written as its own point
===================  =========================  =========================================

Other server behaviour worth knowing (not escaping): VictoriaMetrics stores every value as a
float64 (strings as 0, bools as 1/0, ints above 2**53 rounded) and trims timestamps to
milliseconds; InfluxDB's JSON shows -0.0 as 0 and integral floats without a fraction.
"""

from __future__ import annotations

from collections.abc import Mapping

FieldValue = float | int | bool | str

CACHE_LIMIT = 8192
"""Entries per escape cache; a full cache is cleared rather than evicted entry by entry."""

_MEASUREMENT_ESCAPES = str.maketrans({",": "\\,", " ": "\\ "})
_TAG_ESCAPES = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"'})
_BAD_AFTER_BACKSLASH = {
    "\\": "another backslash",
    " ": "a space",
    ",": "a comma",
    "=": "'='",
    '"': "a double quote",
}

# Escaped forms of texts already checked: names and tag sets repeat, so the hot path is
# mostly dict hits.
_measurements: dict[str, str] = {}
_tag_sets: dict[tuple[tuple[str, str], ...], str] = {}
_field_keys: dict[str, str] = {}


def escape_measurement(name: str) -> str:
    """Escape a measurement name: comma and space."""
    return name.translate(_MEASUREMENT_ESCAPES)


def escape_tag(text: str) -> str:
    """Escape a tag key, tag value or field key: comma, equals sign and space."""
    return text.translate(_TAG_ESCAPES)


def format_field_value(value: FieldValue) -> str:
    """Format a field value: `true`/`false`, `123i`, float repr, or a quoted string."""
    kind = type(value)
    if kind is float:
        return repr(value)
    if kind is bool:  # before int: bool is a subclass of int
        return "true" if value else "false"
    if kind is int:
        return f"{value}i"
    if kind is str:
        return '"' + value.translate(_STRING_ESCAPES) + '"'  # type: ignore[union-attr]
    return _format_field_value_subclass(value)


def _format_field_value_subclass(value: FieldValue) -> str:
    # Subclasses (IntEnum, str enums...) are rare: keep them off the fast path above.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{int(value)}i"
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, str):
        return '"' + str(value).translate(_STRING_ESCAPES) + '"'
    raise TypeError(f"field value of type {type(value).__name__} is not float/int/bool/str")


def unrepresentable(text: str) -> str | None:
    """Why `text` cannot be written as a measurement, tag or field key exactly, or None.

    Covers the rules that hold in every identifier position; `point_problem` adds the
    ones that depend on the position (empty, leading `#` or tab, `"` in field keys, `time`).
    """
    if text.isascii() and text.isprintable():
        # Fast path: only the backslash rules can apply.
        if "\\" not in text:
            return None
    else:
        if "\n" in text:
            return "contains a line feed, which ends the line protocol line"
        if "\r" in text:
            return "contains a carriage return, which InfluxQL cannot quote"
        if "\0" in text:
            return "contains a NUL character, which InfluxQL cannot quote"
        try:
            text.encode()
        except UnicodeEncodeError:
            return "is not valid Unicode (lone surrogate)"
    if text.endswith("\\"):
        return "ends with a backslash, which would escape the separator after it"
    start = text.find("\\")
    while start != -1:
        if (after := _BAD_AFTER_BACKSLASH.get(text[start + 1])) is not None:
            return (
                f"has a backslash before {after}, which InfluxDB 1.6 and VictoriaMetrics "
                "read back differently"
            )
        start = text.find("\\", start + 2)
    return None


def _measurement_problem(name: str) -> str | None:
    if not name:
        return "is empty"
    if name[0] == "#":
        return "starts with '#', which makes the line a comment that is silently dropped"
    if name[0] == "\t":
        return "starts with a tab, which InfluxDB strips"
    return unrepresentable(name)


def _key_problem(key: str, what: str) -> str | None:
    if not key:
        return "is empty"
    if key == "time":
        return f"is 'time', which InfluxDB does not accept as a {what}"
    if what == "field key":
        if key[0] == "\t":
            return "starts with a tab, which InfluxDB strips"
        if '"' in key:
            return "contains '\"', which VictoriaMetrics misreads in a field key"
    return unrepresentable(key)


def _string_problem(value: str) -> str | None:
    if "\n" in value:
        return "contains a line feed, which VictoriaMetrics reads as the end of the line"
    return None


def point_problem(
    measurement: str, tags: Mapping[str, str], fields: Mapping[str, FieldValue]
) -> str | None:
    """Why this point cannot be written so that it reads back exactly, or None."""
    if problem := _measurement_problem(measurement):
        return f"measurement {measurement!r} {problem}"
    for key, value in tags.items():
        if not value:
            continue  # omitted, see the module docstring
        if problem := _key_problem(key, "tag key"):
            return f"tag key {key!r} {problem}"
        if problem := unrepresentable(value):
            return f"tag {key!r} value {value!r} {problem}"
    if not fields:
        return "has no fields"
    for key, field_value in fields.items():
        if problem := _key_problem(key, "field key"):
            return f"field key {key!r} {problem}"
        if isinstance(field_value, str) and (problem := _string_problem(field_value)):
            return f"field {key!r} string value {problem}"
    return None


def _cache_put(cache: dict[str, str], key: str, escaped: str) -> str:
    if len(cache) >= CACHE_LIMIT:
        cache.clear()
    cache[key] = escaped
    return escaped


def _escaped_measurement(name: str) -> str:
    if problem := _measurement_problem(name):
        raise ValueError(f"measurement {name!r} {problem}")
    return _cache_put(_measurements, name, escape_measurement(name))


def _escaped_tag_set(items: tuple[tuple[str, str], ...]) -> str:
    escaped = []
    for key, value in sorted(items):
        if not value:
            continue  # omitted, see the module docstring
        if problem := _key_problem(key, "tag key"):
            raise ValueError(f"tag key {key!r} {problem}")
        if problem := unrepresentable(value):
            raise ValueError(f"tag {key!r} value {value!r} {problem}")
        escaped.append(f",{escape_tag(key)}={escape_tag(value)}")
    if len(_tag_sets) >= CACHE_LIMIT:
        _tag_sets.clear()
    _tag_sets[items] = text = "".join(escaped)
    return text


def _escaped_field_key(key: str) -> str:
    if problem := _key_problem(key, "field key"):
        raise ValueError(f"field key {key!r} {problem}")
    return _cache_put(_field_keys, key, escape_tag(key) + "=")


def format_point(
    measurement: str,
    tags: Mapping[str, str],
    fields: Mapping[str, FieldValue],
    time_ns: int,
) -> str:
    """Format one point as a line (no trailing newline), tags sorted, empty tag values omitted.

    Raises ValueError with the reason for anything in the module docstring's table that is
    refused, so what is written always reads back exactly.
    """
    line = _measurements.get(measurement) or _escaped_measurement(measurement)
    if tags:
        # Keyed by the tags in their given order: tuple(items) is cheaper than sorting.
        items = tuple(tags.items())
        tag_set = _tag_sets.get(items)
        line += _escaped_tag_set(items) if tag_set is None else tag_set
    if not fields:
        raise ValueError(f"measurement {measurement!r}: a point needs at least one field")
    keys = _field_keys
    sep = " "
    for key, value in fields.items():
        escaped_key = keys.get(key) or _escaped_field_key(key)
        kind = type(value)
        if kind is float:
            line = f"{line}{sep}{escaped_key}{value!r}"
        elif kind is bool:
            line = f"{line}{sep}{escaped_key}{'true' if value else 'false'}"
        elif kind is int:
            line = f"{line}{sep}{escaped_key}{value}i"
        elif kind is str and "\n" not in value:  # type: ignore[operator]
            if '"' in value or "\\" in value:  # type: ignore[operator]
                value = value.translate(_STRING_ESCAPES)  # type: ignore[union-attr]
            line = f'{line}{sep}{escaped_key}"{value}"'
        else:
            line = f"{line}{sep}{escaped_key}{_other_field_value(key, value)}"
        sep = ","
    return f"{line} {time_ns}"


def _other_field_value(key: str, value: FieldValue) -> str:
    if isinstance(value, str) and (problem := _string_problem(value)):
        raise ValueError(f"field {key!r} string value {problem}")
    return format_field_value(value)
