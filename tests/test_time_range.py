"""Times no working clock produces are rejected in the ack: before `min_time` ("clock not
set?") or more than `max_future_s` ahead of the hub's clock ("in the future")."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer
from hub.cli.check import describe
from hub.core.measurements import MeasurementSchemas
from hub.core.readings import NO_TIME_LIMITS, TimeLimits, prepare_readings
from hub.errors import ConfigError
from hub.options import time_limits
from hub.service import HubService
from hub.settings import LIVE_SETTINGS, Settings, load_settings, parse_rfc3339_ns, reload_changes
from tests.support import add_device, hub_settings, points

WAIT_S = 20.0
MS = 10**6
DAY_MS = 86_400_000
Y2000_MS = 946_684_800_000
Y2015_NS = 1_420_070_400 * 10**9


def prepare(readings: list[dict[str, Any]], limits: TimeLimits, now_ns: int) -> Any:
    """prepare_readings for millisecond times, with `now_ns` as the hub's clock."""
    validator = MeasurementSchemas().validator(MS)
    return prepare_readings(readings, validator, "dev-1", MS, now_ns, time_limits=limits)


def reading(time_ms: int | msgpack.Timestamp | None = None) -> dict[str, Any]:
    """One reading, with `time` when given."""
    found: dict[str, Any] = {"name": "m", "fields": {"v": 1.0}}
    if time_ms is not None:
        found["time"] = time_ms
    return found


DEFAULTS = time_limits(Settings())


# --- the rule, pure -------------------------------------------------------------------------


@pytest.mark.unit
def test_defaults_are_2015_and_one_hour() -> None:
    """By default the earliest time is 2015-01-01 and the margin an hour."""
    assert TimeLimits(Y2015_NS, 3600 * 10**9) == DEFAULTS


@pytest.mark.unit
def test_a_board_whose_clock_was_never_set_is_told_so() -> None:
    """A reading stamped 2000-01-01 is rejected with the reason; its neighbour is stored."""
    now_ns = time.time_ns()
    prepared = prepare([reading(now_ns // MS), reading(Y2000_MS)], DEFAULTS, now_ns)
    assert prepared.accepted == 1
    (rejection,) = prepared.rejected
    assert rejection.index == 1
    (error,) = rejection.errors
    assert "2000-01-01T00:00:00Z is before 2015-01-01T00:00:00Z" in error
    assert "clock not set?" in error


@pytest.mark.unit
def test_a_reading_more_than_the_margin_ahead_is_in_the_future() -> None:
    """Two hours ahead of the hub's clock is rejected; 59 minutes ahead is accepted."""
    now_ns = time.time_ns()
    ahead = [reading(now_ns // MS + 59 * 60_000), reading(now_ns // MS + 2 * 3_600_000)]
    prepared = prepare(ahead, DEFAULTS, now_ns)
    assert prepared.accepted == 1
    (rejection,) = prepared.rejected
    assert rejection.index == 1
    assert "more than 3600 s after the hub's clock" in rejection.errors[0]
    assert rejection.errors[0].endswith("in the future")


@pytest.mark.unit
def test_a_device_catching_up_on_a_month_of_readings_is_accepted() -> None:
    """Readings buffered over the last 31 days, one an hour, are all accepted."""
    now_ns = time.time_ns()
    backlog = [reading(now_ns // MS - hours * 3_600_000) for hours in range(31 * 24)]
    prepared = prepare(backlog, DEFAULTS, now_ns)
    assert (prepared.accepted, prepared.rejected) == (len(backlog), [])


@pytest.mark.unit
def test_readings_without_time_are_never_refused_for_it() -> None:
    """A reading without `time` gets the arrival time, which is always in range."""
    assert prepare([reading()], DEFAULTS, time.time_ns()).accepted == 1


@pytest.mark.unit
def test_msgpack_timestamps_are_checked_too() -> None:
    """A msgpack timestamp of 1970 is as clock-not-set as an integer one."""
    prepared = prepare([reading(msgpack.Timestamp(5, 0))], DEFAULTS, time.time_ns())
    assert "clock not set?" in prepared.rejected[0].errors[0]


@pytest.mark.unit
def test_the_bound_itself_is_accepted() -> None:
    """Exactly min_time, and exactly the margin ahead, are in range."""
    now_ns = 1_800_000_000 * 10**9
    limits = TimeLimits(Y2015_NS, 10 * 10**9)
    prepared = prepare(
        [reading(Y2015_NS // MS), reading((now_ns + 10 * 10**9) // MS)], limits, now_ns
    )
    assert (prepared.accepted, prepared.rejected) == (2, [])
    prepared = prepare(
        [reading(Y2015_NS // MS - 1), reading(now_ns // MS + 10_001)], limits, now_ns
    )
    assert [r.index for r in prepared.rejected] == [0, 1]


@pytest.mark.unit
def test_empty_min_time_turns_the_lower_bound_off() -> None:
    """With min_time empty, 1970 and 1900 are stored (InfluxDB's own range still holds)."""
    limits = time_limits(Settings(min_time=""))
    assert limits.earliest_ns is None
    prepared = prepare([reading(0), reading(-2_208_988_800_000)], limits, time.time_ns())
    assert prepared.accepted == 2


@pytest.mark.unit
def test_without_limits_only_influxdbs_range_applies() -> None:
    """prepare_readings by default checks no clock (callers such as benchmarks pass none)."""
    assert prepare([reading(Y2000_MS), reading(2**43)], NO_TIME_LIMITS, 0).accepted == 2


# --- the settings ---------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("2015-01-01T00:00:00Z", Y2015_NS),
        ("2015-01-01T01:00:00+01:00", Y2015_NS),
        ("1969-12-31T23:59:59.5Z", -500_000_000),
        ("2024-02-29T12:00:00.000001Z", 1_709_208_000_000_001_000),
    ],
)
def test_min_time_is_rfc_3339(text: str, ns: int) -> None:
    """RFC 3339 times with Z or an offset, fractions included, to the exact nanosecond."""
    assert parse_rfc3339_ns(text) == ns
    assert time_limits(Settings(min_time=text)).earliest_ns == ns


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "reason"),
    [("yesterday", "not an RFC 3339 time"), ("2015-01-01T00:00:00", "no time zone")],
)
def test_a_bad_min_time_is_a_clear_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, reason: str
) -> None:
    """From the environment or a file, a bad min_time names the setting and what is wrong."""
    monkeypatch.setenv("HUB_MIN_TIME", text)
    with pytest.raises(ConfigError, match=f"min_time.*{reason}"):
        load_settings(state_dir=tmp_path)


@pytest.mark.unit
def test_max_future_s_must_be_positive(tmp_path: Path) -> None:
    """A margin of zero or less is refused."""
    config = tmp_path / "hub.toml"
    config.write_text("max_future_s = 0\n")
    with pytest.raises(ConfigError, match="max_future_s"):
        load_settings(config, state_dir=tmp_path)


@pytest.mark.unit
def test_settings_come_from_toml_and_show_in_check_config(tmp_path: Path) -> None:
    """Both settings come from the config file and check-config marks them live."""
    config = tmp_path / "hub.toml"
    config.write_text('min_time = "2020-06-01T00:00:00Z"\nmax_future_s = 60\n')
    settings = load_settings(config, state_dir=tmp_path)
    assert (settings.min_time, settings.max_future_s) == ("2020-06-01T00:00:00Z", 60.0)
    lines = describe(settings, {"min_time": "config file", "max_future_s": "config file"})
    assert any(
        line.startswith('min_time = "2020-06-01T00:00:00Z"') and "SIGHUP reloads" in line
        for line in lines
    )
    assert any(line.startswith("max_future_s = 60.0") for line in lines)


@pytest.mark.unit
def test_both_are_live_settings(tmp_path: Path) -> None:
    """A reload applies them without a restart."""
    assert {"min_time", "max_future_s"} <= LIVE_SETTINGS
    current = Settings(state_dir=tmp_path)
    fresh = Settings(state_dir=tmp_path, min_time="", max_future_s=5)
    assert reload_changes(current, fresh) == ({"min_time": "", "max_future_s": 5.0}, [])


# --- through a running hub ------------------------------------------------------------------


@pytest.mark.integration
async def test_a_reload_changes_the_limits_for_an_open_connection(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Refused with the defaults; after a reload with min_time off, the same connection's
    resent readings are stored; a month of backlog is stored throughout."""
    state = tmp_path / "state"
    settings = hub_settings(state, influxdb.url, influx_bucket=influx_db_name, influx_api="v1")
    fresh = {"settings": settings}
    service = HubService(settings, load_settings=lambda: fresh["settings"])
    token = add_device(settings, "clockless")
    now_ms = time.time_ns() // MS
    month = [
        {"name": "backlog", "time": now_ms - day * DAY_MS, "fields": {"v": float(day)}}
        for day in range(31)
    ]
    old = [{"name": "unset", "time": Y2000_MS + n, "fields": {"v": float(n)}} for n in range(3)]
    await service.start()
    try:
        async with DeviceClient(service.url, token) as device:
            ack = await asyncio.wait_for(device.store(month + old), WAIT_S)
            assert ack.accepted == len(month)
            assert [r.index for r in ack.rejected] == [31, 32, 33]
            assert all("clock not set?" in r.errors[0] for r in ack.rejected)
            fresh["settings"] = settings.model_copy(update={"min_time": ""})
            service.reload()
            ack = await asyncio.wait_for(device.store(old), WAIT_S)
            assert (ack.accepted, ack.rejected) == (3, [])
    finally:
        await service.stop()
    assert len(points(influxdb, influx_db_name, "backlog")) == 31
    assert [row["time"] // MS for row in points(influxdb, influx_db_name, "unset")] == [
        Y2000_MS + n for n in range(3)
    ]


@pytest.mark.e2e
def test_hub_serve_takes_them_as_flags_and_names_a_bad_one(tmp_path: Path) -> None:
    """`hub serve --min-time yesterday` stops before serving, saying what is wrong."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    done = subprocess.run(
        [sys.executable, "-m", "hub", "serve", "--state-dir", str(tmp_path), "--port", "0",
         "--min-time", "yesterday", "--max-future-s", "60"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "min_time" in done.stderr and "not an RFC 3339 time" in done.stderr
    assert load_settings(state_dir=tmp_path, min_time="", max_future_s=60.0).max_future_s == 60
