"""The InfluxDB sinks against real servers, API detection, and how HTTP failures are classified."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from device_sim.local_servers import (
    LocalServer,
    free_port,
    influxql,
    influxql_series,
    quote_ident,
    vm_export,
)
from hub.core.dialects import Dialect
from hub.errors import ConfigError, PermanentWriteError, TransientWriteError
from hub.ingest.sinks import V1Sink, V2Sink, classify, detect_server, open_sink, parse_retry_after
from hub.options import InfluxOptions
from hub.settings import Settings


def sink_settings(tmp_path: Path, url: str, **overrides: Any) -> Settings:
    """Settings for a sink writing to `url`."""
    return Settings(state_dir=tmp_path, influx_url=url, **overrides)


def ms_aligned_now_ns() -> int:
    """Now in ns, on a whole millisecond (VictoriaMetrics keeps milliseconds only)."""
    return time.time_ns() // 10**6 * 10**6


# --- V1Sink against InfluxDB 1.6.7 -------------------------------------------------------------


@pytest.mark.integration
async def test_v1_sink_writes_to_the_database(
    influxdb: LocalServer, influx_db_name: str, tmp_path: Path
) -> None:
    """V1Sink's points read back from the database with their tags, values and ns times."""
    sink = V1Sink(
        InfluxOptions.of(sink_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name))
    )
    t = time.time_ns()
    try:
        await sink.write(f"env,device=a temp=21.5 {t}\nenv,device=b temp=-3 {t + 1}".encode())
    finally:
        await sink.close()
    rows = influxql(influxdb.url, influx_db_name, "SELECT * FROM env ORDER BY time")
    assert rows == [
        {"time": t, "device": "a", "temp": 21.5},
        {"time": t + 1, "device": "b", "temp": -3},
    ]


@pytest.mark.integration
async def test_v1_sink_writes_to_the_retention_policy_of_db_slash_rp(
    influxdb: LocalServer, influx_db_name: str, tmp_path: Path
) -> None:
    """With bucket `db/rp` the points land in that retention policy, not the default one."""
    db = quote_ident(influx_db_name)
    influxql_series(
        influxdb.url,
        influx_db_name,
        f"CREATE RETENTION POLICY short ON {db} DURATION 2h REPLICATION 1",
    )
    settings = sink_settings(tmp_path, influxdb.url, influx_bucket=f"{influx_db_name}/short")
    sink = V1Sink(InfluxOptions.of(settings))
    t = time.time_ns()
    try:
        await sink.write(f"env,device=a temp=1.5 {t}".encode())
    finally:
        await sink.close()
    in_rp = influxql(influxdb.url, influx_db_name, f"SELECT * FROM {db}.short.env")
    in_default = influxql(influxdb.url, influx_db_name, f"SELECT * FROM {db}.autogen.env")
    assert in_rp == [{"time": t, "device": "a", "temp": 1.5}]
    assert in_default == []


@pytest.mark.integration
async def test_v1_sink_reports_a_missing_database_as_permanent(
    influxdb: LocalServer, tmp_path: Path
) -> None:
    """InfluxDB's 404 for an unknown database is a PermanentWriteError with its plain reason."""
    sink = V1Sink(
        InfluxOptions.of(sink_settings(tmp_path, influxdb.url, influx_bucket="no_such_db"))
    )
    try:
        with pytest.raises(PermanentWriteError) as caught:
            await sink.write(b"env temp=1")
    finally:
        await sink.close()
    assert caught.value.status == 404
    assert caught.value.reason == 'database not found: "no_such_db"'


@pytest.mark.integration
async def test_v1_sink_reports_a_bad_line_as_permanent(
    influxdb: LocalServer, influx_db_name: str, tmp_path: Path
) -> None:
    """A line InfluxDB cannot parse is a permanent 400 naming the problem."""
    sink = V1Sink(
        InfluxOptions.of(sink_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name))
    )
    try:
        with pytest.raises(PermanentWriteError) as caught:
            await sink.write(b"env temp=")
    finally:
        await sink.close()
    assert caught.value.status == 400
    assert "unable to parse" in caught.value.reason


@pytest.mark.integration
async def test_v1_sink_reports_an_unreachable_server_as_transient(tmp_path: Path) -> None:
    """Nothing listening is a TransientWriteError without a status."""
    sink = V1Sink(InfluxOptions.of(sink_settings(tmp_path, f"http://127.0.0.1:{free_port()}")))
    try:
        with pytest.raises(TransientWriteError) as caught:
            await sink.write(b"env temp=1")
    finally:
        await sink.close()
    assert caught.value.status is None


@pytest.mark.unit
def test_v1_sink_wants_user_colon_password(tmp_path: Path) -> None:
    """A v1 token without ':' is a configuration error, raised before any write."""
    with pytest.raises(ConfigError, match="user:password"):
        V1Sink(
            InfluxOptions.of(
                sink_settings(tmp_path, "http://127.0.0.1:1", influx_token="just-a-token")
            )
        )


# --- V2Sink ------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_v2_sink_writes_numeric_fields_to_victoria_metrics(
    victoria_metrics: LocalServer, tmp_path: Path
) -> None:
    """V2Sink's points read back from VictoriaMetrics as one `measurement_field` series each."""
    measurement = f"m{uuid.uuid4().hex[:12]}"
    settings = sink_settings(tmp_path, victoria_metrics.url, influx_bucket="b", influx_org="o")
    sink = V2Sink(InfluxOptions.of(settings))
    t = ms_aligned_now_ns()
    body = (
        f"{measurement},device=a temp=21.5,count=3i {t}\n"
        f"{measurement},device=a temp=22.25,count=4i {t + 10**6}"
    )
    try:
        await sink.write(body.encode())
    finally:
        await sink.close()
    exported = vm_export(victoria_metrics.url, f'{{__name__=~"{measurement}_.+"}}')
    series = {
        s["metric"]["__name__"]: (s["metric"]["device"], s["values"], s["timestamps"])
        for s in exported
    }
    t_ms = t // 10**6
    assert series == {
        f"{measurement}_temp": ("a", [21.5, 22.25], [t_ms, t_ms + 1]),
        f"{measurement}_count": ("a", [3, 4], [t_ms, t_ms + 1]),
    }


@pytest.mark.integration
async def test_v2_sink_reports_a_missing_v2_api_as_permanent(
    influxdb: LocalServer, tmp_path: Path
) -> None:
    """InfluxDB 1.6.7 has no /api/v2/write: V2Sink gets a 404, a PermanentWriteError."""
    sink = V2Sink(
        InfluxOptions.of(sink_settings(tmp_path, influxdb.url, influx_bucket="b", influx_org="o"))
    )
    try:
        with pytest.raises(PermanentWriteError) as caught:
            await sink.write(b"env temp=1")
    finally:
        await sink.close()
    assert caught.value.status == 404


@pytest.mark.integration
async def test_v2_sink_reports_an_unreachable_server_as_transient(tmp_path: Path) -> None:
    """Nothing listening is a TransientWriteError for V2Sink too."""
    url = f"http://127.0.0.1:{free_port()}"
    sink = V2Sink(InfluxOptions.of(sink_settings(tmp_path, url, influx_bucket="b", influx_org="o")))
    try:
        with pytest.raises(TransientWriteError):
            await sink.write(b"env temp=1")
    finally:
        await sink.close()


# --- Detecting the API -------------------------------------------------------------------------


@pytest.mark.integration
async def test_detect_server_says_v1_for_influxdb_1_6(influxdb: LocalServer) -> None:
    """InfluxDB 1.6.7 (X-Influxdb-Version 1.6.7~rc0) is InfluxDB 1.x, without the v2 API."""
    assert await detect_server(influxdb.url) == ("v1", Dialect.INFLUXDB_1)


@pytest.mark.integration
async def test_detect_server_says_v2_for_victoria_metrics(victoria_metrics: LocalServer) -> None:
    """VictoriaMetrics names no InfluxDB version; its start page names VictoriaMetrics."""
    assert await detect_server(victoria_metrics.url) == ("v2", Dialect.VICTORIA_METRICS)


@pytest.mark.integration
async def test_detect_server_of_an_unreachable_server_is_transient() -> None:
    """A /ping nobody answers is a TransientWriteError, so open_sink keeps asking."""
    with pytest.raises(TransientWriteError):
        await detect_server(f"http://127.0.0.1:{free_port()}", timeout_s=2.0)


@pytest.mark.integration
async def test_open_sink_auto_picks_v1_for_influxdb_1_6(
    influxdb: LocalServer, tmp_path: Path
) -> None:
    """With influx_api=auto, the sink writes with the v1 API to InfluxDB 1.6.7."""
    sink = await open_sink(
        InfluxOptions.of(sink_settings(tmp_path, influxdb.url, influx_api="auto"))
    )
    try:
        assert (sink.name, sink.dialect) == ("v1", Dialect.INFLUXDB_1)
    finally:
        await sink.close()


@pytest.mark.integration
async def test_open_sink_auto_picks_v2_for_victoria_metrics(
    victoria_metrics: LocalServer, tmp_path: Path
) -> None:
    """With influx_api=auto, the sink writes with v2 to VictoriaMetrics, not as to InfluxDB."""
    sink = await open_sink(
        InfluxOptions.of(sink_settings(tmp_path, victoria_metrics.url, influx_api="auto"))
    )
    try:
        assert (sink.name, sink.dialect) == ("v2", Dialect.VICTORIA_METRICS)
    finally:
        await sink.close()


@pytest.mark.integration
async def test_open_sink_v1_asks_nothing(tmp_path: Path) -> None:
    """With influx_api=v1, open_sink returns a V1Sink without contacting the server."""
    url = f"http://127.0.0.1:{free_port()}"
    sink = await asyncio.wait_for(
        open_sink(InfluxOptions.of(sink_settings(tmp_path, url, influx_api="v1"))), 5
    )
    try:
        assert isinstance(sink, V1Sink)
    finally:
        await sink.close()


@pytest.mark.unit
async def test_open_sink_without_url_is_a_config_error(tmp_path: Path) -> None:
    """No influx_url is a ConfigError that says how to give one."""
    with pytest.raises(ConfigError, match="--influx-url"):
        await open_sink(InfluxOptions.of(Settings(state_dir=tmp_path)))


# --- Classifying failures ----------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
def test_classify_transient_statuses(status: int) -> None:
    """5xx, 408 and 429 are worth a retry, and keep their status and Retry-After."""
    error = classify(status, "try later", "7")
    assert isinstance(error, TransientWriteError)
    assert (error.status, error.reason, error.retry_after) == (status, "try later", 7.0)


@pytest.mark.unit
@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_classify_permanent_statuses(status: int) -> None:
    """400, 401, 403, 404, 413 and 422 cannot be fixed by retrying."""
    error = classify(status, "refused", None)
    assert isinstance(error, PermanentWriteError)
    assert not isinstance(error, TransientWriteError)
    assert (error.status, error.reason) == (status, "refused")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("5", 5.0),
        (" 2.5 ", 2.5),
        ("0", 0.0),
        ("-3", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    """Retry-After in seconds is read (negatives clamp to 0); dates and junk are ignored."""
    assert parse_retry_after(header) == seconds


@pytest.mark.integration
async def test_auto_sink_starts_while_the_server_is_away(
    influxdb: LocalServer, tmp_path: Path
) -> None:
    """With auto and nothing listening, open_sink returns at once and learns the API later."""
    port = free_port()
    sink = await asyncio.wait_for(
        open_sink(
            InfluxOptions.of(sink_settings(tmp_path, f"http://127.0.0.1:{port}", influx_api="auto"))
        ),
        10,
    )
    try:
        assert (sink.name, sink.dialect) == ("auto", Dialect.STRICT)
        with pytest.raises(TransientWriteError):
            await sink.write(b"m f=1 1")
    finally:
        await sink.close()
