"""A tiny run of `device-sim bench`: every scenario runs and reports numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from device_sim.bench.report import TARGETS

pytestmark = pytest.mark.e2e

SMOKE_TIMEOUT_S = 110.0
SCENARIOS = ("ceiling", "no_hub", "batched", "batched_half", "single", "idle", "storm", "config")


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
    assert [row for row in report["targets"] if row["value"] is None] == []
    assert len(report["targets"]) == len(TARGETS)
    assert all(value is not None for value in report["ratios"].values())
    assert (tmp_path / "bench.png").stat().st_size > 0
