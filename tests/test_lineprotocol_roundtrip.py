"""Round trips of hub.lineprotocol through a real InfluxDB 1.6.7 and a real VictoriaMetrics.

Every character class is tried in every position. Accepted text must read back exactly
with no extra point; refused text must be shown to go wrong on at least one server when
written with the plain escaping, so that no refusal is a guess.

These are the strict dialect's (format_point's default, for a server of unknown kind): what
it accepts must read back exactly on both servers. Each server's own dialect is tested in
tests/test_dialect_roundtrip.py.
"""

from __future__ import annotations

import random
import time
import urllib.parse
import uuid
from typing import Any, NamedTuple

import pytest

from device_sim.local_servers import (
    LocalServer,
    ServerError,
    http_request,
    influx_write,
    influxql,
    influxql_series,
    quote_ident,
    quote_string,
    vm_export,
    write_lines,
)
from hub.core.lineprotocol import (
    FieldValue,
    escape_measurement,
    escape_tag,
    format_field_value,
    format_point,
)

pytestmark = pytest.mark.integration

SAMPLES = {
    "space": "a b", "space_lead": " a", "space_trail": "a ", "comma": "a,b", "comma_lead": ",a",
    "equals": "a=b", "equals_lead": "=a", "dquote": 'a"b', "dquote_wrap": '"a"',
    "bs_mid": "a\\b", "bs_lead": "\\a", "bs_n": "a\\nb", "bs_hash": "\\#a",
    "bs_trail": "a\\", "bs2_mid": "a\\\\b", "bs2_trail": "a\\\\", "bs_only": "\\",
    "bs_comma": "a\\,b", "bs_space": "a\\ b", "bs_eq": "a\\=b", "bs_quote": 'a\\"b',
    "lf": "a\nb", "lf_trail": "a\n", "cr": "a\rb", "crlf": "a\r\nb", "nul": "a\0b",
    "tab": "a\tb", "tab_lead": "\ta", "tab_trail": "a\t", "nonascii": "Küche 温度",
    "emoji": "x😀y", "hash_lead": "#a", "hash_mid": "a#b", "squote": "a'b",
    "controls": "a\x01\x1b\x7fb", "u2028": "a\u2028b", "nel": "a\x85b",
    "inject": "x\nother,x=1 y=2", "inject_space": "x y=2 3\nother,x=1 y=2",
    "time": "time", "empty": "",
}  # fmt: skip
POSITIONS = ("measurement", "tag_key", "tag_value", "field_key", "string_value")


class Point(NamedTuple):
    measurement: str
    tags: dict[str, str]
    fields: dict[str, FieldValue]


def sample_point(position: str, text: str) -> Point:
    """A point with `text` in `position` and plain names elsewhere."""
    names = {"measurement": "m", "tag_key": "tk", "tag_value": "tv", "field_key": "fk"}
    names["string_value"] = "sv"
    names[position] = text
    return Point(
        names["measurement"],
        {names["tag_key"]: names["tag_value"]},
        {names["field_key"]: 1.5, "s": names["string_value"]},
    )


def naive_line(point: Point, time_ns: int) -> str:
    """The point with plain escaping and no refusals: what a careless formatter writes."""
    tags = "".join(f",{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(point.tags.items()))
    fields = ",".join(f"{escape_tag(k)}={format_field_value(v)}" for k, v in point.fields.items())
    return f"{escape_measurement(point.measurement)}{tags} {fields} {time_ns}"


def refused(measurement: str, tags: dict[str, str], fields: dict[str, FieldValue]) -> bool:
    """Whether the hub's formatter refuses this point."""
    try:
        format_point(measurement, tags, fields, 0)
    except ValueError:
        return True
    return False


CASES = [(pos, name) for pos in POSITIONS for name in SAMPLES]
ACCEPTED = [c for c in CASES if not refused(*sample_point(c[0], SAMPLES[c[1]]))]
OVERCAUTIOUS = {
    ("field_key", "dquote_wrap"): "balanced quotes happen to work on VictoriaMetrics, but "
    "the rule refuses every '\"' in a field key rather than mimic its quote scanning",
}
"""Refusals that are broader than the servers need, and why."""
REFUSED = [c for c in CASES if c not in ACCEPTED and c not in OVERCAUTIOUS]


def now_ms_in_ns() -> int:
    """Now, whole milliseconds, so VictoriaMetrics' ms timestamps compare exactly."""
    return time.time_ns() // 1_000_000 * 1_000_000


# --- InfluxDB -------------------------------------------------------------------------------


def influx_rows(server: LocalServer, db: str) -> list[tuple[str, dict[str, Any]]]:
    """Every point in the database as (measurement, non-null columns)."""
    rows = []
    for series in influxql_series(server.url, db, "SELECT * FROM /.*/"):
        for values in series["values"]:
            row = dict(zip(series["columns"], values, strict=True))
            rows.append((series["name"], {k: v for k, v in row.items() if v is not None}))
    return rows


def expected_influx_row(point: Point, time_ns: int) -> tuple[str, dict[str, Any]]:
    """What `influx_rows` should return for a point written alone."""
    row: dict[str, Any] = {"time": time_ns, **point.fields}
    row.update((k, v) for k, v in point.tags.items() if v)
    return point.measurement, row


def influx_exact(server: LocalServer, db: str, point: Point, time_ns: int) -> bool:
    """Whether the database holds exactly this one point, also when queried by name."""
    if influx_rows(server, db) != [expected_influx_row(point, time_ns)]:
        return False
    (fk, fv), (tk, tv) = next(iter(point.fields.items())), next(iter(point.tags.items()))
    where = f" WHERE {quote_ident(tk)} = {quote_string(tv)}" if tv else ""
    query = f"SELECT {quote_ident(fk)} FROM {quote_ident(point.measurement)}{where}"
    try:
        rows = influxql(server.url, db, query)
    except ServerError:  # InfluxQL cannot quote CR or NUL
        return False
    return rows == [{"time": time_ns, fk: fv}]


@pytest.mark.parametrize(("position", "sample"), ACCEPTED)
def test_accepted_text_reads_back_exactly_from_influxdb(
    influxdb: LocalServer, influx_db_name: str, position: str, sample: str
) -> None:
    """Accepted text is stored exactly, is found by quoted name, and adds no other point."""
    point, time_ns = sample_point(position, SAMPLES[sample]), now_ms_in_ns()
    influx_write(influxdb.url, influx_db_name, format_point(*point, time_ns))
    assert influx_rows(influxdb, influx_db_name) == [expected_influx_row(point, time_ns)]
    assert influx_exact(influxdb, influx_db_name, point, time_ns)


def test_numbers_and_bools_read_back_exactly_from_influxdb(
    influxdb: LocalServer, influx_db_name: str
) -> None:
    """Floats (repr), int64 limits and bools come back with their value and type."""
    fields: dict[str, FieldValue] = {
        "f1": 0.1 + 0.2, "f2": 1e16, "f3": 5e-324, "f4": 1.7976931348623157e308, "f5": -2.5,
        "i1": 2**63 - 1, "i2": -(2**63), "b1": True, "b2": False, "s1": "",
    }  # fmt: skip
    kinds = {"f": "float", "i": "integer", "b": "boolean", "s": "string"}
    time_ns = now_ms_in_ns()
    influx_write(influxdb.url, influx_db_name, format_point("n", {}, fields, time_ns))
    assert influx_rows(influxdb, influx_db_name) == [("n", {"time": time_ns, **fields})]
    keys = influxql(influxdb.url, influx_db_name, "SHOW FIELD KEYS")
    assert {r["fieldKey"]: r["fieldType"] for r in keys} == {k: kinds[k[0]] for k in fields}


def test_omitted_empty_tag_matches_empty_string(influxdb: LocalServer, influx_db_name: str) -> None:
    """An empty tag value, left out, is still found by `WHERE tag = ''`."""
    time_ns = now_ms_in_ns()
    influx_write(influxdb.url, influx_db_name, format_point("m", {"t": ""}, {"f": 1}, time_ns))
    rows = influxql(influxdb.url, influx_db_name, "SELECT f FROM m WHERE t = ''")
    assert rows == [{"time": time_ns, "f": 1}]


# --- VictoriaMetrics ------------------------------------------------------------------------


def vm_write(server: LocalServer, api: str, db: str, lines: str) -> None:
    """Write lines through `/write` (v1) or `/api/v2/write` (v2), labelled `db=<db>`."""
    path = "/write" if api == "v1" else "/api/v2/write"
    write_lines(server.url, f"{path}?{urllib.parse.urlencode({'db': db})}", lines)


def vm_series(server: LocalServer, db: str) -> list[tuple[dict[str, str], list[float], list[int]]]:
    """Every series labelled `db=<db>` as (labels, values, ms timestamps), sorted."""
    exported = vm_export(server.url, f'{{db="{db}"}}')
    return sorted(((s["metric"], s["values"], s["timestamps"]) for s in exported), key=repr)


def expected_vm_series(
    points: list[tuple[Point, int]], db: str
) -> list[tuple[dict[str, str], list[float], list[int]]]:
    """What `vm_series` should return: one series per field, strings stored as 0."""
    series = []
    for point, time_ns in points:
        labels = {"db": db, **{k: v for k, v in point.tags.items() if v}}
        for key, value in point.fields.items():
            number = 0.0 if isinstance(value, str) else float(value)
            metric = {"__name__": f"{point.measurement}_{key}", **labels}
            series.append((metric, [number], [time_ns // 1_000_000]))
    return sorted(series, key=repr)


@pytest.mark.parametrize("api", ["v1", "v2"])
@pytest.mark.parametrize(("position", "sample"), ACCEPTED)
def test_accepted_text_reads_back_exactly_from_victoria_metrics(
    victoria_metrics: LocalServer, api: str, position: str, sample: str
) -> None:
    """Accepted text gives exactly the expected labels and no other series."""
    point, time_ns, db = sample_point(position, SAMPLES[sample]), now_ms_in_ns(), uuid.uuid4().hex
    vm_write(victoria_metrics, api, db, format_point(*point, time_ns))
    assert vm_series(victoria_metrics, db) == expected_vm_series([(point, time_ns)], db)


def test_victoria_metrics_keeps_float64_at_millisecond_times(victoria_metrics: LocalServer) -> None:
    """Bools become 1/0, strings 0, big ints are rounded and times trimmed to ms."""
    db, time_ns = uuid.uuid4().hex, now_ms_in_ns() + 999_999
    fields: dict[str, FieldValue] = {"b": True, "s": "text", "i": 2**53 + 1, "f": 0.5}
    vm_write(victoria_metrics, "v1", db, format_point("n", {}, fields, time_ns))
    got = {
        labels["__name__"]: (values, times)
        for labels, values, times in vm_series(victoria_metrics, db)
    }
    ms = time_ns // 1_000_000
    assert got == {
        "n_b": ([1], [ms]),
        "n_s": ([0], [ms]),
        "n_i": ([2**53], [ms]),
        "n_f": ([0.5], [ms]),
    }


# --- refusals are needed --------------------------------------------------------------------


@pytest.mark.parametrize(("position", "sample"), REFUSED)
def test_refused_text_goes_wrong_on_some_server_when_written(
    influxdb: LocalServer,
    influx_db_name: str,
    victoria_metrics: LocalServer,
    position: str,
    sample: str,
) -> None:
    """Written with plain escaping anyway, refused text fails to read back somewhere."""
    point, time_ns, db = sample_point(position, SAMPLES[sample]), now_ms_in_ns(), uuid.uuid4().hex
    line = naive_line(point, time_ns)
    status, _ = http_request(
        f"{influxdb.url}/write?db={influx_db_name}&precision=ns", line.encode()
    )
    influx_ok = status == 204 and influx_exact(influxdb, influx_db_name, point, time_ns)
    try:
        vm_write(victoria_metrics, "v1", db, line)
        vm_ok = vm_series(victoria_metrics, db) == expected_vm_series([(point, time_ns)], db)
    except ServerError:  # refused with a 4xx
        vm_ok = False
    assert not (influx_ok and vm_ok), f"{position} {sample!r} round-trips: no need to refuse"


def test_unescaped_line_feed_in_tag_value_injects_a_point(
    influxdb: LocalServer, influx_db_name: str
) -> None:
    """Why LF is refused: written anyway, it creates a point in measurement `other`."""
    point, time_ns = sample_point("tag_value", SAMPLES["inject"]), now_ms_in_ns()
    http_request(
        f"{influxdb.url}/write?db={influx_db_name}&precision=ns",
        naive_line(point, time_ns).encode(),
    )
    assert [name for name, _ in influx_rows(influxdb, influx_db_name)] == ["other,x=1 y=2"]


def test_line_feed_in_string_is_exact_on_influxdb_but_injects_on_victoria_metrics(
    influxdb: LocalServer, influx_db_name: str, victoria_metrics: LocalServer
) -> None:
    """Why LF in string values is refused although InfluxDB alone would store it."""
    point, time_ns, db = sample_point("string_value", SAMPLES["inject"]), now_ms_in_ns(), "lf"
    line = naive_line(point, time_ns)
    influx_write(influxdb.url, influx_db_name, line)
    assert influx_exact(influxdb, influx_db_name, point, time_ns)
    vm_write(victoria_metrics, "v1", db, line)
    names = {labels["__name__"] for labels, _, _ in vm_series(victoria_metrics, db)}
    assert "other_y" in names


# --- many random texts at once --------------------------------------------------------------

ALPHABET = "ab ,=\"'\\\t#ü温😀\r\n"


def random_points(count: int, seed: int) -> list[Point]:
    """Accepted points with random tricky text everywhere, each in its own measurement."""
    rng = random.Random(seed)

    def text() -> str:
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 6)))

    points: list[Point] = []
    measurements: set[str] = set()
    tag_keys: set[str] = set()
    field_keys: set[str] = set()
    while len(points) < count:
        tags = {text(): text() for _ in range(rng.randint(0, 3))}
        # Eighths are exact in binary and short in decimal: VictoriaMetrics keeps only
        # about 12 significant digits of a float.
        fields: dict[str, FieldValue] = {text(): rng.randint(-(10**7), 10**7) / 8, "s": text()}
        point = Point(text(), tags, fields)
        # `SELECT * FROM /.*/` renames a tag key that is a field key in another measurement.
        if (
            point.measurement in measurements
            or set(tags) & (field_keys | set(fields))
            or set(fields) & tag_keys
            or refused(*point)
        ):
            continue
        measurements.add(point.measurement)
        tag_keys.update(tags)
        field_keys.update(fields)
        points.append(point)
    return points


def test_random_texts_read_back_exactly_from_influxdb(
    influxdb: LocalServer, influx_db_name: str
) -> None:
    """A few hundred random accepted points in one write all read back exactly."""
    base = now_ms_in_ns()
    points = random_points(300, seed=1)
    lines = "\n".join(format_point(*p, base + i) for i, p in enumerate(points))
    influx_write(influxdb.url, influx_db_name, lines)
    expected = [expected_influx_row(p, base + i) for i, p in enumerate(points)]
    assert sorted(influx_rows(influxdb, influx_db_name), key=repr) == sorted(expected, key=repr)


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_random_texts_read_back_exactly_from_victoria_metrics(
    victoria_metrics: LocalServer, api: str
) -> None:
    """The same random points give exactly the expected series in VictoriaMetrics."""
    base, db = now_ms_in_ns(), uuid.uuid4().hex
    timed = [(p, base + i * 1_000_000) for i, p in enumerate(random_points(300, seed=2))]
    vm_write(victoria_metrics, api, db, "\n".join(format_point(*p, t) for p, t in timed))
    assert vm_series(victoria_metrics, db) == expected_vm_series(timed, db)
