"""Unit tests of hub.lineprotocol: escaping, formatting and refusals, no server needed."""

from __future__ import annotations

from enum import IntEnum

import pytest

from hub.core import lineprotocol
from hub.core.lineprotocol import (
    Dialect,
    FieldValue,
    escape_measurement,
    escape_tag,
    format_field_value,
    format_point,
    unrepresentable,
)

pytestmark = pytest.mark.unit

T = 1_700_000_000_000_000_000


class Level(IntEnum):
    HIGH = 3


# --- escaping -------------------------------------------------------------------------------


def test_measurement_escapes_comma_and_space() -> None:
    """Commas and spaces in a measurement get a backslash."""
    assert escape_measurement("a b,c") == "a\\ b\\,c"


def test_measurement_keeps_equals_quote_and_backslash() -> None:
    """`=`, `"` and a lone backslash stay as they are in a measurement."""
    assert escape_measurement('a=b"c\\d') == 'a=b"c\\d'


def test_tag_escapes_comma_equals_and_space() -> None:
    """Commas, equals signs and spaces in tag text get a backslash."""
    assert escape_tag("a b,c=d") == "a\\ b\\,c\\=d"


def test_tag_keeps_quote_backslash_and_non_ascii() -> None:
    """Quotes, lone backslashes and non-ASCII stay as they are in tag text."""
    assert escape_tag('Küche"温度\\x') == 'Küche"温度\\x'


# --- field values ---------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "text"), [(True, "true"), (False, "false")])
def test_bool_is_true_or_false(value: bool, text: str) -> None:
    """Booleans are `true`/`false`, not integers."""
    assert format_field_value(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0i"),
        (-5, "-5i"),
        (2**63 - 1, "9223372036854775807i"),
        (-(2**63), "-9223372036854775808i"),
    ],
)
def test_int_gets_i_suffix(value: int, text: str) -> None:
    """Integers, up to the int64 limits, end in `i`."""
    assert format_field_value(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (21.5, "21.5"),
        (20.0, "20.0"),
        (1e16, "1e+16"),
        (1e-05, "1e-05"),
        (-0.0, "-0.0"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (0.1 + 0.2, "0.30000000000000004"),
    ],
)
def test_float_uses_shortest_exact_repr(value: float, text: str) -> None:
    """Floats use repr, which reads back to the same float64."""
    assert format_field_value(value) == text


def test_string_is_quoted() -> None:
    """Strings are double-quoted."""
    assert format_field_value("ok") == '"ok"'


def test_string_escapes_quote_and_backslash() -> None:
    """Quotes and backslashes in strings get a backslash, including a trailing one."""
    assert format_field_value('say "hi" \\o/ \\') == '"say \\"hi\\" \\\\o/ \\\\"'


def test_string_keeps_comma_space_equals_and_control_characters() -> None:
    """Inside quotes commas, spaces, `=`, tabs and CR need no escape."""
    assert format_field_value("a, b=c\t\r") == '"a, b=c\t\r"'


def test_int_subclass_is_an_integer() -> None:
    """An IntEnum member is written as its integer value."""
    assert format_field_value(Level.HIGH) == "3i"


def test_unsupported_type_is_a_type_error() -> None:
    """A value that is not float/int/bool/str raises TypeError."""
    with pytest.raises(TypeError):
        format_field_value(None)  # type: ignore[arg-type]


# --- format_point ---------------------------------------------------------------------------


def test_point_layout() -> None:
    """Measurement, tags, fields and time are joined as in line protocol."""
    line = format_point("climate", {"room": "kitchen"}, {"t": 21.5, "n": 3}, T)
    assert line == f"climate,room=kitchen t=21.5,n=3i {T}"


def test_tags_are_sorted_by_key() -> None:
    """Tags come out sorted by key whatever order they were given in."""
    line = format_point("m", {"b": "2", "a": "1", "c": "3"}, {"f": 1.0}, T)
    assert line == f"m,a=1,b=2,c=3 f=1.0 {T}"


def test_tags_are_sorted_by_escaped_key() -> None:
    """Tag order follows the escaped keys' bytes, as InfluxDB stores them."""
    line = format_point("m", {"a b": "1", "a!": "2"}, {"f": 1.0}, T)
    assert line == f"m,a!=2,a\\ b=1 f=1.0 {T}"


def test_non_ascii_string_value_is_written_as_is() -> None:
    """Non-ASCII string values take the checked path and come out unchanged."""
    assert format_point("m", {}, {"s": 'Küche "温度"'}, T) == f'm s="Küche \\"温度\\"" {T}'


def test_fields_keep_their_order() -> None:
    """Fields are written in the order given."""
    line = format_point("m", {}, {"z": 1, "a": True, "m": "x"}, T)
    assert line == f'm z=1i,a=true,m="x" {T}'


def test_empty_tag_value_is_omitted() -> None:
    """A tag with an empty value is left out: InfluxDB refuses `t=`."""
    assert format_point("m", {"a": "", "b": "x"}, {"f": 1}, T) == f"m,b=x f=1i {T}"


def test_empty_tag_value_is_omitted_whatever_its_key() -> None:
    """An omitted tag's key is not checked, as it is never written."""
    assert format_point("m", {"time": "", "": ""}, {"f": 1}, T) == f"m f=1i {T}"


def test_no_trailing_newline() -> None:
    """A formatted point is one line without a newline."""
    assert "\n" not in format_point("m", {"t": "v"}, {"f": 1, "s": "x"}, T)


def test_escapes_in_every_position() -> None:
    """Each position gets its own escaping."""
    line = format_point("Küche 温度,x", {"a b": "c=d,e"}, {"f g": 'say "hi"'}, T)
    assert line == f'Küche\\ 温度\\,x,a\\ b=c\\=d\\,e f\\ g="say \\"hi\\"" {T}'


def test_same_tags_in_other_order_give_same_line() -> None:
    """The tag cache keys on the given order but the output is sorted either way."""
    first = format_point("m", {"x": "1", "y": "2"}, {"f": 1}, T)
    assert format_point("m", {"y": "2", "x": "1"}, {"f": 1}, T) == first


def test_bool_field_is_not_written_as_integer() -> None:
    """True in a point is `true`, not `1i`."""
    assert format_point("m", {}, {"on": True}, T) == f"m on=true {T}"


def test_int_subclass_field_in_point() -> None:
    """Subclasses of the field types take the slow path and still format."""
    assert format_point("m", {}, {"level": Level.HIGH}, T) == f"m level=3i {T}"


def test_negative_time_is_written() -> None:
    """Times before 1970 are plain negative integers."""
    assert format_point("m", {}, {"f": 1}, -5) == "m f=1i -5"


def test_no_fields_is_refused() -> None:
    """A point needs at least one field."""
    with pytest.raises(ValueError, match="at least one field"):
        format_point("m", {"t": "v"}, {}, T)


# --- refusals -------------------------------------------------------------------------------

REFUSED: list[tuple[str, str, dict[str, str], dict[str, FieldValue]]] = [
    ("LF in measurement", "a\nb", {}, {"f": 1}),
    ("LF in tag value (injection)", "m", {"t": "x\nother,x=1 y=2"}, {"f": 1}),
    ("LF in tag key", "m", {"a\nb": "v"}, {"f": 1}),
    ("LF in field key", "m", {}, {"a\nb": 1}),
    ("LF in string value", "m", {}, {"s": "x\nother,x=1 y=2"}),
    ("CR in measurement", "a\rb", {}, {"f": 1}),
    ("CR in tag value", "m", {"t": "a\rb"}, {"f": 1}),
    ("NUL in tag key", "m", {"a\0": "v"}, {"f": 1}),
    ("trailing backslash in measurement", "m\\", {}, {"f": 1}),
    ("trailing backslash in tag value", "m", {"t": "a\\"}, {"f": 1}),
    ("trailing double backslash in tag key", "m", {"a\\\\": "v"}, {"f": 1}),
    ("trailing backslash in field key", "m", {}, {"f\\": 1}),
    ("double backslash in tag value", "m", {"t": "a\\\\b"}, {"f": 1}),
    ("backslash before comma", "m", {"t": "a\\,b"}, {"f": 1}),
    ("backslash before space", "a\\ b", {}, {"f": 1}),
    ("backslash before equals in measurement", "a\\=b", {}, {"f": 1}),
    ("backslash before equals in tag key", "m", {"a\\=b": "v"}, {"f": 1}),
    ("backslash before equals in field key", "m", {}, {"a\\=b": 1}),
    ("backslash before quote in measurement", 'a\\"b', {}, {"f": 1}),
    ("leading # in measurement", "#m", {}, {"f": 1}),
    ("leading tab in measurement", "\tm", {}, {"f": 1}),
    ("leading tab in field key", "m", {}, {"\tf": 1}),
    ("quote in field key", "m", {}, {'a"b': 1}),
    ("empty measurement", "", {}, {"f": 1}),
    ("empty tag key", "m", {"": "v"}, {"f": 1}),
    ("empty field key", "m", {}, {"": 1}),
    ("tag key time", "m", {"time": "v"}, {"f": 1}),
    ("field key time", "m", {}, {"time": 1}),
    ("lone surrogate", "m", {"t": "\ud800"}, {"f": 1}),
    ("lone surrogate in string value", "m", {}, {"s": "a\udfff"}),
]


@pytest.mark.parametrize(
    ("measurement", "tags", "fields"), [case[1:] for case in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_format_point_refuses(
    measurement: str, tags: dict[str, str], fields: dict[str, FieldValue]
) -> None:
    """Text that would not read back exactly raises ValueError instead of being written."""
    with pytest.raises(ValueError):  # the wording of reasons is tested below
        format_point(measurement, tags, fields, T)


def test_refusal_names_position_and_text() -> None:
    """The error says where the bad text is and why."""
    with pytest.raises(ValueError, match=r"tag 't' value 'a\\\\' ends with a backslash"):
        format_point("m", {"t": "a\\"}, {"f": 1}, T)


def test_influxdb_allows_line_feeds_in_string_values_only() -> None:
    """For InfluxDB itself a string value may hold a line feed; names and tags still may not."""
    line = format_point("m", {}, {"s": "a\nb"}, T, Dialect.INFLUXDB_1)
    assert line == 'm s="a\nb" ' + str(T)
    with pytest.raises(ValueError, match="line feed"):
        format_point("m", {"t": "a\nb"}, {"f": 1}, T, Dialect.INFLUXDB_1)


def test_refused_text_is_refused_again() -> None:
    """A refusal is not cached as if it were escaped text."""
    for _ in range(2):
        with pytest.raises(ValueError, match="line feed"):
            format_point("m", {"t": "x\ny"}, {"f": 1}, T)


@pytest.mark.parametrize(
    "text",
    ["plain", "Küche 温度", "a b,c=d", 'say "hi"', "a\\b", "\\a", "a\\nb", "a\tb", "#1", "x😀"],
)
def test_unrepresentable_accepts(text: str) -> None:
    """Text that reads back exactly in every identifier position has no reason."""
    assert unrepresentable(text) is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a\nb", "line feed"),
        ("a\rb", "carriage return"),
        ("a\0b", "NUL"),
        ("a\\", "ends with a backslash"),
        ("a\\\\", "ends with a backslash"),
        ("a\\\\b", "backslash before another backslash"),
        ("a\\,b", "backslash before a comma"),
        ("a\\ b", "backslash before a space"),
        ("\udc80", "surrogate"),
    ],
)
def test_unrepresentable_gives_reason(text: str, reason: str) -> None:
    """Each refused character class comes with its own reason."""
    problem = unrepresentable(text)
    assert problem is not None
    assert reason in problem


@pytest.mark.parametrize("text", ["", "#m", "time", "a\\=b", 'a\\"b', '"', "\ta"])
def test_unrepresentable_leaves_position_rules_to_format_point(text: str) -> None:
    """Text that is fine as a tag value passes unrepresentable, whatever other positions say."""
    assert unrepresentable(text) is None
    format_point("m", {"t": text}, {"f": 1}, T)


# --- caches ---------------------------------------------------------------------------------


def test_caches_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """More distinct names than the cache limit do not grow the caches past it."""
    monkeypatch.setattr(lineprotocol, "CACHE_LIMIT", 16)
    for i in range(100):
        format_point(f"m{i}", {"t": str(i)}, {f"f{i}": i}, T)
    for cache in lineprotocol._CACHES[Dialect.STRICT]:
        assert len(cache) <= 16


def test_cached_and_uncached_output_match() -> None:
    """The second, cached formatting of a point is the same as the first."""
    args = ("cache test", {"k": "v w"}, {"f=": 1.5}, T)
    assert format_point(*args) == format_point(*args)
