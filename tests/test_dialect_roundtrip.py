"""Round trips of each dialect through its real server: InfluxDB 1.6.7 and VictoriaMetrics.

Every character class, and every backslash combination, in every position. For each dialect:
accepted text reads back exactly from that server with no other point; refused text, written
anyway in the dialect's own spelling, goes wrong on that server, so no refusal is a guess
(except the few listed as broader than needed, with the reason). The strict dialect's round
trips through both servers are in tests/test_lineprotocol_roundtrip.py.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from device_sim.client import DeviceClient
from device_sim.local_servers import (
    LocalServer,
    ServerError,
    http_request,
    influx_write,
    influxql,
    vm_export,
)
from hub.core.dialects import Dialect
from hub.core.lineprotocol import (
    escape_field_key,
    escape_measurement,
    escape_tag,
    format_field_value,
    format_point,
)
from hub.settings import Settings
from schemas.messages import Ack
from tests.support import add_device, hub_settings, running_hub
from tests.test_lineprotocol_roundtrip import (
    POSITIONS,
    SAMPLES,
    Point,
    expected_influx_row,
    expected_vm_series,
    influx_exact,
    influx_rows,
    now_ms_in_ns,
    sample_point,
    vm_series,
    vm_write,
)

pytestmark = pytest.mark.integration

BACKSLASHES = {
    "bs_before_space": "C:\\ dir", "bs_measured": "C:\\ dir\\,x\\=y", "bs3_space": "a\\\\\\ b",
    "bs2_space": "a\\\\ b", "bs2_comma": "a\\\\,b", "bs2_eq": "a\\\\=b", "bs4_trail": "a\\\\\\\\",
    "bs3_trail": "a\\\\\\", "bs_lead_space": "\\ a", "bs_lead_quote": '\\"', "bs_tab": "a\\\tb",
    "bs_hash_only": "\\#", "issue": 'v a,l=u"e\\ é', "bs2_lead": "\\\\a", "bs_lead_eq": "\\=a",
    "bs_lead_comma": "\\,a", "bs2_quote": 'a\\\\"b',
}  # fmt: skip
TEXTS = {**SAMPLES, **BACKSLASHES}
CASES = [(position, name) for position in POSITIONS for name in TEXTS]


def refused(point: Point, dialect: Dialect) -> bool:
    """Whether `dialect` refuses the point."""
    try:
        format_point(*point, 0, dialect)
    except ValueError:
        return True
    return False


def naive_line(point: Point, time_ns: int, dialect: Dialect) -> str:
    """The point in `dialect`'s spelling with no refusals: what it would write without them."""
    tags = sorted(
        (escape_tag(k, dialect), escape_tag(v, dialect)) for k, v in point.tags.items() if v
    )
    tag_text = "".join(f",{k}={v}" for k, v in sorted(tags, key=lambda kv: kv[0].encode()))
    fields = ",".join(
        f"{escape_field_key(k, dialect)}={format_field_value(v)}" for k, v in point.fields.items()
    )
    return f"{escape_measurement(point.measurement, dialect)}{tag_text} {fields} {time_ns}"


def split(dialect: Dialect, broader: dict[tuple[str, str], str]) -> tuple[list[Any], list[Any]]:
    """The cases `dialect` accepts, and those it refuses that are not in `broader`."""
    accepted = [c for c in CASES if not refused(sample_point(c[0], TEXTS[c[1]]), dialect)]
    return accepted, [c for c in CASES if c not in accepted and c not in broader]


# --- InfluxDB 1.x ---------------------------------------------------------------------------

BROADER_1: dict[tuple[str, str], str] = {}
"""Refusals of the InfluxDB 1.x dialect broader than InfluxDB 1.6.7 needs, and why."""
ACCEPTED_1, REFUSED_1 = split(Dialect.INFLUXDB_1, BROADER_1)


@pytest.mark.parametrize(("position", "sample"), ACCEPTED_1)
def test_influxdb_1_accepted_text_reads_back_exactly(
    influxdb: LocalServer, influx_db_name: str, position: str, sample: str
) -> None:
    """Accepted text is stored exactly, is found by quoted name, and adds no other point."""
    point, time_ns = sample_point(position, TEXTS[sample]), now_ms_in_ns()
    influx_write(influxdb.url, influx_db_name, format_point(*point, time_ns, Dialect.INFLUXDB_1))
    assert influx_rows(influxdb, influx_db_name) == [expected_influx_row(point, time_ns)]
    assert influx_exact(influxdb, influx_db_name, point, time_ns)


@pytest.mark.parametrize(("position", "sample"), REFUSED_1)
def test_influxdb_1_refused_text_goes_wrong_when_written(
    influxdb: LocalServer, influx_db_name: str, position: str, sample: str
) -> None:
    """Written anyway in the 1.x spelling, refused text does not read back exactly."""
    point, time_ns = sample_point(position, TEXTS[sample]), now_ms_in_ns()
    line = naive_line(point, time_ns, Dialect.INFLUXDB_1)
    status, _ = http_request(
        f"{influxdb.url}/write?db={influx_db_name}&precision=ns", line.encode()
    )
    exact = status == 204 and influx_exact(influxdb, influx_db_name, point, time_ns)
    assert not exact, f"{position} {sample!r} round-trips on InfluxDB 1.6.7: no need to refuse"


def test_influxdb_1_reads_the_measured_backslash_case_back(
    influxdb: LocalServer, influx_db_name: str
) -> None:
    """The issue's line: `C:\\ dir\\,x\\=y` as a tag value, exactly."""
    point, time_ns = Point("p", {"path": "C:\\ dir\\,x\\=y"}, {"v": 1.0}), now_ms_in_ns()
    line = format_point(*point, time_ns, Dialect.INFLUXDB_1)
    assert line.startswith("p,path=C:\\\\ dir\\\\,x\\\\=y v=1.0 ")
    influx_write(influxdb.url, influx_db_name, line)
    assert influx_rows(influxdb, influx_db_name) == [expected_influx_row(point, time_ns)]


# --- VictoriaMetrics ------------------------------------------------------------------------

BROADER_VM = {
    ("field_key", "dquote_wrap"): "balanced quotes happen to work, but the rule refuses "
    "every '\"' in a field key rather than mimic VictoriaMetrics' quote scanning",
}
"""Refusals of the VictoriaMetrics dialect broader than VictoriaMetrics needs, and why."""
ACCEPTED_VM, REFUSED_VM = split(Dialect.VICTORIA_METRICS, BROADER_VM)


def vm_exact(server: LocalServer, api: str, point: Point, line: str, time_ns: int) -> bool:
    """Whether writing `line` gives exactly the point's series and nothing else."""
    db = uuid.uuid4().hex
    try:
        vm_write(server, api, db, line)
    except ServerError:  # refused with a 4xx
        return False
    return vm_series(server, db) == expected_vm_series([(point, time_ns)], db)


@pytest.mark.parametrize("api", ["v1", "v2"])
@pytest.mark.parametrize(("position", "sample"), ACCEPTED_VM)
def test_victoria_metrics_accepted_text_reads_back_exactly(
    victoria_metrics: LocalServer, api: str, position: str, sample: str
) -> None:
    """Accepted text gives exactly the expected labels and no other series."""
    point, time_ns = sample_point(position, TEXTS[sample]), now_ms_in_ns()
    line = format_point(*point, time_ns, Dialect.VICTORIA_METRICS)
    assert vm_exact(victoria_metrics, api, point, line, time_ns)


@pytest.mark.parametrize(("position", "sample"), REFUSED_VM)
def test_victoria_metrics_refused_text_goes_wrong_when_written(
    victoria_metrics: LocalServer, position: str, sample: str
) -> None:
    """Written anyway in the doubled spelling, refused text does not read back exactly."""
    point, time_ns = sample_point(position, TEXTS[sample]), now_ms_in_ns()
    line = naive_line(point, time_ns, Dialect.VICTORIA_METRICS)
    assert not vm_exact(victoria_metrics, "v1", point, line, time_ns), (
        f"{position} {sample!r} round-trips on VictoriaMetrics: no need to refuse"
    )


# --- many random texts at once, per dialect -------------------------------------------------

ALPHABET = "ab ,=\"'\\\t#_ü温😀\r\n\0"


def random_points(count: int, seed: int, dialect: Dialect) -> list[Point]:
    """Points `dialect` accepts with random tricky text everywhere, one measurement each."""
    rng = random.Random(seed)

    def text() -> str:
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 6)))

    points: list[Point] = []
    names: set[str] = set()
    tag_keys: set[str] = set()
    field_keys: set[str] = set()
    while len(points) < count:
        tags = {text(): text() for _ in range(rng.randint(0, 3))}
        # Eighths are exact in binary and short in decimal (VictoriaMetrics keeps ~12 digits).
        fields: dict[str, Any] = {text(): rng.randint(-(10**7), 10**7) / 8, "s": text()}
        point = Point(text(), tags, fields)
        # `SELECT * FROM /.*/` renames a tag key that is a field key in another measurement;
        # VictoriaMetrics names series measurement_field, which two points could share.
        if (
            point.measurement in names
            or set(tags) & (field_keys | set(fields))
            or set(fields) & tag_keys
            or refused(point, dialect)
        ):
            continue
        names.add(point.measurement)
        tag_keys.update(tags)
        field_keys.update(fields)
        points.append(point)
    return points


def test_influxdb_1_random_texts_read_back_exactly(
    influxdb: LocalServer, influx_db_name: str
) -> None:
    """A few hundred random accepted points in one write all read back exactly."""
    base = now_ms_in_ns()
    points = random_points(300, 3, Dialect.INFLUXDB_1)
    lines = "\n".join(format_point(*p, base + i, Dialect.INFLUXDB_1) for i, p in enumerate(points))
    influx_write(influxdb.url, influx_db_name, lines)
    expected = [expected_influx_row(p, base + i) for i, p in enumerate(points)]
    assert sorted(influx_rows(influxdb, influx_db_name), key=repr) == sorted(expected, key=repr)


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_victoria_metrics_random_texts_read_back_exactly(
    victoria_metrics: LocalServer, api: str
) -> None:
    """The same for VictoriaMetrics: exactly the expected series, none other."""
    base, db = now_ms_in_ns(), uuid.uuid4().hex
    points = random_points(300, 4, Dialect.VICTORIA_METRICS)
    timed = [(p, base + i * 1_000_000) for i, p in enumerate(points)]
    body = "\n".join(format_point(*p, t, Dialect.VICTORIA_METRICS) for p, t in timed)
    vm_write(victoria_metrics, api, db, body)
    assert vm_series(victoria_metrics, db) == expected_vm_series(timed, db)


# --- through a running hub that picks the dialect itself ------------------------------------

TRICKY_TAGS = ["C:\\ dir\\,x\\=y", "C:\\", "a\\\\b", 'v a,l=u"e\\ é']


async def store_tricky(settings: Settings, measurement: str) -> Ack:
    """One device sends a reading per tricky tag value; the ack."""
    token = add_device(settings, "tricky")
    now_ms = time.time_ns() // 10**6
    readings = [
        {"name": measurement, "time": now_ms + n, "tags": {"path": text}, "fields": {"v": n}}
        for n, text in enumerate(TRICKY_TAGS)
    ]
    async with running_hub(settings) as service, DeviceClient(service.url, token) as device:
        return await asyncio.wait_for(device.store(readings), 20)


async def test_a_hub_on_victoria_metrics_stores_every_backslash_exactly(
    tmp_path: Path, victoria_metrics: LocalServer
) -> None:
    """With influx_api auto the hub learns it writes to VictoriaMetrics and follows its rules:
    all four values, a trailing backslash too, come back exactly."""
    measurement = f"tricky_{uuid.uuid4().hex[:8]}"
    ack = await store_tricky(hub_settings(tmp_path, victoria_metrics.url), measurement)
    assert (ack.accepted, ack.rejected) == (len(TRICKY_TAGS), [])
    series = vm_export(victoria_metrics.url, f'{{__name__="{measurement}_v"}}')
    assert sorted(s["metric"]["path"] for s in series) == sorted(TRICKY_TAGS)


async def test_a_hub_on_influxdb_1_stores_what_it_can_and_says_why_not_the_rest(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """On InfluxDB 1.6.7 the same readings are stored exactly but for the trailing backslash,
    which is rejected in the ack with the reason."""
    settings = hub_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name)
    ack = await store_tricky(settings, "tricky")
    assert ack.accepted == 3
    ((index, errors),) = [(r.index, r.errors) for r in ack.rejected]
    assert index == 1 and "ends with a backslash" in errors[0]
    stored = influxql(influxdb.url, influx_db_name, 'SELECT "path", "v" FROM "tricky"')
    assert sorted(row["path"] for row in stored) == sorted(t for t in TRICKY_TAGS if t != "C:\\")
