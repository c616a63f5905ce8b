"""The pipeline's write stats, and the /metrics samples a collector reads from them."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from hub.ingest.stats import Distribution, WriteStats
from hub.ops.metrics import HubMetrics, WriteStatsCollector

pytestmark = pytest.mark.unit


def test_a_distribution_counts_each_value_in_its_bucket() -> None:
    values = Distribution((1.0, 10.0))
    for value in (0.5, 1.0, 3, 10, 11, 1000):
        values.observe(value)
    assert values.counts == [2, 2, 2]  # bounds are inclusive, the last bucket is above all
    assert values.cumulative() == [(1.0, 2), (10.0, 4), (float("inf"), 6)]
    assert values.count == 6
    assert values.total == pytest.approx(1025.5)


def test_distribution_bounds_must_be_sorted() -> None:
    with pytest.raises(ValueError, match="sorted"):
        Distribution((10.0, 1.0))


def test_failed_writes_are_counted_by_status() -> None:
    stats = WriteStats()
    stats.failed(503)
    stats.failed(503)
    stats.failed(None)
    stats.failed("timeout")
    assert stats.errors == {"503": 2, "unreachable": 1, "timeout": 1}


def scrape(stats: WriteStats) -> str:
    registry = CollectorRegistry()
    registry.register(WriteStatsCollector(stats))
    return generate_latest(registry).decode()


def test_the_collector_exports_the_names_the_dashboards_use() -> None:
    stats = WriteStats()
    text = scrape(stats)
    # Known statuses are there at 0 before the first failure, so rates and alerts work.
    assert 'hub_influx_errors_total{status="unreachable"} 0.0' in text
    assert 'hub_influx_errors_total{status="timeout"} 0.0' in text
    assert "hub_batch_points_count 0.0" in text
    stats.failed(404)
    stats.batch_points.observe(50)
    stats.write_seconds.observe(0.004)
    text = scrape(stats)
    assert 'hub_influx_errors_total{status="404"} 1.0' in text
    assert 'hub_batch_points_bucket{le="10.0"} 0.0' in text
    assert 'hub_batch_points_bucket{le="50.0"} 1.0' in text
    assert 'hub_batch_points_bucket{le="+Inf"} 1.0' in text
    assert "hub_batch_points_sum 50.0" in text
    assert 'hub_influx_write_duration_seconds_bucket{le="0.005"} 1.0' in text
    assert 'hub_influx_write_duration_seconds_bucket{le="0.0025"} 0.0' in text
    assert "hub_influx_write_duration_seconds_count 1.0" in text


def test_the_hub_metrics_read_write_stats_they_are_given() -> None:
    metrics = HubMetrics()
    stats = WriteStats()
    metrics.watch_writes(stats)
    stats.failed(None)
    text = generate_latest(metrics.registry).decode()
    assert 'hub_influx_errors_total{status="unreachable"} 1.0' in text
