"""Unit tests of the line-protocol dialects (hub.dialects) and their formatting, no server."""

from __future__ import annotations

from typing import Any

import pytest

from hub.core.dialects import Dialect, key_problem, measurement_problem, string_problem
from hub.core.lineprotocol import FieldValue, escape_measurement, escape_tag, format_point

pytestmark = pytest.mark.unit

T = 1_700_000_000_000_000_000


def refusal(
    dialect: Dialect,
    measurement: str = "m",
    tags: dict[str, str] | None = None,
    fields: dict[str, FieldValue] | None = None,
) -> str | None:
    """The reason `dialect` refuses the point, or None when it formats it."""
    try:
        format_point(measurement, tags or {}, fields or {"f": 1.0}, T, dialect)
    except ValueError as exc:
        return str(exc)
    return None


# --- InfluxDB 1.x: what it stores exactly is accepted ----------------------------------------


def test_influxdb_1_writes_the_measured_backslash_tag_exactly() -> None:
    """The issue's measured case: `C:\\ dir\\,x\\=y` is a raw backslash, then the escape."""
    line = format_point("p", {"path": "C:\\ dir\\,x\\=y"}, {"v": 1.0}, 5, Dialect.INFLUXDB_1)
    assert line == "p,path=C:\\\\ dir\\\\,x\\\\=y v=1.0 5"


@pytest.mark.parametrize(
    "value", ["C:\\ dir", 'v a,l=u"e\\ é', "a\\\\b", "\\,lead", "a\\=b", "\\\\\\ x"]
)
def test_influxdb_1_accepts_backslashes_in_tags_that_strict_refuses(value: str) -> None:
    """Backslashes before a space, comma, `=` or another backslash are fine in 1.x tags."""
    assert refusal(Dialect.INFLUXDB_1, tags={"t": value}) is None
    assert refusal(Dialect.INFLUXDB_1, tags={value: "v"}) is None
    assert refusal(Dialect.STRICT, tags={"t": value + "\\\\"}) is not None


@pytest.mark.parametrize("value", ["a\\", "a\\\\", "\\"])
def test_influxdb_1_refuses_a_trailing_backslash_everywhere(value: str) -> None:
    """A trailing backslash would escape the separator after it."""
    for reason in (
        refusal(Dialect.INFLUXDB_1, measurement=value),
        refusal(Dialect.INFLUXDB_1, tags={"t": value}),
        refusal(Dialect.INFLUXDB_1, tags={value: "v"}),
        refusal(Dialect.INFLUXDB_1, fields={value: 1.0}),
    ):
        assert reason is not None and "ends with a backslash" in reason


@pytest.mark.parametrize(
    ("key", "refused"),
    [
        ("a\\ b", True),
        ("a\\\\ b", False),
        ("a\\\\\\ b", True),
        ("a\\\\,b", False),
        ("a\\=b", True),
        ("a\\\\=b", False),
        ('a\\"b', False),
        ('a"b', False),
        ("a\\\\b", False),
    ],
)
def test_influxdb_1_field_keys_need_an_even_backslash_run_before_a_separator(
    key: str, refused: bool
) -> None:
    """InfluxDB's field scanner pairs backslashes; its unescaping does not."""
    assert (key_problem(key, "field key", Dialect.INFLUXDB_1) is not None) is refused


@pytest.mark.parametrize("name", ["a\\ b", "a\\,b", "a\\=b", 'a\\"b', "\\\\ x"])
def test_influxdb_1_refuses_a_backslash_before_a_separator_in_a_measurement(name: str) -> None:
    """InfluxDB drops or splits at a backslash before `,`, space, `=` or `"` in a measurement."""
    assert measurement_problem(name, Dialect.INFLUXDB_1) is not None


def test_influxdb_1_keeps_literal_backslashes_in_measurements() -> None:
    """`a\\\\b` (two backslashes) is written as it is and reads back as it is."""
    assert format_point("a\\\\b", {}, {"f": 1.0}, T, Dialect.INFLUXDB_1).startswith("a\\\\b ")


def test_influxdb_1_accepts_a_double_quote_in_a_field_key() -> None:
    """Only VictoriaMetrics misreads `"` in a field key."""
    assert refusal(Dialect.INFLUXDB_1, fields={'a"b': 1.0}) is None
    assert refusal(Dialect.STRICT, fields={'a"b': 1.0}) is not None


@pytest.mark.parametrize("dialect", [Dialect.INFLUXDB_1, Dialect.INFLUXDB_2])
def test_influxdb_stores_line_feeds_in_string_values(dialect: Dialect) -> None:
    """InfluxDB reads a line feed inside quotes as text; VictoriaMetrics splits there."""
    assert string_problem("a\nb", dialect) is None
    assert string_problem("a\nb", Dialect.VICTORIA_METRICS) is not None
    assert string_problem("a\nb", Dialect.STRICT) is not None


# --- VictoriaMetrics: doubled backslashes ----------------------------------------------------


def test_victoria_metrics_doubles_every_backslash() -> None:
    """Each backslash in a name is written as two, escapes after it as usual."""
    assert escape_tag("C:\\ dir\\", Dialect.VICTORIA_METRICS) == "C:\\\\\\ dir\\\\"
    assert escape_measurement("a\\b c", Dialect.VICTORIA_METRICS) == "a\\\\b\\ c"


@pytest.mark.parametrize("text", ["a\\", "a\\\\ b", "\\", "a\\=b", "\r", "a\0b", "\tlead"])
def test_victoria_metrics_accepts_what_it_stores_exactly(text: str) -> None:
    """Trailing backslashes, CR, NUL and leading tabs read back exactly from VictoriaMetrics."""
    assert refusal(Dialect.VICTORIA_METRICS, measurement="m" + text) is None
    assert refusal(Dialect.VICTORIA_METRICS, tags={"t": text}) is None
    assert refusal(Dialect.VICTORIA_METRICS, fields={"k" + text: 1.0}) is None


def test_victoria_metrics_accepts_time_as_a_key() -> None:
    """`time` is a name like any other there (only InfluxDB refuses it)."""
    assert refusal(Dialect.VICTORIA_METRICS, tags={"time": "v"}, fields={"time": 1.0}) is None


@pytest.mark.parametrize(
    ("measurement", "tags", "fields"),
    [
        ("m", {}, {'a"b': 1.0}),
        ("a\nb", {}, {"f": 1.0}),
        ("#m", {}, {"f": 1.0}),
        ("m", {"": "v"}, {"f": 1.0}),
        ("m", {}, {"s": "a\nb"}),
    ],
)
def test_victoria_metrics_refuses(
    measurement: str, tags: dict[str, str], fields: dict[str, FieldValue]
) -> None:
    """Quotes in field keys, line feeds, comments and empty names stay refused."""
    assert refusal(Dialect.VICTORIA_METRICS, measurement, tags, fields) is not None


# --- InfluxDB 2.x ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("measurement", "tags", "fields", "reason"),
    [
        ("a\tb", {}, {"f": 1.0}, "control character"),
        ("m", {"t": "a\x1bb"}, {"f": 1.0}, "control character"),
        ("_m", {}, {"f": 1.0}, "reserves"),
        ("m", {"_t": "v"}, {"f": 1.0}, "reserves"),
        ("m", {}, {"_f": 1.0}, "reserves"),
        ("m", {"t": "a\\"}, {"f": 1.0}, "ends with a backslash"),
    ],
)
def test_influxdb_2_refuses(
    measurement: str, tags: dict[str, str], fields: dict[str, FieldValue], reason: str
) -> None:
    """Control characters in names, reserved `_` names and trailing backslashes."""
    got = refusal(Dialect.INFLUXDB_2, measurement, tags, fields)
    assert got is not None and reason in got


def test_influxdb_2_keeps_backslashes_literal_like_1x() -> None:
    """A raw backslash then an escaped space, as the 2.x parser reads it."""
    line = format_point("m", {"t": "C:\\ dir"}, {"f": 1.0}, 5, Dialect.INFLUXDB_2)
    assert line == "m,t=C:\\\\ dir f=1.0 5"


# --- strict: today's union, unchanged -------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "fields"),
    [({"t": "C:\\ dir"}, {}), ({"t": "a\\\\b"}, {}), ({}, {'a"b': 1.0}), ({"time": "v"}, {})],
)
def test_strict_keeps_the_union_of_refusals(tags: dict[str, str], fields: dict[str, Any]) -> None:
    """What one of InfluxDB 1.6 and VictoriaMetrics reads differently stays refused."""
    assert refusal(Dialect.STRICT, tags=tags, fields=fields or None) is not None


def test_default_dialect_is_strict() -> None:
    """format_point without a dialect applies the strict rules."""
    with pytest.raises(ValueError, match=r"InfluxDB 1\.6 and VictoriaMetrics"):
        format_point("m", {"t": "C:\\ dir"}, {"f": 1.0}, T)


def test_caches_are_per_dialect() -> None:
    """A name escaped for one dialect is not reused for another."""
    args = ("m", {"t": "a\\b"}, {"f": 1.0}, T)
    assert format_point(*args, Dialect.INFLUXDB_1) == f"m,t=a\\b f=1.0 {T}"
    assert format_point(*args, Dialect.VICTORIA_METRICS) == f"m,t=a\\\\b f=1.0 {T}"
    assert format_point(*args, Dialect.INFLUXDB_1) == f"m,t=a\\b f=1.0 {T}"


def test_refusals_are_not_cached_across_dialects() -> None:
    """Text refused by one dialect and accepted by another is judged by each."""
    tags = {"t": "C:\\ dir"}
    assert refusal(Dialect.INFLUXDB_1, tags=tags) is None
    assert refusal(Dialect.STRICT, tags=tags) is not None
    assert refusal(Dialect.INFLUXDB_1, tags=tags) is None


# --- spool codes ----------------------------------------------------------------------------


def test_every_dialect_has_a_code_that_maps_back() -> None:
    """Spool records store a dialect as one byte; each reads back as itself."""
    codes = {dialect.code for dialect in Dialect}
    assert len(codes) == len(Dialect)
    assert all(Dialect.from_code(dialect.code) is dialect for dialect in Dialect)
    assert Dialect.from_code(200) is None
