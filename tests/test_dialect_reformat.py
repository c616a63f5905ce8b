"""Unit tests of hub.reformat: a batch formatted for one dialect, re-checked for another."""

from __future__ import annotations

import functools
import itertools
import random

import pytest

from hub.core.dialects import Dialect
from hub.core.lineprotocol import FieldValue, format_point
from hub.core.reformat import parse_point, reformat_batch

pytestmark = pytest.mark.unit

T = 1_700_000_000_000_000_000
ALPHABET = "ab ,=\"'\\\t#_ü温😀\r\n\0"
PAIRS = list(itertools.product(Dialect, Dialect))
Point = tuple[str, dict[str, str], dict[str, FieldValue], int]


def random_point(rng: random.Random) -> tuple[str, dict[str, str], dict[str, FieldValue]]:
    """A point with random tricky text everywhere and one value of each type."""

    def text() -> str:
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4)))

    tags = {text(): text() for _ in range(rng.randint(0, 3))}
    fields: dict[str, FieldValue] = {
        text(): rng.random() * 1e6,
        text(): rng.randint(-(2**63), 2**63 - 1),
        text(): rng.random() < 0.5,
        text(): text(),
    }
    return text(), tags, fields


@functools.cache
def accepted(dialect: Dialect, count: int, seed: int) -> list[Point]:
    """`count` random points `dialect` accepts, with their times (made once per arguments)."""
    rng, points = random.Random(seed), list[Point]()
    while len(points) < count:
        measurement, tags, fields = random_point(rng)
        point: Point = (measurement, tags, fields, T + len(points))
        try:
            format_point(*point, dialect)
        except ValueError:
            continue
        points.append(point)
    return points


def written(point: Point) -> Point:
    """The point as it is stored: empty tag values are left out."""
    measurement, tags, fields, time_ns = point
    return measurement, {k: v for k, v in tags.items() if v}, fields, time_ns


@pytest.mark.parametrize("dialect", list(Dialect))
def test_each_dialect_reads_its_own_lines_back_into_the_same_points(dialect: Dialect) -> None:
    """parse_point inverts format_point, line feeds in string values included."""
    points = accepted(dialect, 150, seed=1)
    body = "\n".join(format_point(*point, dialect) for point in points)
    position = 0
    for point in points:
        parsed, position = parse_point(body, position, dialect)
        assert (parsed.measurement, parsed.tags, parsed.fields, parsed.time_ns) == written(point)
        position += 1
    assert position == len(body) + 1


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=lambda d: d.value)
def test_a_batch_is_spelled_for_its_target_or_refused_with_the_reason(
    source: Dialect, target: Dialect
) -> None:
    """Each point comes out as the target formats it, or is refused naming that server."""
    points = accepted(source, 150, seed=2)
    body = "\n".join(format_point(*point, source) for point in points)
    result = reformat_batch(body.encode(), source, target)
    expected, refused = [], []
    for point in points:
        try:
            expected.append(format_point(*point, target))
        except ValueError:
            refused.append(format_point(*point, source))
    assert result.body.decode() == "\n".join(expected)
    assert result.points == len(expected)
    assert [line for line, _ in result.refused] == refused
    assert all(f"on a {target.value} server" in reason for _, reason in result.refused)


@pytest.mark.parametrize("dialect", list(Dialect))
def test_strict_lines_mean_the_same_points_in_every_dialect(dialect: Dialect) -> None:
    """Why a batch formatted before the server answered can be read as any dialect: strict
    text has no backslash whose meaning the spellings disagree on."""
    points = accepted(Dialect.STRICT, 150, seed=3)
    for point in points:
        parsed, _ = parse_point(format_point(*point, Dialect.STRICT), 0, dialect)
        assert (parsed.measurement, parsed.tags, parsed.fields, parsed.time_ns) == written(point)


def test_victoria_metrics_backslashes_become_influxdb_spelling() -> None:
    """A doubled backslash is read as one and written for InfluxDB 1.x with a raw one."""
    line = format_point("m", {"path": "C:\\ dir"}, {"f": 1.0}, 5, Dialect.VICTORIA_METRICS)
    assert line == "m,path=C:\\\\\\ dir f=1.0 5"
    result = reformat_batch(line.encode(), Dialect.VICTORIA_METRICS, Dialect.INFLUXDB_1)
    assert result.body == b"m,path=C:\\\\ dir f=1.0 5"
    assert result.refused == []


def test_text_the_target_cannot_store_is_refused_not_altered() -> None:
    """A tag value ending in a backslash is fine on VictoriaMetrics, refused for InfluxDB."""
    good = format_point("m", {"t": "ok"}, {"f": 1.0}, 1, Dialect.VICTORIA_METRICS)
    bad = format_point("m", {"t": "C:\\"}, {"f": 2.0}, 2, Dialect.VICTORIA_METRICS)
    result = reformat_batch(f"{good}\n{bad}".encode(), Dialect.VICTORIA_METRICS, Dialect.INFLUXDB_1)
    assert result.body == good.encode()
    assert result.points == 1
    ((line, reason),) = result.refused
    assert line == bad
    assert "ends with a backslash" in reason and "influxdb1 server" in reason


def test_line_feeds_kept_for_influxdb_are_refused_for_victoria_metrics() -> None:
    """An old spool's string with a line feed (allowed for InfluxDB) never reaches a server
    that would split it into another point."""
    line = format_point("m", {}, {"s": "x\nevil f=1 1"}, 3, Dialect.INFLUXDB_1)
    result = reformat_batch(line.encode(), Dialect.STRICT, Dialect.VICTORIA_METRICS)
    assert result.points == 0
    assert result.refused == [(line, result.refused[0][1])]
    assert "line feed" in result.refused[0][1]


def test_unreadable_text_is_refused_as_a_whole() -> None:
    """Bytes that are not a line this hub wrote are set aside with the reason, not guessed."""
    good = format_point("m", {}, {"f": 1.0}, 1)
    result = reformat_batch(f"{good}\nnot a line".encode(), Dialect.STRICT, Dialect.INFLUXDB_1)
    assert result.body == good.encode()
    ((line, reason),) = result.refused
    assert line == "not a line" and "cannot be read as strict line protocol" in reason


def test_same_dialect_is_unchanged() -> None:
    """Reformatting for the dialect a batch already has gives it back as it was."""
    points = accepted(Dialect.INFLUXDB_1, 50, seed=4)
    body = "\n".join(format_point(*point, Dialect.INFLUXDB_1) for point in points).encode()
    result = reformat_batch(body, Dialect.INFLUXDB_1, Dialect.INFLUXDB_1)
    assert (result.body, result.points, result.refused) == (body, 50, [])


READS_AS = [(a, b) for a, b in PAIRS if a is not b and a.reads_as(b)]


@pytest.mark.parametrize(("source", "target"), READS_AS, ids=lambda d: d.value)
def test_text_is_accepted_as_it_is_where_the_dialect_says_it_reads_as_it(
    source: Dialect, target: Dialect
) -> None:
    """Why the pipeline writes such lines unchanged: the target accepts each of them in the
    same spelling or one it reads as the same points (see the strict test above)."""
    points = accepted(source, 150, seed=3)
    for point in points:
        format_point(*point, target)  # raises ValueError if refused
    for point in points:
        parsed, _ = parse_point(format_point(*point, source), 0, target)
        assert (parsed.measurement, parsed.tags, parsed.fields, parsed.time_ns) == written(point)


def test_only_strict_text_reads_as_another_dialect() -> None:
    """Every other pair is re-checked: InfluxDB 2.x refuses names strict lets through, and
    VictoriaMetrics splits the line feeds legacy spool records may hold."""
    pairs = {(a, b) for a, b in PAIRS if a is not b and a.reads_as(b)}
    assert pairs == {
        (Dialect.STRICT, Dialect.INFLUXDB_1),
        (Dialect.STRICT, Dialect.VICTORIA_METRICS),
        (Dialect.LEGACY, Dialect.INFLUXDB_1),
    }
    assert refusal_free(Dialect.STRICT, "a\tb") and not refusal_free(Dialect.INFLUXDB_2, "a\tb")


def refusal_free(dialect: Dialect, measurement: str) -> bool:
    """Whether `dialect` accepts `measurement` as a measurement name."""
    try:
        format_point(measurement, {}, {"f": 1.0}, T, dialect)
    except ValueError:
        return False
    return True
