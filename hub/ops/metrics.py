"""Every Prometheus metric of the hub, defined once, in a registry of its own per hub.

Events are counted where they happen, once per message or batch (never per reading):
`metrics.config_pushes.inc()`; the counts every message changes are plain integers in
`metrics.traffic`, exported at scrape time. State that objects already keep (open connections,
pending readings, the pipeline's counters, the spool) is read at scrape time by
`StateCollector`, so it costs nothing on the hot path.

Label values are a small fixed set each:

* `hub_handshakes_refused_total{reason}`: the HTTP answer, `unauthorized`, `bad_request`,
  `not_found`, `forbidden`, `too_many_requests` (a blocked address),
  `service_unavailable` (draining or at `max_connections`), ...;
* `hub_unauthenticated_dropped_total{reason}`: connections dropped before their handshake
  was answered, `source_cap`, `header_timeout`, `headers_too_large`, `handshake_error`,
  `proxy_header` (a balancer in `proxy_protocol_from` sent no valid PROXY header);
* `hub_readings_rejected_total{reason}`: the part of a reading that broke its schema,
  `name`, `fields`, `tags`, `time`, or `unknown_measurement`, `undecodable` (a Telegraf
  metric cut short), `invalid` (anything else, such as text InfluxDB cannot store);
* `hub_protocol_errors_total{error}`: why a connection was closed, `invalid_message`,
  `unsupported_data`, `rate_limited`;
* `hub_influx_errors_total{status}`: the HTTP status, or `unreachable`, or `timeout`;
* `hub_config_acks_total{result}`: `applied`, `refused`, `ignored` (stale or repeated);
* `hub_takeovers_total{direction}`: a device's one live connection moving between hubs (or
  workers): `won`, a handshake here claimed it from another node; `lost`, a session here
  was closed (4000) because another node claimed its device.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from hub.core.fieldtypes import CONFLICT_MARK
from hub.core.measurements import RESERVED_REASON
from hub.ingest.stats import TIMEOUT, UNREACHABLE, Distribution, WriteStats
from hub.ops.views import HubView

ACK_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SCHEMA_PARTS = frozenset({"name", "fields", "tags", "time"})
# Label values shown at 0 from the start, so that rates and alerts work before the first one.
_KNOWN_LABELS = {
    "handshakes_refused": (
        "unauthorized",
        "bad_request",
        "not_found",
        "forbidden",
        "too_many_requests",
        "service_unavailable",
    ),
    "readings_rejected": (
        *sorted(_SCHEMA_PARTS),
        "unknown_measurement",
        "field_type_conflict",
        "reserved_measurement",
        "undecodable",
        "invalid",
    ),
    "protocol_errors": ("invalid_message", "unsupported_data", "rate_limited"),
    "config_acks": ("applied", "refused", "ignored"),
    "takeovers": ("won", "lost"),
}
_KNOWN_INFLUX_ERRORS = (UNREACHABLE, TIMEOUT)


class HubMetrics:
    """The metrics of one hub; `registry` is what `/metrics` serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Devices
        self.connections_opened = Counter(
            "hub_connections_opened", "Device connections accepted.", registry=r
        )
        self.handshakes_refused = Counter(
            "hub_handshakes_refused",
            "Handshakes answered without an upgrade.",
            ["reason"],
            registry=r,
        )
        self.protocol_errors = Counter(
            "hub_protocol_errors",
            "Connections closed for breaking the protocol.",
            ["error"],
            registry=r,
        )
        # Readings: received, stored and acks are counted per message, in `traffic`.
        self.traffic = TrafficCounts()
        r.register(TrafficCollector(self.traffic))
        self.ack_seconds = Histogram(
            "hub_ack_latency_seconds",
            "From a readings message's arrival until its readings are durable (its ack goes).",
            buckets=ACK_SECONDS_BUCKETS,
            registry=r,
        )
        self.readings_rejected = Counter(
            "hub_readings_rejected",
            "Readings rejected, by the part that was wrong.",
            ["reason"],
            registry=r,
        )
        self.admitted_from_memory = Counter(
            "hub_admitted_from_memory",
            "Handshakes let in while the registry was unavailable, on a token verified within "
            "registry_outage_admit_s.",
            registry=r,
        )
        self.takeovers = Counter(
            "hub_takeovers",
            "Devices' live connections moved between nodes: claimed here from another (won), "
            "or closed here because another claimed the device (lost).",
            ["direction"],
            registry=r,
        )
        # Configuration pushed to devices
        self.config_pushes = Counter("hub_config_pushes", "Configs sent to devices.", registry=r)
        self.config_acks = Counter(
            "hub_config_acks", "Devices' answers to pushed configs.", ["result"], registry=r
        )
        # InfluxDB: counted by the pipeline (`hub.ingest.stats`), read by `watch_writes`.
        for attribute, values in _KNOWN_LABELS.items():
            counter: Counter = getattr(self, attribute)
            for label in values:
                counter.labels(label)

    def watch(self, hub: HubView) -> None:
        """Expose the state of `hub` and its pipeline and spool, read at scrape time."""
        self.registry.register(StateCollector(hub))

    def watch_writes(self, stats: WriteStats) -> None:
        """Expose the pipeline's write stats (errors, durations, batch sizes) at scrape time."""
        self.registry.register(WriteStatsCollector(stats))

    def count_rejections(self, reasons: Iterable[list[str]], undecodable: int = 0) -> None:
        """Count rejected readings by reason, given each one's reasons (one call per message,
        or per slice of a large one)."""
        tally = Tally(rejection_reason(errors) for errors in reasons)
        if undecodable:
            tally["undecodable"] += undecodable
        for reason, count in tally.items():
            self.readings_rejected.labels(reason).inc(count)

    def time_ack(self, durable: asyncio.Future[None], arrival_ns: int) -> None:
        """Observe the ack latency of a message once `durable` (its readings stored) is done."""

        def observe(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and done.exception() is None:
                self.ack_seconds.observe(max(0, time.time_ns() - arrival_ns) / 1e9)

        durable.add_done_callback(observe)


def refusal_reason(status: int) -> str:
    """The label of a refused handshake: its HTTP reason phrase, in snake case."""
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return str(status)


def rejection_reason(errors: list[str]) -> str:
    """The label of a rejected reading, from the first of its reasons."""
    first = errors[0] if errors else ""
    if first.startswith("no schema for measurement"):
        return "unknown_measurement"
    if CONFLICT_MARK in first:
        return "field_type_conflict"
    if first == RESERVED_REASON:
        return "reserved_measurement"
    part = first.split(":", 1)[0].split(".", 1)[0] if ":" in first else ""
    return part if part in _SCHEMA_PARTS else "invalid"


def error_label(exc: Exception) -> str:
    """`RateLimited` -> `rate_limited`."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


@dataclass(slots=True)
class TrafficCounts:
    """What every message adds to: plain integers, since a prometheus_client `Counter`
    takes a lock on each `inc`, and these change several times per message."""

    readings_received: int = 0
    readings_stored: int = 0
    acks: int = 0


class TrafficCollector(Collector):
    """`TrafficCounts` as counters, read at scrape time."""

    def __init__(self, traffic: TrafficCounts) -> None:
        self._traffic = traffic

    def collect(self) -> Iterator[Metric]:
        t = self._traffic
        yield _counter(
            "hub_readings_received", "Readings received from devices.", t.readings_received
        )
        yield _counter(
            "hub_readings_stored",
            "Readings made durable (InfluxDB or the spool).",
            t.readings_stored,
        )
        yield _counter("hub_acks", "Acks sent to devices.", t.acks)


class WriteStatsCollector(Collector):
    """The pipeline's `WriteStats` as the InfluxDB write metrics, read at scrape time."""

    def __init__(self, stats: WriteStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        yield _histogram(
            "hub_batch_points", "Points per batch written to InfluxDB.", stats.batch_points
        )
        yield _histogram(
            "hub_influx_write_duration_seconds",
            "Time InfluxDB took to answer a write.",
            stats.write_seconds,
        )
        errors = CounterMetricFamily(
            "hub_influx_errors", "Failed writes to InfluxDB, by HTTP status.", labels=["status"]
        )
        for status in sorted({*_KNOWN_INFLUX_ERRORS, *stats.errors}):
            errors.add_metric([status], float(stats.errors[status]))
        yield errors


class StateCollector(Collector):
    """Connections, pipeline counters and the spool, read from the live objects."""

    def __init__(self, hub: HubView) -> None:
        self._hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self._hub
        pipeline = hub.pipeline
        yield _gauge("hub_connections", "Open device connections.", hub.connections)
        failed = hub.failed_handshakes.counters
        yield _counter(
            "hub_handshake_failures", "Handshakes with a bad or missing token.", failed.failures
        )
        yield _counter(
            "hub_handshake_blocks", "Source addresses blocked for failed handshakes.", failed.blocks
        )
        yield _counter(
            "hub_handshakes_refused_while_blocked",
            "Handshakes answered 429 because their address is blocked.",
            failed.refused_while_blocked,
        )
        strangers = hub.stranger_counts
        yield _gauge(
            "hub_unauthenticated_connections",
            "Connections still sending their request headers.",
            len(hub.strangers.limits),
        )
        dropped = CounterMetricFamily(
            "hub_unauthenticated_dropped",
            "Connections dropped before their handshake was answered, by why.",
            labels=["reason"],
        )
        for reason, count in (
            ("source_cap", strangers.over_source_cap),
            ("header_timeout", strangers.header_timeouts),
            ("headers_too_large", strangers.headers_too_large),
            ("handshake_error", strangers.handshake_errors),
            ("proxy_header", strangers.proxy_header_errors),
        ):
            dropped.add_metric([reason], float(count))
        yield dropped
        yield _counter(
            "hub_unauthenticated_log_lines_suppressed",
            "Log lines about unauthenticated clients left out (rate limit).",
            strangers.log_lines_suppressed,
        )
        yield _gauge("hub_accepting", "1 while new devices are let in.", hub.accepting)
        registry = hub.registry_health
        yield _gauge("hub_registry_up", "1 while the registry answers.", registry.up)
        yield _counter(
            "hub_registry_failures",
            "Registry calls that failed (unreachable, frozen, locked).",
            registry.failures,
        )
        yield _gauge("hub_pending_readings", "Readings not yet durable.", pipeline.pending)
        yield _gauge("hub_influx_healthy", "1 while writes to InfluxDB succeed.", pipeline.healthy)
        c = pipeline.counters
        yield _counter("hub_points_written", "Points written to InfluxDB.", c.points_written)
        yield _counter("hub_batches_written", "Batches written to InfluxDB.", c.batches_written)
        yield _counter("hub_points_spooled", "Points written to the spool.", c.points_spooled)
        yield _counter("hub_points_replayed", "Spooled points written on.", c.points_replayed)
        yield _counter("hub_write_retries", "Batch writes retried.", c.retries)
        yield _counter(
            "hub_dead_letter_points", "Points InfluxDB refused for good.", c.dead_lettered_points
        )
        dead = pipeline.dead_letters.status()
        yield _gauge("hub_dead_letter_bytes", "Bytes in the dead-letter files.", dead.size)
        yield _gauge("hub_dead_letter_max_bytes", "The dead letters' size limit.", dead.max_bytes)
        yield _counter(
            "hub_dead_letter_discarded_points",
            "Refused points deleted from full dead-letter files, or never written to them.",
            pipeline.dead_letters.discarded_points,
        )
        spool = pipeline.spool
        if spool is None:
            return
        # Read without the pipeline's lock: a scrape during an append may be one batch off.
        status = spool.status()
        yield _gauge("hub_spool_bytes", "Bytes in the spool.", status.bytes)
        yield _gauge("hub_spool_max_bytes", "The spool's size limit.", spool.max_bytes)
        yield _gauge("hub_spool_segments", "Spool segment files.", status.segments)
        yield _gauge("hub_spool_batches", "Batches waiting in the spool.", status.batches)
        yield _gauge("hub_spool_points", "Points waiting in the spool.", status.points)
        age = 0.0 if status.oldest is None else max(0.0, time.time() - status.oldest)
        yield _gauge("hub_spool_oldest_age_seconds", "Age of the oldest spooled batch.", age)
        yield _gauge("hub_spool_full", "1 while the spool refuses batches.", pipeline.spool_full)
        yield _counter(
            "hub_spool_skipped_bytes", "Damaged spool bytes skipped at start.", status.skipped_bytes
        )


def _histogram(name: str, documentation: str, values: Distribution) -> HistogramMetricFamily:
    # Bucket labels spelled as prometheus_client's own Histogram spells these ("1.0", "+Inf").
    buckets = [
        ("+Inf" if bound == float("inf") else repr(float(bound)), float(count))
        for bound, count in values.cumulative()
    ]
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=values.total)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=float(value))
