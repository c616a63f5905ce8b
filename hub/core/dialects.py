r"""Which text each kind of server stores exactly: the line-protocol dialects. Pure code.

The hub writes to one server, and knows which kind (`hub.influx` asks its `/ping`):

* `INFLUXDB_1`: InfluxDB 1.x, whenever the hub writes with the v1 `/write` API.
* `INFLUXDB_2`: InfluxDB 2.x, 3.x, Cloud and 1.8+ (the v2 API, `/ping` naming an InfluxDB
  version or build).
* `VICTORIA_METRICS`: VictoriaMetrics (the v2 API, the server says it is VictoriaMetrics).
* `STRICT`: a server of unknown kind, or none yet (spool-only mode): the union of the
  InfluxDB 1.6.7 and VictoriaMetrics rules, so that its text reads back exactly on both.
* `LEGACY`: never formatted for, only read: spool records of hubs before dialects, which
  followed the strict rules but let line feeds into string values when the server was
  InfluxDB.

Each dialect has a spelling (how text is escaped) and its refusals. Two spellings exist:

* literal backslashes (STRICT, INFLUXDB_1, INFLUXDB_2): a backslash goes in as it is; a
  space or comma (and `=` outside measurements) gets a backslash before it. InfluxDB keeps
  a backslash unless it comes before a character it escapes, so `C:\ dir` is written
  `C:\\ dir` (a raw backslash, then the escaped space) and reads back exactly.
* doubled backslashes (VICTORIA_METRICS): every backslash is written `\\`, which
  VictoriaMetrics reads as one, so every backslash reads back exactly, a trailing one too.

Found by writing every character class in every position to a real InfluxDB 1.6.7 and a
real VictoriaMetrics 1.79 and reading it back (tests/test_lineprotocol_roundtrip.py and
tests/test_dialect_roundtrip.py repeat all of it); for InfluxDB 2.x from its documentation
(line protocol reference, "Special characters" and "Naming restrictions") and the facts of
influxdata/line-protocol's test corpus (tests/test_dialect_influxdb2.py). `R` = refused:

  text                      STRICT        INFLUXDB_1        INFLUXDB_2        VICTORIA_M.
  LF in a name              R             R                 R                 R
  LF in a string value      R             -                 -                 R (splits)
  CR, NUL in a name         R (InfluxQL)  R (InfluxQL)      R                 -
  other control characters  -             -                 R (not allowed)   -
  leading tab (measurement,
    field key)              R (stripped)  R (stripped)      R                 -
  leading # (measurement)   R (comment)   R                 R                 R
  empty name                R             R                 R                 R
  tag or field key `time`   R             R                 R                 -
  leading `_` (any name)    -             -                 R (reserved)      -
  `"` in a field key        R (VM)        -                 -                 R
  trailing backslash        R             R                 R                 -
  \ before \ , or space     R (disagree)  - in tags; R in   same as           -
                                          measurements; in  INFLUXDB_1
                                          field keys, see below
  \ before =                R but in tag  R in measure-     same as           -
                            values        ments; field      INFLUXDB_1
                                          keys: see below
  \ before "                R in measure- R in measure-     R in measure-     -
                            ments, field  ments (field      ments and
                            keys          keys: `\\"`)      field keys

LEGACY has STRICT's column, except that it allows a line feed in a string value.

In an INFLUXDB_1 field key InfluxDB's scanner pairs up backslashes while its unescaping
does not: an even run of backslashes before a space, comma or `=` reads back exactly, an
odd one splits the key. Its field keys unescape `\"`, so INFLUXDB_1 writes a `"` in a field
key as `\"` (measured: `a\"b` reads back only when written `a\\"b`). An empty tag value is
left out in every dialect (InfluxDB refuses `t=`; a missing tag matches `WHERE t = ''`).
String values are always quoted with `\` and `"` escaped, which every server reads back
exactly.
"""

from __future__ import annotations

import enum
import re


class Dialect(enum.Enum):
    """The kind of server line protocol is written for (see the module docstring)."""

    STRICT = "strict"
    LEGACY = "legacy"
    INFLUXDB_1 = "influxdb1"
    INFLUXDB_2 = "influxdb2"
    VICTORIA_METRICS = "victoriametrics"

    # Members are singletons compared by identity; Enum's own __hash__ is Python code, and
    # format_point looks its caches up by dialect once per point.
    __hash__ = object.__hash__

    @property
    def doubles_backslashes(self) -> bool:
        """Whether this dialect writes every backslash in a name as two."""
        return self is Dialect.VICTORIA_METRICS

    @property
    def escapes_quotes_in_field_keys(self) -> bool:
        """Whether this dialect writes `"` in a field key as `\\"` (InfluxDB 1.x unescapes it)."""
        return self is Dialect.INFLUXDB_1

    @property
    def has_field_types(self) -> bool:
        """Whether the server keeps one type per field (a write of another type is refused)."""
        return self in (Dialect.INFLUXDB_1, Dialect.INFLUXDB_2)

    @property
    def multiline_strings(self) -> bool:
        """Whether a line feed inside a string field value is stored as text."""
        return self in (Dialect.INFLUXDB_1, Dialect.INFLUXDB_2, Dialect.LEGACY)

    def reads_as(self, other: Dialect) -> bool:
        """Whether every line formatted for this dialect is accepted by `other` and means the
        same point there as written: the same dialect, or strict text for InfluxDB 1.x or
        VictoriaMetrics (strict refuses all either refuses, and every backslash it lets
        through comes before a character neither escapes)."""
        return self is other or other in _READS_AS.get(self, ())

    @property
    def code(self) -> int:
        """The one-byte code of this dialect in spool records."""
        return _CODES[self]

    @classmethod
    def from_code(cls, code: int) -> Dialect | None:
        """The dialect of a spool record's code; None for a code this hub does not know."""
        return _DIALECTS.get(code)


_CODES = {
    Dialect.STRICT: 0,
    Dialect.INFLUXDB_1: 1,
    Dialect.INFLUXDB_2: 2,
    Dialect.VICTORIA_METRICS: 3,
    Dialect.LEGACY: 4,
}
_DIALECTS = {code: dialect for dialect, code in _CODES.items()}

_READS_AS = {
    Dialect.STRICT: (Dialect.INFLUXDB_1, Dialect.VICTORIA_METRICS),
    Dialect.LEGACY: (Dialect.INFLUXDB_1,),  # its line feeds in strings split on VictoriaMetrics
}
# Module constants and frozensets: attribute access on an Enum class and Enum properties are
# Python code, and these rules run for every name not seen before.
_VM = Dialect.VICTORIA_METRICS
_V2 = Dialect.INFLUXDB_2
_STRICT = frozenset({Dialect.STRICT, Dialect.LEGACY})
_INFLUX = frozenset({Dialect.STRICT, Dialect.LEGACY, Dialect.INFLUXDB_1, Dialect.INFLUXDB_2})
_QUOTE_IN_FIELD_KEY = frozenset({Dialect.STRICT, Dialect.LEGACY, Dialect.VICTORIA_METRICS})
_BAD_AFTER_BACKSLASH = {"\\": "another backslash", " ": "a space", ",": "a comma"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A run of backslashes right before a space, comma or `=` (INFLUXDB_1 field keys).
_RUN_BEFORE_SEPARATOR = re.compile(r"(\\+)[ ,=]")


def unrepresentable(text: str, dialect: Dialect = Dialect.STRICT) -> str | None:
    """Why `text` cannot be written exactly in any name position for `dialect`, or None.

    These rules hold for measurements, tag keys, tag values and field keys alike, and are
    all the rules of a (non-empty) tag value; the other positions add theirs in
    `measurement_problem` and `key_problem`.
    """
    if text.isascii() and text.isprintable():
        # Fast path: only the backslash rules can apply.
        if "\\" not in text:
            return None
    else:
        if "\n" in text:
            return "contains a line feed, which ends the line protocol line"
        if dialect in _INFLUX:
            if "\r" in text:
                return "contains a carriage return, which InfluxQL cannot quote"
            if "\0" in text:
                return "contains a NUL character, which InfluxQL cannot quote"
        if dialect is _V2 and _CONTROL.search(text):
            return "contains a control character, which InfluxDB 2 does not allow in names"
        try:
            text.encode()
        except UnicodeEncodeError:
            return "is not valid Unicode (lone surrogate)"
    if dialect is _VM or "\\" not in text:
        return None
    if text.endswith("\\"):
        return "ends with a backslash, which would escape the separator after it"
    if dialect in _STRICT:
        start = text.find("\\")
        while start != -1:
            if (after := _BAD_AFTER_BACKSLASH.get(text[start + 1])) is not None:
                return (
                    f"has a backslash before {after}, which InfluxDB 1.6 and VictoriaMetrics "
                    "read back differently"
                )
            start = text.find("\\", start + 2)
    return None


def measurement_problem(name: str, dialect: Dialect = Dialect.STRICT) -> str | None:
    """Why `name` cannot be a measurement in `dialect`, or None."""
    if not name:
        return "is empty"
    first = name[0]
    if first == "#":
        return "starts with '#', which makes the line a comment that is silently dropped"
    if first == "\t" and dialect in _INFLUX:
        return "starts with a tab, which InfluxDB strips"
    if first == "_" and dialect is _V2:
        return "starts with '_', which InfluxDB 2 reserves for its own names"
    problem = unrepresentable(name, dialect)
    if problem or "\\" not in name or dialect not in _INFLUX:
        return problem
    if "\\=" in name or '\\"' in name:
        return "has a backslash before '=' or '\"', which InfluxDB drops in a measurement"
    if dialect not in _STRICT and ("\\ " in name or "\\," in name):
        return "has a backslash before a space or comma, which splits an InfluxDB measurement"
    return None


def key_problem(key: str, what: str, dialect: Dialect = Dialect.STRICT) -> str | None:
    """Why `key` cannot be a `what` ("tag key" or "field key") in `dialect`, or None."""
    if not key:
        return "is empty"
    if dialect is not _VM:
        if key == "time":
            return f"is 'time', which InfluxDB does not accept as a {what}"
        if dialect is _V2 and key[0] == "_":
            return "starts with '_', which InfluxDB 2 reserves for its own names"
    field = what == "field key"
    if field:
        if key[0] == "\t" and dialect in _INFLUX:
            return "starts with a tab, which InfluxDB strips"
        if '"' in key and dialect in _QUOTE_IN_FIELD_KEY:
            return "contains '\"', which VictoriaMetrics misreads in a field key"
    problem = unrepresentable(key, dialect)
    if problem or "\\" not in key or dialect is _VM:
        return problem
    if dialect in _STRICT:
        if "\\=" in key:
            return f"has a backslash before '=', which does not read back exactly in a {what}"
    elif field:
        if '\\"' in key and dialect is _V2:
            return "has a backslash before '\"', which InfluxDB 2 parsers read differently"
        for run in _RUN_BEFORE_SEPARATOR.finditer(key):
            if len(run.group(1)) % 2:
                return (
                    "has an odd number of backslashes before a space, comma or '=', "
                    "which splits an InfluxDB field key"
                )
    return None


def string_problem(value: str, dialect: Dialect = Dialect.STRICT) -> str | None:
    """Why `value` cannot be a string field value in `dialect`, or None."""
    if "\n" in value and not dialect.multiline_strings:
        return "contains a line feed, which this server reads as the end of the line"
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            return "is not valid Unicode (lone surrogate)"
    return None
