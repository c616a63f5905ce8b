r"""InfluxDB line protocol formatting for the hub's hot path, in the dialect of its server.

`format_point` formats one point for a `Dialect` (see `hub.dialects`: which text each kind
of server stores exactly, and the table of what each refuses) and raises ValueError with
the reason for a point that server would not store exactly. The default, `STRICT`, is the
union of the InfluxDB 1.6.7 and VictoriaMetrics rules, for a server of unknown kind.

String field values are `"`-quoted with `\` and `"` escaped, so CR, tabs, NUL and a
trailing backslash all read back exactly. Not escaping but worth knowing: VictoriaMetrics
keeps every value as a float64 of about 12 significant digits (strings become 0, bools
1/0) and trims timestamps to milliseconds; InfluxDB's JSON shows -0.0 as 0.
"""

from __future__ import annotations

from collections.abc import Mapping

from hub.core.dialects import (
    Dialect,
    key_problem,
    measurement_problem,
    string_problem,
    unrepresentable,
)

__all__ = [
    "CACHE_LIMIT",
    "Dialect",
    "FieldValue",
    "escape_field_key",
    "escape_measurement",
    "escape_tag",
    "format_field_value",
    "format_point",
    "point_template",
    "unrepresentable",
]

FieldValue = float | int | bool | str

CACHE_LIMIT = 16384
"""Entries per escape cache; a full cache is cleared rather than evicted entry by entry."""


_MEASUREMENT_ESCAPES = str.maketrans({",": "\\,", " ": "\\ "})
_TAG_ESCAPES = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})
_DOUBLED_MEASUREMENT_ESCAPES = str.maketrans({",": "\\,", " ": "\\ ", "\\": "\\\\"})
_DOUBLED_TAG_ESCAPES = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ ", "\\": "\\\\"})
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"'})

_Caches = tuple[dict[str, str], dict[tuple[tuple[str, str], ...], str], dict[str, str]]
# Per dialect, the escaped forms of texts already checked (measurements, tag sets, field
# keys): names and tag sets repeat, so the hot path is mostly dict hits.
_CACHES: dict[Dialect, _Caches] = {dialect: ({}, {}, {}) for dialect in Dialect}


_DOUBLING = Dialect.VICTORIA_METRICS  # Dialect.doubles_backslashes, without the property call
_QUOTING = Dialect.INFLUXDB_1  # Dialect.escapes_quotes_in_field_keys, likewise


def escape_measurement(name: str, dialect: Dialect = Dialect.STRICT) -> str:
    """Escape a measurement name: comma and space (and backslash where the dialect doubles it)."""
    if dialect is _DOUBLING:
        return name.translate(_DOUBLED_MEASUREMENT_ESCAPES)
    # `in` tests are ~10x cheaper than translate, and most names need no escape.
    if " " in name or "," in name:
        return name.translate(_MEASUREMENT_ESCAPES)
    return name


def escape_tag(text: str, dialect: Dialect = Dialect.STRICT) -> str:
    """Escape a tag key, tag value or field key: comma, equals sign and space (and backslash
    where the dialect doubles it)."""
    if dialect is _DOUBLING:
        return text.translate(_DOUBLED_TAG_ESCAPES)
    if " " in text or "," in text or "=" in text:
        return text.translate(_TAG_ESCAPES)
    return text


def escape_field_key(key: str, dialect: Dialect = Dialect.STRICT) -> str:
    """Escape a field key: as a tag key, and for InfluxDB 1.x `"` too, which its field keys
    unescape (so `a\\"b` can only be written as `a\\\\"b`)."""
    escaped = escape_tag(key, dialect)
    if dialect is _QUOTING and '"' in key:
        return escaped.replace('"', '\\"')
    return escaped


def format_field_value(value: FieldValue) -> str:
    """Format a field value: `true`/`false`, `123i`, float repr, or a quoted string.

    Formats only; `format_point` refuses string values that must not be written.
    """
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


def _cache_put(cache: dict[str, str], key: str, escaped: str) -> str:
    if len(cache) >= CACHE_LIMIT:
        cache.clear()
    cache[key] = escaped
    return escaped


def _escaped_measurement(name: str, dialect: Dialect) -> str:
    if problem := measurement_problem(name, dialect):
        raise ValueError(f"measurement {name!r} {problem}")
    return _cache_put(_CACHES[dialect][0], name, escape_measurement(name, dialect))


def _escaped_tag_set(items: tuple[tuple[str, str], ...], dialect: Dialect) -> str:
    escaped = []
    for key, value in items:
        if not value:
            continue  # omitted, see hub.dialects
        if problem := key_problem(key, "tag key", dialect):
            raise ValueError(f"tag key {key!r} {problem}")
        if problem := unrepresentable(value, dialect):
            raise ValueError(f"tag {key!r} value {value!r} {problem}")
        escaped.append((escape_tag(key, dialect), escape_tag(value, dialect)))
    # InfluxDB compares escaped keys byte-wise; in that order it need not sort them again.
    escaped.sort(key=lambda pair: pair[0].encode())
    tag_sets = _CACHES[dialect][1]
    if len(tag_sets) >= CACHE_LIMIT:
        tag_sets.clear()
    tag_sets[items] = text = "".join(f",{key}={value}" for key, value in escaped)
    return text


def _escaped_field_key(key: str, dialect: Dialect) -> str:
    if problem := key_problem(key, "field key", dialect):
        raise ValueError(f"field key {key!r} {problem}")
    return _cache_put(_CACHES[dialect][2], key, escape_field_key(key, dialect) + "=")


def _series(measurement: str, tags: Mapping[str, str], dialect: Dialect) -> str:
    """The escaped measurement and tag set of a line, checked for `dialect`."""
    measurements, tag_sets, _ = _CACHES[dialect]
    line = measurements.get(measurement) or _escaped_measurement(measurement, dialect)
    if tags:
        # Keyed by the tags in their given order: tuple(items) is cheaper than sorting.
        items = tuple(tags.items())
        tag_set = tag_sets.get(items)
        line += _escaped_tag_set(items, dialect) if tag_set is None else tag_set
    return line


def format_point(
    measurement: str,
    tags: Mapping[str, str],
    fields: Mapping[str, FieldValue],
    time_ns: int,
    dialect: Dialect = Dialect.STRICT,
) -> str:
    """Format one point as a line (no trailing newline) for `dialect`'s server, tags sorted,
    empty tag values omitted.

    Tags are sorted by escaped key, byte-wise, which is the order InfluxDB keeps them in.

    Raises ValueError with the reason for anything `hub.dialects` says `dialect` refuses,
    so what is written always reads back exactly from that server.
    """
    line = _series(measurement, tags, dialect)
    keys = _CACHES[dialect][2]
    if not fields:
        raise ValueError(f"measurement {measurement!r}: a point needs at least one field")
    sep = " "
    for key, value in fields.items():
        escaped_key = keys.get(key) or _escaped_field_key(key, dialect)
        kind = type(value)
        if kind is float:
            line = f"{line}{sep}{escaped_key}{value!r}"
        elif kind is bool:
            line = f"{line}{sep}{escaped_key}{'true' if value else 'false'}"
        elif kind is int:
            line = f"{line}{sep}{escaped_key}{value}i"
        elif kind is str and value.isascii() and "\n" not in value:  # type: ignore[union-attr,operator]
            if '"' in value or "\\" in value:  # type: ignore[operator]
                value = value.translate(_STRING_ESCAPES)  # type: ignore[union-attr]
            line = f'{line}{sep}{escaped_key}"{value}"'
        else:
            line = f"{line}{sep}{escaped_key}{_other_field_value(key, value, dialect)}"
        sep = ","
    return f"{line} {time_ns}"


_PLACEHOLDERS: dict[type, str] = {float: "%r", int: "%di"}
"""Per value type, what `format_point` writes for it, as a %-format placeholder (a float's
repr; an int with its `i`). Bools and strings have none: their shapes take `format_point`."""


def point_template(
    measurement: str,
    tags: Mapping[str, str],
    fields: Mapping[str, FieldValue],
    dialect: Dialect = Dialect.STRICT,
) -> str | None:
    """A %-format string for every point of this shape: `template % (*values, time_ns)` is
    exactly `format_point(measurement, tags, fields, time_ns, dialect)` for any `fields` with
    the same keys, in the same order, and values of the same types.

    The names are escaped and checked once, here (ValueError as `format_point`), so that a
    point of a known shape costs one `%` (the values' reprs). None when a value is not a
    float or an int: those shapes are formatted by `format_point`.
    """
    placeholders = []
    for value in fields.values():
        placeholder = _PLACEHOLDERS.get(type(value))
        if placeholder is None:
            return None
        placeholders.append(placeholder)
    if not fields:
        raise ValueError(f"measurement {measurement!r}: a point needs at least one field")
    text = [_series(measurement, tags, dialect).replace("%", "%%")]
    keys = _CACHES[dialect][2]
    sep = " "
    for key, placeholder in zip(fields, placeholders, strict=True):
        escaped_key = keys.get(key) or _escaped_field_key(key, dialect)
        text += (sep, escaped_key.replace("%", "%%"), placeholder)
        sep = ","
    text.append(" %d")
    return "".join(text)


def _other_field_value(key: str, value: FieldValue, dialect: Dialect) -> str:
    if isinstance(value, str) and (problem := string_problem(value, dialect)):
        raise ValueError(f"field {key!r} string value {problem}")
    return format_field_value(value)
