"""Hostile text in every part of a reading, through a running hub into InfluxDB 1.6.7.

What must read back exactly and what must be refused follows the InfluxDB 1.x column of the
table in the docstring of `hub.dialects` (the hub writes with the v1 API here). Every test
also takes an inventory of the database (measurements, series, points) to show that no input
wrote a point other than its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer, influxql, influxql_series, quote_ident
from hub.gateway.presence import CONNECTION_MEASUREMENT
from hub.settings import Settings
from schemas.messages import Ack
from tests.support import add_device, hub_settings, running_hub

pytestmark = pytest.mark.integration

WAIT_S = 10.0
DEVICE = "dev-1"
T0_MS = 1_700_000_000_000

# Text that reads back exactly in every name position (measurement, tag key, tag value,
# field key): escaped space, comma and `=`, tabs not leading, non-ASCII, other controls,
# and backslashes before characters that need no escape.
EVERYWHERE = [
    "Küche 温度",
    "a,b",
    ",lead",
    "a=b",
    "=lead",
    " lead",
    "trail ",
    "a\tb",
    "trail\t",
    "it's",
    "a#b",
    "x😀y",
    "a\u2028b",
    "a\x01\x1bb",
    "a\x85b",
    "C:\\temp\\dir",
    "\\lead",
    "Küche 温度,room=1 2\\x",
]
DQUOTE = ['a"b', '"quoted"', 'Küche 温度,room="1" 2\\x']
# Backslashes InfluxDB 1.x keeps as they are, before a character it escapes too (the strict
# rules for an unknown server refuse these; see hub.dialects).
BACKSLASHES = ["a\\\\b", "\\\\lead", "a\\\\\\b"]
IN_TAGS = ["C:\\ dir\\,x\\=y", 'v a,l=u"e\\ é', "a\\ b", "a\\,b", "a\\=b", "\\ lead"]
ROUND_TRIP = {
    "measurement": [*EVERYWHERE, *DQUOTE, *BACKSLASHES, "not#first"],
    # One reading holds them all: at most max_tags_per_reading (32) with `device`.
    "tag_key": [*EVERYWHERE, *DQUOTE, *IN_TAGS, "#lead", "\tlead", 'a\\"b'],
    "tag_value": [*EVERYWHERE, *DQUOTE, *BACKSLASHES, *IN_TAGS, "#lead", "\tlead", 'a\\"b', "time"],
    "field_key": [
        *EVERYWHERE,
        *DQUOTE,
        *BACKSLASHES,
        "#lead",
        "a\\\\ b",
        "a\\\\,b",
        'a\\"b',
        '\\"',
    ],
    "string_value": [
        *EVERYWHERE,
        *DQUOTE,
        'say "hi"',
        "trailing backslash\\",
        "\\",
        "a\\\\b",
        'a\\"b',
        "a\\,b\\ c\\=d",
        "cr\rhere",
        "nul\0here",
        "\tlead",
        "line\nfeed",
        'x" 1\nevil,device=other v=1 1\nm s="',
        "",
    ],
}


@dataclass(frozen=True)
class Inventory:
    """Everything a database holds, apart from the hub's own connection events."""

    measurements: set[str]
    series: int
    points: int


def inventory(influx: LocalServer, db: str) -> Inventory:
    """Measurements, series and points of the database, the hub's presence points left out."""
    names = {row["name"] for row in influxql(influx.url, db, "SHOW MEASUREMENTS")}
    names.discard(CONNECTION_MEASUREMENT)
    series = [
        row["key"]
        for row in influxql(influx.url, db, "SHOW SERIES")
        if not row["key"].startswith(CONNECTION_MEASUREMENT + ",")
    ]
    points = sum(
        len(s["values"])
        for s in influxql_series(influx.url, db, "SELECT * FROM /.*/")
        if s["name"] != CONNECTION_MEASUREMENT
    )
    return Inventory(names, len(series), points)


def rows_of(influx: LocalServer, db: str, measurement: str) -> list[dict[str, Any]]:
    """Every point of one measurement, asked for by its quoted name."""
    return influxql(influx.url, db, f"SELECT * FROM {quote_ident(measurement)}")


@pytest.fixture
def settings(tmp_path: Path, influxdb: LocalServer, influx_db_name: str) -> Settings:
    """Hub settings writing to a fresh database over InfluxDB 1.x's /write."""
    return hub_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name, influx_api="v1")


@pytest.fixture
async def device(settings: Settings) -> AsyncIterator[DeviceClient]:
    """`dev-1` connected to a running hub."""
    token = add_device(settings, DEVICE)
    async with running_hub(settings) as service, DeviceClient(service.url, token) as device:
        yield device


async def store(device: DeviceClient, readings: list[dict[str, Any]]) -> Ack:
    """Send one message and wait (bounded) for its ack."""
    return await asyncio.wait_for(device.store(readings), WAIT_S)


# --- Round trips ---------------------------------------------------------------------------


async def test_hostile_measurement_names_read_back_exactly(
    device: DeviceClient, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Measurement names with spaces, commas, `=`, quotes, backslashes, tabs, non-ASCII."""
    names = ROUND_TRIP["measurement"]
    assert inventory(influxdb, influx_db_name) == Inventory(set(), 0, 0)
    readings = [
        {"name": name, "time": T0_MS + n, "fields": {"n": float(n)}} for n, name in enumerate(names)
    ]
    ack = await store(device, readings)
    assert (ack.accepted, ack.rejected) == (len(names), [])
    assert inventory(influxdb, influx_db_name) == Inventory(set(names), len(names), len(names))
    found = {name: [(row["n"], row["device"]) for row in rows_of(influxdb, influx_db_name, name)]
             for name in names}  # fmt: skip
    assert found == {name: [(n, DEVICE)] for n, name in enumerate(names)}


async def test_hostile_tag_keys_read_back_exactly(
    device: DeviceClient, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Tag keys with spaces, commas, `=`, quotes, backslashes, tabs, non-ASCII."""
    keys = ROUND_TRIP["tag_key"]
    tags = {key: f"v{n}" for n, key in enumerate(keys)}
    ack = await store(
        device, [{"name": "tagkeys", "time": T0_MS, "tags": tags, "fields": {"f": 1.0}}]
    )
    assert (ack.accepted, ack.rejected) == (1, [])
    assert inventory(influxdb, influx_db_name) == Inventory({"tagkeys"}, 1, 1)
    shown = influxql(influxdb.url, influx_db_name, "SHOW TAG KEYS FROM tagkeys")
    assert {row["tagKey"] for row in shown} == {*keys, "device"}
    [row] = rows_of(influxdb, influx_db_name, "tagkeys")
    assert {key: row[key] for key in keys} == tags


async def test_hostile_tag_values_read_back_exactly(
    device: DeviceClient, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Tag values with spaces, commas, `=`, quotes, backslashes, tabs, non-ASCII."""
    values = ROUND_TRIP["tag_value"]
    readings = [
        {"name": "tagvalues", "time": T0_MS + n, "tags": {"k": value}, "fields": {"n": float(n)}}
        for n, value in enumerate(values)
    ]
    ack = await store(device, readings)
    assert (ack.accepted, ack.rejected) == (len(values), [])
    assert inventory(influxdb, influx_db_name) == Inventory({"tagvalues"}, len(values), len(values))
    found = {int(row["n"]): row["k"] for row in rows_of(influxdb, influx_db_name, "tagvalues")}
    assert found == dict(enumerate(values))


async def test_hostile_field_keys_read_back_exactly(
    device: DeviceClient, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Field keys with spaces, commas, `=`, backslashes, tabs, non-ASCII."""
    keys = ROUND_TRIP["field_key"]
    fields = {key: float(n) for n, key in enumerate(keys)}
    ack = await store(device, [{"name": "fieldkeys", "time": T0_MS, "fields": fields}])
    assert (ack.accepted, ack.rejected) == (1, [])
    assert inventory(influxdb, influx_db_name) == Inventory({"fieldkeys"}, 1, 1)
    shown = influxql(influxdb.url, influx_db_name, "SHOW FIELD KEYS FROM fieldkeys")
    assert {row["fieldKey"] for row in shown} == set(keys)
    [row] = rows_of(influxdb, influx_db_name, "fieldkeys")
    assert {key: row[key] for key in keys} == fields


async def test_hostile_string_values_read_back_exactly(
    device: DeviceClient, influxdb: LocalServer, influx_db_name: str
) -> None:
    """String field values with quotes, backslashes, CR, LF, NUL, tabs, non-ASCII, injections."""
    values = ROUND_TRIP["string_value"]
    fields: dict[str, Any] = {f"s{n}": value for n, value in enumerate(values)}
    ack = await store(device, [{"name": "strings", "time": T0_MS, "fields": fields}])
    assert (ack.accepted, ack.rejected) == (1, [])
    assert inventory(influxdb, influx_db_name) == Inventory({"strings"}, 1, 1)
    [row] = rows_of(influxdb, influx_db_name, "strings")
    assert {key: row[key] for key in fields} == fields


# --- Refusals ------------------------------------------------------------------------------

INJECTION = "x\nevil,device=other v=1 1"
REFUSED = {
    # A line feed ends the line; no escape exists.
    "lf_in_measurement": ("measurement", "a\nb"),
    "lf_in_tag_key": ("tag_key", "a\nb"),
    "lf_in_tag_value": ("tag_value", "a\nb"),
    "lf_in_field_key": ("field_key", "a\nb"),
    "injection_in_tag_value": ("tag_value", INJECTION),
    "injection_in_tag_key": ("tag_key", INJECTION),
    "injection_in_measurement": ("measurement", "m v=1 1\nevil,device=other v=1"),
    "injection_in_field_key": ("field_key", "v=1 1\nevil,device=other v"),
    # A trailing backslash escapes the separator after it.
    "trailing_backslash_in_measurement": ("measurement", "a\\"),
    "trailing_backslash_in_tag_key": ("tag_key", "a\\"),
    "trailing_backslash_in_tag_value": ("tag_value", "a\\"),
    "trailing_backslash_in_field_key": ("field_key", "a\\"),
    # A backslash before a space, comma, `=` or `"` in a measurement; an odd number of them
    # before a space, comma or `=` in a field key.
    "backslash_space_in_measurement": ("measurement", "a\\ b"),
    "backslash_comma_in_measurement": ("measurement", "C:\\,x"),
    "backslash_equals_in_measurement": ("measurement", "a\\=b"),
    "backslash_dquote_in_measurement": ("measurement", 'a\\"b'),
    "backslash_equals_in_field_key": ("field_key", "a\\=b"),
    "backslash_space_in_field_key": ("field_key", "C:\\ dir"),
    "three_backslashes_comma_in_field_key": ("field_key", "a\\\\\\,b"),
    # InfluxQL cannot quote CR or NUL.
    "cr_in_measurement": ("measurement", "a\rb"),
    "cr_in_tag_value": ("tag_value", "a\rb"),
    "nul_in_tag_key": ("tag_key", "a\0b"),
    "nul_in_field_key": ("field_key", "a\0b"),
    # Leading tab stripped, leading `#` a comment, empty names, `time` refused or dropped.
    "leading_tab_in_measurement": ("measurement", "\tm"),
    "leading_tab_in_field_key": ("field_key", "\tf"),
    "leading_hash_in_measurement": ("measurement", "#m"),
    "empty_tag_key": ("tag_key", ""),
    "empty_field_key": ("field_key", ""),
    "time_as_tag_key": ("tag_key", "time"),
    "time_as_field_key": ("field_key", "time"),
}


def reading_with(position: str, text: str) -> dict[str, Any]:
    """A reading with `text` in `position` and plain names everywhere else."""
    name, tag_key, tag_value, field_key = "hostile", "tk", "tv", "fk"
    if position == "measurement":
        name = text
    elif position == "tag_key":
        tag_key = text
    elif position == "tag_value":
        tag_value = text
    else:
        assert position == "field_key"
        field_key = text
    return {
        "name": name,
        "time": T0_MS + 1,
        "tags": {tag_key: tag_value},
        "fields": {field_key: 1.0},
    }


@pytest.mark.parametrize("case", list(REFUSED))
async def test_unrepresentable_name_is_rejected_and_writes_nothing(
    device: DeviceClient, influxdb: LocalServer, influx_db_name: str, case: str
) -> None:
    """Text that cannot be written exactly is rejected with a reason; only its neighbour lands."""
    position, text = REFUSED[case]
    neighbour = {"name": "neighbour", "time": T0_MS, "tags": {"k": "v"}, "fields": {"f": 1.0}}
    ack = await store(device, [neighbour, reading_with(position, text)])
    assert ack.accepted == 1
    assert [rejection.index for rejection in ack.rejected] == [1]
    assert ack.rejected[0].errors and all(ack.rejected[0].errors)
    if "\n" in text:
        assert any("line feed" in error for error in ack.rejected[0].errors), ack.rejected
    # The neighbour was written in the same batch, so anything the hostile text could have
    # written would be there now.
    assert inventory(influxdb, influx_db_name) == Inventory({"neighbour"}, 1, 1)
    devices = influxql(influxdb.url, influx_db_name, 'SHOW TAG VALUES WITH KEY = "device"')
    assert {row["value"] for row in devices} == {DEVICE}
