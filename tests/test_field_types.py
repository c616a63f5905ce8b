"""Field type conflicts refused in the ack, and the hub's own `hub_` measurements.

Pure tests of `hub.fieldtypes`, `hub.influx_fields` parsing and `prepare_readings` first;
then a real hub against the real InfluxDB 1.6.7 and VictoriaMetrics the suite starts.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest

from device_sim.client import DeviceClient
from device_sim.local_servers import (
    LocalServer,
    free_port,
    http_request,
    influx_write,
    vm_export,
)
from hub.core.fieldtypes import HOUR_NS, FieldTypes, conflict_reason, parse_conflict
from hub.core.measurements import MeasurementSchemas, SchemaFile, load_schema_file
from hub.core.readings import prepare_readings
from hub.errors import ConfigError, PermanentWriteError, TransientWriteError
from hub.ingest.influx_fields import fetch_field_types, field_types, parse_duration, shard_duration
from hub.ops.metrics import rejection_reason
from hub.options import InfluxOptions
from tests.support import add_device, hub_settings, points, running_hub

WAIT_S = 10.0
WEEK_NS = 7 * 24 * HOUR_NS
NOW_NS = 1_764_000_000 * 10**9


def prepare(readings: list[dict[str, Any]], catalog: FieldTypes, device: str = "d1") -> Any:
    """`prepare_readings` without a schema, nanosecond times, checking `catalog`."""
    validator = MeasurementSchemas().validator(1)
    return prepare_readings(readings, validator, device, 1, NOW_NS, field_types=catalog)


# --- The catalog (pure) -----------------------------------------------------------------------


@pytest.mark.unit
def test_first_type_is_learnt_and_another_is_refused_with_the_reason() -> None:
    """A string field makes a later float of the same field, measurement and shard conflict."""
    catalog = FieldTypes()
    assert catalog.check("shared", {"t": "poison"}, NOW_NS) is None
    assert catalog.check("shared", {"t": 21.5}, NOW_NS + 1) == (
        "field t is a string in shared; this reading sends a float"
    )
    assert catalog.check("shared", {"t": "fine"}, NOW_NS + 2) is None


@pytest.mark.unit
def test_types_are_kept_per_shard_group() -> None:
    """Another shard group, or another measurement, may hold the field as another type."""
    catalog = FieldTypes(shard_ns=WEEK_NS)
    group_start = catalog.group_start(NOW_NS)
    assert catalog.check("m", {"t": 1.5}, group_start) is None
    assert catalog.check("m", {"t": True}, group_start + WEEK_NS - 1) is not None
    assert catalog.check("m", {"t": True}, group_start + WEEK_NS) is None
    assert catalog.check("m", {"t": True}, group_start - 1) is None
    assert catalog.check("other", {"t": True}, group_start) is None


@pytest.mark.unit
def test_integer_boolean_and_float_are_three_types() -> None:
    """InfluxDB's integer, boolean and float never mix; the reason names both."""
    catalog = FieldTypes()
    assert catalog.check("m", {"i": 1, "b": True, "f": 1.0}, NOW_NS) is None
    assert catalog.check("m", {"i": 1.0}, NOW_NS) == (
        "field i is an integer in m; this reading sends a float"
    )
    assert catalog.check("m", {"b": 1}, NOW_NS) == (
        "field b is a boolean in m; this reading sends an integer"
    )
    assert catalog.check("m", {"f": False}, NOW_NS) == (
        "field f is a float in m; this reading sends a boolean"
    )


@pytest.mark.unit
def test_a_refused_reading_teaches_nothing() -> None:
    """The new field of a reading refused for another field is not learnt."""
    catalog = FieldTypes()
    catalog.check("m", {"a": 1.0}, NOW_NS)
    assert catalog.check("m", {"a": "x", "b": "new"}, NOW_NS) is not None
    assert catalog.check("m", {"b": 2.0}, NOW_NS) is None


@pytest.mark.unit
def test_what_influxdb_says_wins() -> None:
    """A type InfluxDB reports replaces the one the hub assumed."""
    catalog = FieldTypes()
    catalog.check("m", {"t": 1.0}, NOW_NS)
    catalog.learn("m", "t", str, NOW_NS)
    assert catalog.check("m", {"t": "s"}, NOW_NS) is None
    assert catalog.check("m", {"t": 1.0}, NOW_NS) is not None


@pytest.mark.unit
def test_hourly_groups_merge_into_the_servers_longer_ones() -> None:
    """Learnt in one-hour groups, a type still conflicts once the server says one week."""
    catalog = FieldTypes()
    start = FieldTypes(shard_ns=WEEK_NS).group_start(NOW_NS)
    catalog.check("m", {"t": "s"}, start + 3 * HOUR_NS)
    catalog.set_shard_duration(WEEK_NS)
    assert catalog.check("m", {"t": 1.0}, start + 50 * HOUR_NS) is not None


@pytest.mark.unit
def test_memory_is_bounded() -> None:
    """Past `max_entries` the oldest groups are forgotten; the count never exceeds it, and
    readings at ever new times cannot grow it either."""
    catalog = FieldTypes(max_entries=100)
    for n in range(1000):
        catalog.check("churn", {"a": 1.0}, n * HOUR_NS)
        assert catalog.entries <= 100
    for n in range(1000):
        catalog.check(f"m{n}", {"a": 1.0, "b": 2.0, "c": 3.0}, NOW_NS)
        assert catalog.entries <= 100
    assert catalog.check("m999", {"a": "s"}, NOW_NS) is not None
    assert catalog.check("m0", {"a": "s"}, NOW_NS) is None


@pytest.mark.unit
def test_influxdb_conflict_message_is_parsed() -> None:
    """The measurement, field and stored type come out of InfluxDB 1.6.7's own text."""
    reason = (
        'partial write: field type conflict: input field "t" on measurement "shared" '
        "is type float, already exists as type string dropped=1"
    )
    assert parse_conflict(reason) == ("shared", "t", str)
    assert parse_conflict("partial write: points beyond retention policy dropped=1") is None


@pytest.mark.unit
def test_conflict_reason_reads_as_the_protocol_docs_say() -> None:
    """The ack's wording, as in docs/protocol.md."""
    assert conflict_reason("shared", "t", str, float) == (
        "field t is a string in shared; this reading sends a float"
    )


# --- InfluxQL answers (pure) ------------------------------------------------------------------


@pytest.mark.unit
def test_show_field_keys_answer_leaves_out_fields_of_several_types() -> None:
    """A field whose type differs between shards is not known for any."""
    answer = {
        "results": [
            {
                "statement_id": 0,
                "series": [
                    {"name": "a", "columns": ["fieldKey", "fieldType"], "values": [["x", "float"]]},
                    {
                        "name": "b",
                        "columns": ["fieldKey", "fieldType"],
                        "values": [["y", "string"], ["y", "integer"], ["z", "boolean"]],
                    },
                ],
            }
        ]
    }
    assert field_types(answer) == {("a", "x"): float, ("b", "z"): bool}


@pytest.mark.unit
def test_retention_policy_shard_duration() -> None:
    """The named policy's, else the default one's, shard group duration in nanoseconds."""
    answer = {
        "results": [
            {
                "series": [
                    {
                        "columns": [
                            "name",
                            "duration",
                            "shardGroupDuration",
                            "replicaN",
                            "default",
                        ],
                        "values": [
                            ["autogen", "0s", "168h0m0s", 1, True],
                            ["short", "2h0m0s", "1h0m0s", 1, False],
                        ],
                    }
                ]
            }
        ]
    }
    assert shard_duration(answer, "") == WEEK_NS
    assert shard_duration(answer, "short") == HOUR_NS
    assert shard_duration(answer, "missing") is None
    assert parse_duration("1h30m0s") == 90 * 60 * 10**9
    assert parse_duration("forever") is None


# --- Readings and the hub_ rule (pure) --------------------------------------------------------


@pytest.mark.unit
def test_second_device_in_one_batch_is_refused() -> None:
    """Learnt at submit time, hub-wide: device B's float is refused right after A's string."""
    catalog = FieldTypes()
    first = prepare([{"name": "shared", "fields": {"t": "poison"}}], catalog, "a")
    second = prepare([{"name": "shared", "fields": {"t": 21.5}}], catalog, "b")
    assert (first.accepted, first.rejected) == (1, [])
    assert second.accepted == 0
    assert [(r.index, r.errors) for r in second.rejected] == [
        (0, ["field t is a string in shared; this reading sends a float"])
    ]
    assert second.lines == ""


@pytest.mark.unit
def test_conflict_within_one_message_refuses_only_the_later_reading() -> None:
    """Readings of one message are checked in order; the rest of the message is stored."""
    prepared = prepare(
        [
            {"name": "m", "fields": {"v": 1.0}},
            {"name": "m", "fields": {"v": "text"}},
            {"name": "m", "fields": {"v": 2.0}},
        ],
        FieldTypes(),
    )
    assert prepared.accepted == 2
    assert [r.index for r in prepared.rejected] == [1]


@pytest.mark.unit
def test_hub_measurements_are_refused_from_devices() -> None:
    """`hub_device_connection` and any other `hub_` name is rejected with the reason."""
    prepared = prepare(
        [
            {"name": "hub_device_connection", "fields": {"event": 1.0}},
            {"name": "hub_x", "fields": {"v": 1.0}},
            {"name": "hubby", "fields": {"v": 1.0}},
            {"name": "HUB_case", "fields": {"v": 1.0}},
        ],
        FieldTypes(),
    )
    assert prepared.accepted == 2
    assert [(r.index, r.errors) for r in prepared.rejected] == [
        (0, ["measurement names starting with hub_ are reserved for the hub's own"]),
        (1, ["measurement names starting with hub_ are reserved for the hub's own"]),
    ]


@pytest.mark.unit
def test_hub_measurements_are_refused_with_a_schema_too() -> None:
    """With a schema that rejects unknown measurements the reason is still the hub_ rule."""
    schemas = MeasurementSchemas(
        SchemaFile.model_validate(
            {
                "accept_unknown_measurements": False,
                "measurements": {"env": {"fields": {"t": {"type": "float"}}}},
            }
        )
    )
    valid, reasons = schemas.validator(1).validate(
        [{"name": "hub_device_connection", "fields": {"event": 1.0}}]
    )
    assert valid == []
    assert reasons == {0: ["measurement names starting with hub_ are reserved for the hub's own"]}


@pytest.mark.unit
def test_schema_file_may_not_list_hub_measurements(tmp_path: Path) -> None:
    """A schema file naming a `hub_` measurement is a clear config error."""
    path = tmp_path / "schemas.toml"
    path.write_text('[measurements.hub_device_connection.fields]\nevent = { type = "float" }\n')
    with pytest.raises(ConfigError, match="hub_device_connection"):
        load_schema_file(path)


@pytest.mark.unit
def test_rejections_have_their_own_metric_labels() -> None:
    """`hub_readings_rejected_total` tells conflicts and reserved names from the rest."""
    assert rejection_reason([conflict_reason("m", "t", str, float)]) == "field_type_conflict"
    reserved = prepare([{"name": "hub_x", "fields": {"v": 1.0}}], FieldTypes()).rejected
    assert rejection_reason(reserved[0].errors) == "reserved_measurement"


# --- A real hub, real InfluxDB ----------------------------------------------------------------


@pytest.mark.integration
async def test_two_devices_one_field_second_is_refused_in_the_ack(
    influxdb: LocalServer, influx_db_name: str, tmp_path: Path
) -> None:
    """Device A writes `shared t="poison"`, device B `shared t=21.5` in the same batch: B's
    ack says why, nothing goes to dead letters, and InfluxDB holds A's point only."""
    settings = hub_settings(
        tmp_path, influxdb.url, influx_bucket=influx_db_name, flush_interval_s=0.5
    )
    poisoner, victim = add_device(settings, "a"), add_device(settings, "b")
    now_ms = time.time_ns() // 10**6
    async with running_hub(settings) as service:
        async with DeviceClient(service.url, poisoner) as a, DeviceClient(service.url, victim) as b:
            first = await a.send_readings(
                [{"name": "shared", "time": now_ms, "fields": {"t": "poison"}}]
            )
            second = await b.send_readings(
                [{"name": "shared", "time": now_ms + 1, "fields": {"t": 21.5}}]
            )
            acks = await asyncio.wait_for(asyncio.gather(first, second), WAIT_S)
        assert service.hub.pipeline.counters.dead_lettered_points == 0
    assert (acks[0].accepted, acks[0].rejected) == (1, [])
    assert acks[1].accepted == 0
    assert [(r.index, r.errors) for r in acks[1].rejected] == [
        (0, ["field t is a string in shared; this reading sends a float"])
    ]
    assert [(row["device"], row["t"]) for row in points(influxdb, influx_db_name, "shared")] == [
        ("a", "poison")
    ]
    assert not settings.dead_letter_path.exists()


@pytest.mark.integration
async def test_types_already_in_influxdb_are_refused_in_the_ack(
    influxdb: LocalServer, influx_db_name: str, tmp_path: Path
) -> None:
    """A field another writer stored before the hub started is known from SHOW FIELD KEYS."""
    influx_write(influxdb.url, influx_db_name, f'shared t="poison" {time.time_ns() - 10**9}')
    settings = hub_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name)
    token = add_device(settings, "b")
    async with running_hub(settings) as service:
        catalog = service.hub.pipeline.field_catalog
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while catalog.shard_ns != WEEK_NS or not catalog.entries:  # the start-up question
            assert loop.time() < deadline, "the hub never learnt InfluxDB's field types"
            await asyncio.sleep(0.02)
        async with DeviceClient(service.url, token) as client:
            ack = await asyncio.wait_for(
                client.store([{"name": "shared", "fields": {"t": 21.5}}]), WAIT_S
            )
    assert ack.accepted == 0
    assert ack.rejected[0].errors == ["field t is a string in shared; this reading sends a float"]
    assert not settings.dead_letter_path.exists()


@pytest.mark.integration
async def test_hub_device_connection_is_refused_from_a_device(
    influxdb: LocalServer, influx_db_name: str, tmp_path: Path
) -> None:
    """A week-ahead `hub_device_connection event=1.0` is refused, so the hub's own presence
    events of that shard stay writable."""
    settings = hub_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name)
    token = add_device(settings, "attacker")
    ahead_ms = (time.time_ns() + WEEK_NS) // 10**6
    async with running_hub(settings) as service, DeviceClient(service.url, token) as client:
        ack = await asyncio.wait_for(
            client.store(
                [{"name": "hub_device_connection", "time": ahead_ms, "fields": {"event": 1.0}}]
            ),
            WAIT_S,
        )
    assert ack.accepted == 0
    assert ack.rejected[0].errors == [
        "measurement names starting with hub_ are reserved for the hub's own"
    ]
    events = points(influxdb, influx_db_name, "hub_device_connection")
    assert {row["event"] for row in events} == {"connected", "disconnected"}
    assert all(row["device"] == "attacker" and row["time"] < ahead_ms * 10**6 for row in events)


@pytest.mark.integration
async def test_victoria_metrics_has_no_field_types_to_conflict_with(
    victoria_metrics: LocalServer, tmp_path: Path
) -> None:
    """On VictoriaMetrics (every value a float64) a field's type may change: both are acked
    as accepted and stored, and the hub never asks for field types."""
    measurement = f"ft_{uuid.uuid4().hex[:8]}"
    settings = hub_settings(tmp_path, victoria_metrics.url, influx_api="auto")
    token = add_device(settings, "vm-device")
    now_ms = time.time_ns() // 10**6
    async with running_hub(settings) as service:
        assert service.hub.pipeline.field_types is None
        async with DeviceClient(service.url, token) as client:
            first = await client.store([{"name": measurement, "time": now_ms, "fields": {"t": 1}}])
            second = await client.store(
                [{"name": measurement, "time": now_ms + 1, "fields": {"t": True}}]
            )
    assert (first.accepted, first.rejected, second.accepted, second.rejected) == (1, [], 1, [])
    series = vm_export(victoria_metrics.url, f'{{__name__="{measurement}_t"}}')
    assert series[0]["values"] == [1.0, 1.0]


@pytest.mark.integration
async def test_telegraf_metrics_of_hub_measurements_are_not_stored(
    influxdb: LocalServer, influx_db_name: str, tmp_path: Path
) -> None:
    """A Telegraf frame: the `hub_` metric is refused (and counted), the other stored."""
    settings = hub_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name)
    token = add_device(settings, "telegraf")
    now_ns = time.time_ns()
    stamp = msgpack.Timestamp.from_unix_nano(now_ns)
    frame = b"".join(
        msgpack.packb({"name": name, "time": stamp, "tags": {"host": "h"}, "fields": {"v": 1.0}})
        for name in ("hub_device_connection", "telegraf_ok")
    )
    async with running_hub(settings) as service, DeviceClient(service.url, token) as client:
        await client.send_raw(frame)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while not points(influxdb, influx_db_name, "telegraf_ok"):
            assert loop.time() < deadline, "the valid Telegraf metric never reached InfluxDB"
            await asyncio.sleep(0.05)
        registry = service.hub.metrics.registry
        rejected = {"reason": "reserved_measurement"}
        assert registry.get_sample_value("hub_readings_rejected_total", rejected) == 1
    events = points(influxdb, influx_db_name, "hub_device_connection")
    assert all(row.get("v") is None for row in events)
    assert {row["event"] for row in events} == {"connected", "disconnected"}


@pytest.mark.integration
async def test_fetch_field_types_from_real_influxdb(
    influxdb: LocalServer, influx_db_name: str, tmp_path: Path
) -> None:
    """InfluxDB 1.6.7 says its types and its shard group duration (autogen: one week); a
    missing database is a refusal, a closed port a transient failure."""
    influx_write(influxdb.url, influx_db_name, f'm s="x",f=1.5,i=2i,b=true {time.time_ns()}')
    found = await fetch_field_types(
        InfluxOptions.of(hub_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name)), "v1"
    )
    assert found.shard_ns == WEEK_NS
    assert found.types == {("m", "s"): str, ("m", "f"): float, ("m", "i"): int, ("m", "b"): bool}
    with pytest.raises(PermanentWriteError, match="database not found"):
        await fetch_field_types(
            InfluxOptions.of(hub_settings(tmp_path, influxdb.url, influx_bucket="nope")), "v1"
        )
    with pytest.raises(TransientWriteError):
        await fetch_field_types(
            InfluxOptions.of(hub_settings(tmp_path, f"http://127.0.0.1:{free_port()}")), "v1"
        )


@pytest.mark.integration
def test_shard_groups_start_where_influxdb_starts_them(
    influxdb: LocalServer, influx_db_name: str
) -> None:
    """Weekly groups start on Mondays, as InfluxDB's do: a Thursday (where Unix-epoch weeks
    would start) is in the same shard as the Monday before it, a Sunday in the one before.
    The catalog and InfluxDB 1.6.7 agree on which writes conflict."""
    catalog = FieldTypes(shard_ns=WEEK_NS)
    monday = catalog.group_start(time.time_ns() - WEEK_NS)
    assert time.gmtime(monday // 10**9).tm_wday == 0
    writes: list[tuple[int, float | str]] = [
        (monday + HOUR_NS, 1.5),
        (monday + 3 * 24 * HOUR_NS, "s"),
        (monday - 1, "s"),
    ]
    verdicts = []
    for at, value in writes:
        refused = catalog.check("m", {"t": value}, at) is not None
        text = f'"{value}"' if isinstance(value, str) else repr(value)
        status, _ = http_request(
            f"{influxdb.url}/write?db={influx_db_name}&precision=ns", f"m t={text} {at}".encode()
        )
        verdicts.append((refused, status))
    assert verdicts == [(False, 204), (True, 400), (False, 204)]
