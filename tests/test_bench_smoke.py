"""A tiny run of `device-sim bench`: every scenario runs and reports numbers.

The run needs InfluxDB, PostgreSQL and HAProxy (Debian's packages), as the suite's other
end-to-end tests do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_sim.bench.procstat import children
from device_sim.bench.report import TARGETS

pytestmark = pytest.mark.e2e

SMOKE_TIMEOUT_S = 300.0
"""About 100 s on a quiet 2-core box: three hubs and a PostgreSQL start several times."""
START_S = 60.0
STOP_S = 60.0
"""The hubs drain on SIGTERM (bounded by their shutdown timeout), then InfluxDB stops."""
SCENARIOS = (
    "ceiling",
    "no_hub",
    "batched",
    "batched_half",
    "single",
    "idle",
    "storm",
    "config",
    "workers",
    "postgres",
    "takeover",
    "cluster_push",
)


def test_smoke_bench_reports_every_scenario_with_numbers(tmp_path: Path) -> None:
    """`device-sim bench --smoke` writes a report with every scenario, its figures and a chart."""
    result = subprocess.run(
        [sys.executable, "-m", "device_sim", "bench", "--smoke", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["failed"] == {}, report["failed"]
    scenarios = report["scenarios"]
    assert set(scenarios) == set(SCENARIOS)
    for name in ("ceiling", "no_hub", "batched", "single"):
        metrics = scenarios[name]["metrics"]
        assert metrics["stored"] > 0, name
        assert metrics["stored_per_s"] > 0, name
    for name in ("batched", "single"):
        assert scenarios[name]["metrics"]["stored"] == scenarios[name]["metrics"]["acked"]
        assert scenarios[name]["metrics"]["hub_cpu_s"] > 0
    assert scenarios["idle"]["metrics"]["rss_per_connection_kib"] is not None
    assert scenarios["storm"]["metrics"]["acked"] == scenarios["storm"]["metrics"]["devices"]
    config = scenarios["config"]["metrics"]
    assert config["round_trip_p99_ms"] is not None
    assert config["fleet_push_acked"] == config["fleet_push_devices"]
    workers = scenarios["workers"]["metrics"]
    assert workers["stored"] == workers["acked"] > 0, workers
    assert workers["hub_cpu_s"] > 0
    for way in ("reuseport", "shared"):
        spread = workers[f"{way}_connections_per_worker"]
        assert len(spread) == workers["workers"] == 2, spread
        assert sum(spread.values()) == report["sizes"]["spread_connections"], spread
    postgres = scenarios["postgres"]["metrics"]
    assert postgres["all_stored"] and postgres["stored"] == postgres["acked"] > 0, postgres
    for key in ("hub_cpu_us_per_reading", "sqlite_hub_cpu_us_per_reading"):
        assert postgres[key] > 0, key
    takeover = scenarios["takeover"]["metrics"]
    assert takeover["moves_across_hubs"] + takeover["same_hub_moves"] == takeover["moves"]
    assert takeover["moves_across_hubs"] > 0, takeover
    push = scenarios["cluster_push"]["metrics"]
    assert sum(push["devices_per_hub"].values()) == push["devices"], push
    assert push["all_answered"] == push["label_answered"] == f"{push['devices']}/{push['devices']}"
    assert len(push["devices_per_hub"]) == report["sizes"]["cluster_hubs"]
    assert push["all_all_acked_s"] >= push["all_set_s"] > 0
    assert push["label_all_acked_s"] >= push["label_set_s"] > 0
    assert [row for row in report["targets"] if row["value"] is None] == []
    assert len(report["targets"]) == len(TARGETS)
    assert all(value is not None for value in report["ratios"].values())
    assert (tmp_path / "bench.png").stat().st_size > 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as raw:
            return raw.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running and not a zombie (a reaped or exited child reads as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_bench_stopped_by_sigterm_stops_what_it_started(tmp_path: Path) -> None:
    """SIGTERM while the workers scenario runs: the bench exits 143 and every process it
    started (InfluxDB, the hub, its workers, the load generators) is gone soon after."""
    bench = subprocess.Popen(
        [sys.executable, "-m", "device_sim", "bench", "--smoke", "--only", "workers",
         "--out-dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    descendants: list[int] = []
    try:
        deadline = time.monotonic() + START_S
        started: list[int] = []
        while not any("hub serve" in _cmdline(pid) for pid in started):
            assert bench.poll() is None, "the bench ended before it started a hub"
            assert time.monotonic() < deadline, "no hub started"
            time.sleep(0.1)
            started = children(bench.pid)
        descendants += started + [grandchild for pid in started for grandchild in children(pid)]
        bench.send_signal(signal.SIGTERM)
        _, stderr = bench.communicate(timeout=STOP_S)
        assert bench.returncode == 143, stderr.decode(errors="replace")[-3000:]
        deadline = time.monotonic() + STOP_S
        while left := [pid for pid in descendants if _alive(pid)]:
            assert time.monotonic() < deadline, [_cmdline(pid) for pid in left]
            time.sleep(0.1)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(STOP_S)
        for pid in descendants:  # what a failing bench left behind, by pid
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
