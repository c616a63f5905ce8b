"""What the write pipeline has done, kept as plain numbers that `/metrics` reads at scrape time.

The pipeline's components count here and never touch Prometheus objects: the service builds
the metrics once, and a collector (`hub.ops.metrics`) turns these snapshots into samples.
Everything is counted once per batch, never per reading.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally
from dataclasses import dataclass, field

BATCH_POINTS_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000)
WRITE_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
UNREACHABLE = "unreachable"
"""The status of a failed write that got no HTTP answer."""
TIMEOUT = "timeout"
"""The status of a write that got no answer within `write_deadline_s`."""


@dataclass
class PipelineCounters:
    """What the pipeline has done since start."""

    points_written: int = 0
    batches_written: int = 0
    points_spooled: int = 0
    points_replayed: int = 0
    retries: int = 0
    dead_lettered_points: int = 0
    """Points InfluxDB refused for good: exactly what it said it dropped."""


@dataclass
class Distribution:
    """Observations counted into fixed buckets (upper bounds, inclusive), as a histogram."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    """Per bucket, then one more for values above the last bound (not cumulative)."""
    total: float = 0.0
    """The sum of every observed value."""

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(self.bounds):
            raise ValueError(f"bucket bounds must be sorted, got {self.bounds}")
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        """How many values were observed."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) per bucket, `inf` last."""
        running = 0
        result = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            result.append((bound, running))
        return result


@dataclass
class WriteStats:
    """How writes to the server went: failures by status, durations, batch sizes."""

    errors: Tally[str] = field(default_factory=Tally)
    """Failed writes by HTTP status, `unreachable` or `timeout`."""
    write_seconds: Distribution = field(default_factory=lambda: Distribution(WRITE_SECONDS_BUCKETS))
    batch_points: Distribution = field(default_factory=lambda: Distribution(BATCH_POINTS_BUCKETS))

    def failed(self, status: int | str | None) -> None:
        """Count one failed write (None: no answer at all)."""
        self.errors[str(status) if status is not None else UNREACHABLE] += 1
