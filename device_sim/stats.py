"""Counters a fleet shares, and a mergeable latency histogram.

Every device of a fleet adds to one `FleetStats`; the live view and the benchmark read
`snapshot()`s of it. Latencies go into log-spaced buckets (about 4 % wide), so a
percentile costs nothing to keep for millions of acks and histograms from several load
generator processes add up exactly.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

BUCKETS_PER_DOUBLING = 16


def _bucket(latency_ms: float) -> int:
    micros = max(1.0, latency_ms * 1000)
    return int(math.log2(micros) * BUCKETS_PER_DOUBLING)


def _bucket_ms(bucket: int) -> float:
    """The upper edge of a bucket, in milliseconds."""
    return float(2 ** ((bucket + 1) / BUCKETS_PER_DOUBLING) / 1000)


@dataclass
class LatencyHistogram:
    """Latencies in log-spaced buckets; percentiles are bucket upper edges."""

    counts: Counter[int] = field(default_factory=Counter)

    def add(self, latency_ms: float) -> None:
        """Count one latency."""
        self.counts[_bucket(latency_ms)] += 1

    def merge(self, other: LatencyHistogram) -> None:
        """Add another histogram's counts to this one."""
        self.counts.update(other.counts)

    @property
    def total(self) -> int:
        """How many latencies were counted."""
        return sum(self.counts.values())

    def percentile(self, fraction: float) -> float | None:
        """The latency (ms) below which `fraction` of them fall, or None when empty."""
        total = self.total
        if total == 0:
            return None
        wanted = max(1, math.ceil(total * fraction))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= wanted:
                return _bucket_ms(bucket)
        return _bucket_ms(max(self.counts))

    def to_json(self) -> dict[str, int]:
        """Bucket -> count, JSON-friendly."""
        return {str(bucket): count for bucket, count in self.counts.items()}

    @classmethod
    def from_json(cls, data: dict[str, int]) -> LatencyHistogram:
        """The inverse of `to_json`."""
        return cls(Counter({int(bucket): count for bucket, count in data.items()}))


@dataclass
class FleetStats:
    """Live counters of a whole fleet; devices add, observers take snapshots."""

    connected: int = 0
    sent: int = 0
    acked: int = 0
    rejected: int = 0
    resent: int = 0
    in_flight: int = 0
    reconnects: int = 0
    failed_connects: int = 0
    config_acks: int = 0
    first_ack_at: float = 0.0
    last_ack_at: float = 0.0
    """Wall-clock times (time.time()) of the first and the latest ack."""
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    recent_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    """Latencies since the last `take_recent()`: what the live view and time series show."""

    def ack(self, accepted: int, rejected: int, latency_ms: float) -> None:
        """Count one acked message of `accepted + rejected` readings."""
        self.acked += accepted
        self.rejected += rejected
        self.in_flight -= accepted + rejected
        self.last_ack_at = time.time()
        if not self.first_ack_at:
            self.first_ack_at = self.last_ack_at
        bucket = _bucket(latency_ms)
        self.latency.counts[bucket] += 1
        self.recent_latency.counts[bucket] += 1

    def take_recent(self) -> LatencyHistogram:
        """The latencies counted since the last call."""
        recent, self.recent_latency = self.recent_latency, LatencyHistogram()
        return recent

    def counters(self) -> dict[str, int]:
        """Every counter, for a report or a progress line."""
        return {
            "connected": self.connected,
            "sent": self.sent,
            "acked": self.acked,
            "rejected": self.rejected,
            "resent": self.resent,
            "in_flight": self.in_flight,
            "reconnects": self.reconnects,
            "failed_connects": self.failed_connects,
            "config_acks": self.config_acks,
        }


def summary(counters: dict[str, Any], latency: LatencyHistogram) -> dict[str, Any]:
    """Counters plus ack latency percentiles, as a report shows them."""
    return {
        **counters,
        "ack_latency_ms": {
            "p50": _rounded(latency.percentile(0.50)),
            "p99": _rounded(latency.percentile(0.99)),
            "max": _rounded(latency.percentile(1.0)),
            "count": latency.total,
        },
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
