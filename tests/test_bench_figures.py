"""The benchmark's own arithmetic: percentiles, process trees from /proc, worker spread and
the PostgreSQL-against-SQLite comparison (pure, no server)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from device_sim.bench.costs import compare_runs
from device_sim.bench.drive import percentile
from device_sim.bench.procstat import ProcessSample, sample, sum_samples, tree_sample
from device_sim.bench.workers import spread_metrics

pytestmark = pytest.mark.unit


def test_percentile_is_nearest_rank_and_keeps_negative_values() -> None:
    """A takeover closed before the new handshake's answer is negative: kept, ranked."""
    values = [float(v) for v in range(-10, 90)]  # 100 values
    assert percentile(values, 0.5) == 39.0
    assert percentile(values, 0.99) == 88.0
    assert percentile(values, 0.0) == -10.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.5) is None


def test_a_tree_sample_is_at_least_the_process_itself() -> None:
    """This process has no children: its tree is itself (CPU may only have grown since)."""
    alone = sample(os.getpid())
    tree = tree_sample(os.getpid())
    assert tree.cpu_s >= alone.cpu_s
    assert 0 < tree.rss_bytes <= tree.peak_rss_bytes


def test_sum_samples_adds_every_figure() -> None:
    """Several hubs (or a supervisor and its workers) as one."""
    total = sum_samples([ProcessSample(1.5, 10, 20), ProcessSample(2.0, 5, 7)])
    assert total == ProcessSample(3.5, 15, 27)


def test_spread_is_max_over_mean() -> None:
    """Connections per worker, sorted by worker, and the most loaded one against the mean."""
    metrics = spread_metrics({"2": 515.0, "1": 485.0}, "reuseport")
    assert metrics == {
        "reuseport_connections_per_worker": {"1": 485, "2": 515},
        "reuseport_max_over_mean": 1.03,
    }


def _run(cpu: float, stored: int = 100, window: str = "steady") -> dict[str, Any]:
    return {
        "devices": 10,
        "batch": 5,
        "acked": stored,
        "stored": stored,
        "stored_per_s": stored / 2,
        "hub_cpu_us_per_reading": cpu,
        "hub_cpu_us_per_reading_whole_run": cpu * 2,
        "hub_cpu_window": window,
        "ack_latency_steady_p99_ms": 1.0,
        "hub_cpu_s": cpu / 10,
        "hub_peak_rss_mib": 100.0,
        "loadgen_cpu_s": 1.0,
        "influxdb_cpu_s": 1.0,
        "machine_busy_pct": 50,
        "other_cpu_s": 0.5,
    }


def test_the_comparison_is_of_the_means_of_the_rounds() -> None:
    """Three hubs at 11 and 13 µs against SQLite at 9 and 11: 12 / 10 = 1.2; against three
    SQLite hubs at 11 and 14: 12 / 12.5 = 0.96; a round whose stored count differs from its
    acks is reported, and so is each run's CPU window."""
    figures = compare_runs(
        {
            "sqlite": [_run(9.0), _run(11.0)],
            "postgres_one": [_run(10.0), _run(10.0)],
            "sqlite_three": [_run(11.0), _run(14.0)],
            "cluster": [_run(11.0), _run(13.0, window="whole_run")],
        }
    )
    assert figures["cpu_ratio_to_sqlite_three"] == 0.96
    assert figures["sqlite_three_cpu_ratio_to_sqlite"] == 1.25
    assert figures["cpu_ratio_to_sqlite"] == 1.2
    assert figures["postgres_one_cpu_ratio_to_sqlite"] == 1.0
    assert figures["cpu_ratio_to_sqlite_whole_run"] == 1.2
    assert figures["hub_cpu_us_per_reading_rounds"] == [11.0, 13.0]
    assert figures["hub_cpu_windows"] == ["steady", "whole_run"]
    assert figures["all_stored"] is True
    lost = _run(10.0)
    lost["stored"] = 99
    mixed = compare_runs(
        {
            "sqlite": [_run(9.0)],
            "postgres_one": [lost],
            "sqlite_three": [_run(9.0)],
            "cluster": [_run(9.0)],
        }
    )
    assert mixed["all_stored"] is False
