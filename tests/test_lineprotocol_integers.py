"""Integers through a running hub into InfluxDB 1.6.7: without a schema every number is stored
as a float, a uint64 too; a field declared `int` refuses values outside int64."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer, influxql
from tests.support import add_device, hub_settings, points, running_hub

pytestmark = pytest.mark.integration

WAIT_S = 20.0
INT64_MAX, INT64_MIN, UINT64_MAX = 2**63 - 1, -(2**63), 2**64 - 1


async def send(settings: Any, readings: list[dict[str, Any]]) -> Any:
    """Store `readings` from one device through a hub with `settings`; the ack."""
    token = add_device(settings, "counter")
    async with running_hub(settings) as service, DeviceClient(service.url, token) as device:
        return await asyncio.wait_for(device.store(readings), WAIT_S)


def field_types(influxdb: LocalServer, db: str, measurement: str) -> dict[str, str]:
    """Each field key of `measurement` with the type InfluxDB stores it as."""
    rows = influxql(influxdb.url, db, f'SHOW FIELD KEYS FROM "{measurement}"')
    return {row["fieldKey"]: row["fieldType"] for row in rows}


async def test_without_a_schema_every_number_is_a_float_uint64_too(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Integers up to uint64's maximum are stored as floats (InfluxDB's nearest float64)."""
    values = {"small": 21, "negative": INT64_MIN, "int64_max": INT64_MAX, "uint64_max": UINT64_MAX}
    now_ms = time.time_ns() // 10**6
    settings = hub_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name)
    ack = await send(settings, [{"name": "plain", "time": now_ms, "fields": values}])
    assert (ack.accepted, ack.rejected) == (1, [])
    assert field_types(influxdb, influx_db_name, "plain") == dict.fromkeys(values, "float")
    (row,) = points(influxdb, influx_db_name, "plain")
    # InfluxDB's JSON writes integral floats without a fraction: read them as floats.
    assert {key: float(row[key]) for key in values} == {k: float(v) for k, v in values.items()}


async def test_an_int_field_refuses_values_outside_int64(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """int64's limits are stored as integers; uint64 values above them are rejected."""
    schemas = tmp_path / "schemas.toml"
    schemas.write_text('[measurements.counts.fields]\ncount = { type = "int" }\n')
    settings = hub_settings(
        tmp_path / "state", influxdb.url, influx_bucket=influx_db_name, schemas=schemas
    )
    now_ms = time.time_ns() // 10**6
    sent = [INT64_MAX, INT64_MIN, 2**63, UINT64_MAX]
    readings = [
        {"name": "counts", "time": now_ms + n, "fields": {"count": value}}
        for n, value in enumerate(sent)
    ]
    ack = await send(settings, readings)
    assert ack.accepted == 2
    assert [rejection.index for rejection in ack.rejected] == [2, 3]
    assert all("count" in rejection.errors[0] for rejection in ack.rejected)
    assert field_types(influxdb, influx_db_name, "counts") == {"count": "integer"}
    stored = sorted(row["count"] for row in points(influxdb, influx_db_name, "counts"))
    assert stored == [INT64_MIN, INT64_MAX]
