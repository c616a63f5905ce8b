r"""InfluxDB line protocol formatting for the hub's hot path, and what it must refuse.

Findings from writing every character class in every position to a real InfluxDB 1.6.7
(`POST /write?precision=ns`, read back with InfluxQL both as `SELECT * FROM /.*/` and by
quoted name) and a real VictoriaMetrics 1.79 (`/write` and `/api/v2/write`, read back with
`/api/v1/export`); tests/test_lineprotocol_roundtrip.py repeats all of it. The rules are
the union of both servers': an accepted point reads back exactly from InfluxDB, gives
exactly the expected series in VictoriaMetrics, and never adds a point on either.
`format_point` raises ValueError with the reason for a refused point; `unrepresentable`
gives the reason for the rules shared by all names.

`\x` = written with a backslash, `-` = written as is, Rn = refused, reason below.

  text in the reading      measurement  tag key  tag value  field key  string value
  space, comma             \x           \x       \x         \x         -
  =                        -            \x       \x         \x         -
  "                        -            -        -          R1         \x
  \ before anything else   -            -        -          -          \x
  \ at the end             R2           R2       R2         R2         \x
  \ before \ , or space    R3           R3       R3         R3         \x
  \ before =               R4           R3       -          R4         \x
  \ before "               R4           -        -          R1         \x
  LF (\n)                  R5           R5       R5         R5         R6
  CR (\r), NUL             R7           R7       R7         R7         -
  leading tab              R8           -        -          R8         -
  leading #                R9           -        -          -          -
  tab elsewhere, `'`, non-ASCII ("Küche 温度", emoji), other control chars, U+2028: -
  "" (empty)               R10          R10      omitted    R10        -
  "time"                   -            R11      -          R11        -

R1  VictoriaMetrics scans field keys for quotes: a `"` swallows the point's other fields,
    and `\"` keeps its backslash. (InfluxDB stores both; balanced quotes such as `"a"`
    happen to work on VictoriaMetrics but are refused too, to keep the rule simple.)
R2  A trailing backslash escapes the separator after it, on both servers.
R3  The servers disagree on backslashes: InfluxDB 1.6.7 keeps a backslash unless the
    next character is one it escapes, VictoriaMetrics always reads `\\` as one
    backslash. So `a\\b` comes back as `a\b` from VictoriaMetrics, and `\,` `\ ` `\=`
    written as `\\,` ... split the name there; no spelling works on both.
R4  InfluxDB drops the backslash of `\=` and `\"` in a measurement, and cannot parse
    `\\=` in a field key.
R5  Both servers end the line at LF; the rest becomes another point (`x\nother,x=1 y=2`
    in a tag value creates measurement `other`). Line protocol has no escape for it:
    `\n` reads back as backslash + n.
R6  InfluxDB keeps an LF inside a quoted string exactly, but VictoriaMetrics splits the
    body at every LF, even inside quotes, and writes the rest as a point of its own. So
    it is refused unless the caller knows the server is InfluxDB (`multiline_strings`,
    which the hub sets when the server's /ping names an InfluxDB version).
R7  Both servers store them exactly, but InfluxQL cannot quote them (a quoted name or
    string containing CR or NUL is a parse error), so no query could name the series.
R8  InfluxDB skips tabs (and NULs) at the start of the line and of the field section,
    so the first field key would lose it; every field key is checked alike.
R9  A line starting with `#` is a comment: InfluxDB answers 204 and stores nothing.
R10 Empty names are a parse error on InfluxDB. An empty tag value is left out instead:
    InfluxDB refuses `t=`, and a missing tag already matches `WHERE t = ''`.
R11 InfluxDB refuses a point with tag key `time` (400) and silently drops a field `time`.

String field values are `"`-quoted with `\` and `"` escaped, so CR, tabs, NUL and a
trailing backslash all read back exactly from InfluxDB. Not escaping but worth knowing:
VictoriaMetrics keeps every value as a float64 of about 12 significant digits (strings
become 0, bools 1/0) and trims timestamps to milliseconds; InfluxDB's JSON shows -0.0 as 0.
"""

from __future__ import annotations

from collections.abc import Mapping

FieldValue = float | int | bool | str

CACHE_LIMIT = 16384
"""Entries per escape cache; a full cache is cleared rather than evicted entry by entry."""

_MEASUREMENT_ESCAPES = str.maketrans({",": "\\,", " ": "\\ "})
_TAG_ESCAPES = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"'})
_BAD_AFTER_BACKSLASH = {"\\": "another backslash", " ": "a space", ",": "a comma"}

# Escaped forms of texts already checked: names and tag sets repeat, so the hot path is
# mostly dict hits.
_measurements: dict[str, str] = {}
_tag_sets: dict[tuple[tuple[str, str], ...], str] = {}
_field_keys: dict[str, str] = {}


def escape_measurement(name: str) -> str:
    """Escape a measurement name: comma and space."""
    # `in` tests are ~10x cheaper than translate, and most names need no escape.
    if " " in name or "," in name:
        return name.translate(_MEASUREMENT_ESCAPES)
    return name


def escape_tag(text: str) -> str:
    """Escape a tag key, tag value or field key: comma, equals sign and space."""
    if " " in text or "," in text or "=" in text:
        return text.translate(_TAG_ESCAPES)
    return text


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


def unrepresentable(text: str) -> str | None:
    """Why `text` cannot be written exactly in any identifier position, or None.

    These rules hold for measurements, tag keys, tag values and field keys alike;
    `format_point` adds the rules of each position (empty, leading `#`
    or tab, `time`, `\\=`, `"`, see the module docstring).
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
    if problem := unrepresentable(name):
        return problem
    if "\\=" in name or '\\"' in name:
        return "has a backslash before '=' or '\"', which InfluxDB drops in a measurement"
    return None


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
    if problem := unrepresentable(key):
        return problem
    if "\\=" in key:
        return f"has a backslash before '=', which does not read back exactly in a {what}"
    return None


def _string_problem(value: str, multiline: bool = False) -> str | None:
    if "\n" in value and not multiline:
        return "contains a line feed, which this server reads as the end of the line"
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            return "is not valid Unicode (lone surrogate)"
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
    for key, value in items:
        if not value:
            continue  # omitted, see the module docstring
        if problem := _key_problem(key, "tag key"):
            raise ValueError(f"tag key {key!r} {problem}")
        if problem := unrepresentable(value):
            raise ValueError(f"tag {key!r} value {value!r} {problem}")
        escaped.append((escape_tag(key), escape_tag(value)))
    # InfluxDB compares escaped keys byte-wise; in that order it need not sort them again.
    escaped.sort(key=lambda pair: pair[0].encode())
    if len(_tag_sets) >= CACHE_LIMIT:
        _tag_sets.clear()
    _tag_sets[items] = text = "".join(f",{key}={value}" for key, value in escaped)
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
    multiline_strings: bool = False,
) -> str:
    """Format one point as a line (no trailing newline), tags sorted, empty tag values omitted.

    `multiline_strings` allows line feeds inside string field values: InfluxDB reads them
    exactly, VictoriaMetrics splits the point there (see the table above).

    Tags are sorted by escaped key, byte-wise, which is the order InfluxDB keeps them in.

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
        elif kind is str and value.isascii() and "\n" not in value:  # type: ignore[union-attr,operator]
            if '"' in value or "\\" in value:  # type: ignore[operator]
                value = value.translate(_STRING_ESCAPES)  # type: ignore[union-attr]
            line = f'{line}{sep}{escaped_key}"{value}"'
        else:
            line = f"{line}{sep}{escaped_key}{_other_field_value(key, value, multiline_strings)}"
        sep = ","
    return f"{line} {time_ns}"


def _other_field_value(key: str, value: FieldValue, multiline: bool) -> str:
    if isinstance(value, str) and (problem := _string_problem(value, multiline)):
        raise ValueError(f"field {key!r} string value {problem}")
    return format_field_value(value)
