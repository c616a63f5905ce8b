"""What `hub top` shows, computed from two scrapes of `/metrics` and the registry's presence.

Pure: no sockets, no files, no terminal. `hub/cli/top.py` fetches the inputs and draws the
frame with rich. Rates and latency quantiles are over the time between the two scrapes
(counters are cumulative; a counter that went down means the hub restarted, and the rate
is then taken from zero).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from hub.registry.sqlite import Presence
from hub.workers.exposition import WORKER_LABEL, fold_workers

SampleKey = tuple[str, tuple[tuple[str, str], ...]]
"""A sample's name and its sorted labels."""


@dataclass(frozen=True, slots=True)
class WorkerLine:
    """One worker of `hub serve --workers N`, as its supervisor's /metrics tells."""

    worker: str
    up: bool
    connections: int
    restarts: int


@dataclass(frozen=True, slots=True)
class Scrape:
    """One read of `/metrics`: every sample by name and labels (a hub of workers folded
    into one), the workers one by one, and when it was taken."""

    at: float
    samples: Mapping[SampleKey, float]
    workers: tuple[WorkerLine, ...] = ()

    def value(self, name: str, **labels: str) -> float:
        """One sample's value; 0 if the hub does not export it (yet)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """Every sample of `name`, by the value of its `label`."""
        return {
            dict(labels)[label]: value
            for (sample, labels), value in self.samples.items()
            if sample == name and label in dict(labels)
        }


def parse_scrape(text: str, at: float) -> Scrape:
    """The Prometheus text format as a `Scrape` taken at `at` (a monotonic time); a hub of
    several workers as one (`hub.workers.exposition.fold_workers`)."""
    samples: dict[SampleKey, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return Scrape(at, fold_workers(samples), workers_of(samples))


def workers_of(samples: Mapping[SampleKey, float]) -> tuple[WorkerLine, ...]:
    """Each worker's state from a supervisor's samples (none for a hub of one process),
    in the order of their numbers."""
    per: dict[str, dict[str, float]] = {}
    for (name, labels), value in samples.items():
        worker = dict(labels).get(WORKER_LABEL)
        if worker is not None and name in _WORKER_SAMPLES:
            per.setdefault(worker, {})[name] = per.get(worker, {}).get(name, 0.0) + value
    return tuple(
        WorkerLine(
            worker,
            seen.get("hub_worker_up", 0.0) == 1.0,
            int(seen.get("hub_connections", 0.0)),
            int(seen.get("hub_worker_restarts_total", 0.0)),
        )
        for worker, seen in sorted(per.items(), key=lambda item: _number(item[0]))
    )


_WORKER_SAMPLES = frozenset({"hub_worker_up", "hub_connections", "hub_worker_restarts_total"})


def _number(worker: str) -> tuple[int, str]:
    return (int(worker), "") if worker.isdigit() else (1 << 30, worker)


def increase(before: float, after: float) -> float:
    """How much a counter grew; a counter that went down was reset (the hub restarted)."""
    return after - before if after >= before else after


def histogram_quantile(q: float, buckets: Mapping[str, float]) -> float | None:
    """The q-quantile of cumulative bucket counts by `le` (as PromQL's histogram_quantile:
    linear within the bucket), or None with no observations."""
    bounds = sorted(
        (math.inf if le == "+Inf" else float(le), count) for le, count in buckets.items()
    )
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in bounds:
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bound: its value is all we know
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


def _bucket_increase(before: Scrape | None, after: Scrape, name: str) -> dict[str, float]:
    now = after.by_label(f"{name}_bucket", "le")
    if before is None:
        return now
    then = before.by_label(f"{name}_bucket", "le")
    return {le: increase(then.get(le, 0.0), count) for le, count in now.items()}


@dataclass(frozen=True, slots=True)
class Latency:
    """Median and 99th percentile in seconds, or None without observations."""

    p50: float | None
    p99: float | None


@dataclass(frozen=True, slots=True)
class DeviceLine:
    """A device in the busiest or silent list."""

    device_id: str
    online: bool
    readings_per_s: float
    readings_stored: int
    quiet_s: float | None


@dataclass(frozen=True, slots=True)
class Frame:
    """Everything one screen of `hub top` shows."""

    interval_s: float
    connections: int
    accepting: bool
    influx_healthy: bool
    pending_readings: int
    received_per_s: float
    stored_per_s: float
    acks_per_s: float
    rejected_per_s: dict[str, float]
    rejected_total: dict[str, float]
    refused_per_s: dict[str, float]
    refused_total: dict[str, float]
    ack_latency: Latency
    write_latency: Latency
    influx_errors_total: dict[str, float]
    spool_bytes: float
    spool_max_bytes: float
    spool_batches: int
    spool_oldest_s: float
    spool_full: bool
    dead_letter_points: int
    workers: tuple[WorkerLine, ...] = ()
    busiest: list[DeviceLine] = field(default_factory=list)
    silent: list[DeviceLine] = field(default_factory=list)


def build_frame(
    before: Scrape | None,
    after: Scrape,
    presence_before: Mapping[str, Presence],
    presence_after: Mapping[str, Presence],
    now: float,
    *,
    silent_after_s: float = 60.0,
    lookback_s: float = 3600.0,
    top: int = 10,
) -> Frame:
    """A frame from two scrapes (`before` None: totals since the hub started) and the
    registry's presence at each; `now` is the wall-clock time of `after`."""
    interval = after.at - before.at if before is not None else 0.0

    def per_s(name: str, **labels: str) -> float:
        if before is None or interval <= 0:
            return 0.0
        return increase(before.value(name, **labels), after.value(name, **labels)) / interval

    def per_s_by(name: str, label: str) -> dict[str, float]:
        return {value: per_s(name, **{label: value}) for value in after.by_label(name, label)}

    def latency(name: str) -> Latency:
        buckets = _bucket_increase(before, after, name)
        return Latency(histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets))

    return Frame(
        interval_s=interval,
        connections=int(after.value("hub_connections")),
        accepting=after.value("hub_accepting") == 1,
        influx_healthy=after.value("hub_influx_healthy") == 1,
        pending_readings=int(after.value("hub_pending_readings")),
        received_per_s=per_s("hub_readings_received_total"),
        stored_per_s=per_s("hub_readings_stored_total"),
        acks_per_s=per_s("hub_acks_total"),
        rejected_per_s=per_s_by("hub_readings_rejected_total", "reason"),
        rejected_total=after.by_label("hub_readings_rejected_total", "reason"),
        refused_per_s=per_s_by("hub_handshakes_refused_total", "reason"),
        refused_total=after.by_label("hub_handshakes_refused_total", "reason"),
        ack_latency=latency("hub_ack_latency_seconds"),
        write_latency=latency("hub_influx_write_duration_seconds"),
        influx_errors_total=after.by_label("hub_influx_errors_total", "status"),
        spool_bytes=after.value("hub_spool_bytes"),
        spool_max_bytes=after.value("hub_spool_max_bytes"),
        spool_batches=int(after.value("hub_spool_batches")),
        spool_oldest_s=after.value("hub_spool_oldest_age_seconds"),
        spool_full=after.value("hub_spool_full") == 1,
        dead_letter_points=int(after.value("hub_dead_letter_points_total")),
        workers=after.workers,
        busiest=busiest_devices(presence_before, presence_after, interval, top),
        silent=silent_devices(presence_after.values(), now, silent_after_s, lookback_s, top),
    )


def busiest_devices(
    before: Mapping[str, Presence], after: Mapping[str, Presence], interval_s: float, top: int
) -> list[DeviceLine]:
    """The online devices that stored the most readings between the two reads, busiest
    first; by their totals when there is no interval yet."""
    lines = []
    for device_id, seen in after.items():
        if not seen.online:
            continue
        # A device without an earlier row was never seen before: all it stored is new.
        earlier = before.get(device_id)
        grown = increase(earlier.readings_stored if earlier else 0, seen.readings_stored)
        rate = grown / interval_s if interval_s > 0 else 0.0
        lines.append(DeviceLine(device_id, True, rate, seen.readings_stored, None))
    lines.sort(key=lambda d: (-d.readings_per_s, -d.readings_stored, d.device_id))
    if interval_s > 0:
        return [d for d in lines if d.readings_per_s > 0][:top]
    return [d for d in lines if d.readings_stored > 0][:top]


def silent_devices(
    presence: Iterable[Presence], now: float, silent_after_s: float, lookback_s: float, top: int
) -> list[DeviceLine]:
    """Devices last seen between `silent_after_s` and `lookback_s` ago, online (connected
    but sending nothing) or not, the longest silent first."""
    lines = []
    for seen in presence:
        if seen.last_seen is None:
            continue
        quiet = max(0.0, now - seen.last_seen)
        if silent_after_s <= quiet <= lookback_s:
            lines.append(DeviceLine(seen.device_id, seen.online, 0.0, seen.readings_stored, quiet))
    lines.sort(key=lambda d: (-(d.quiet_s or 0.0), d.device_id))
    return lines[:top]
