"""The workers' /metrics as one exposition, and their /healthz as one verdict. Pure.

Why the supervisor aggregates instead of giving each worker a port of its own: one scrape
target and one health check per host, whatever N is and across restarts, so Prometheus,
the load balancer, the dashboard and `hub top` are configured once. Nothing is summed here:
every sample keeps its worker in a `worker` label (`hub_connections{worker="2"}`), so the
dashboard can show each worker and `sum without (worker)` gives the hub. A restarted worker
starts its counters at zero, which `rate()` reads as the counter reset it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

WORKER_LABEL = "worker"
ANY_WORKER = frozenset({"hub_accepting", "hub_spool_full", "hub_spool_oldest_age_seconds"})
"""Gauges whose hub-wide value is the largest of the workers' (accepting if any worker is)."""
EVERY_WORKER = frozenset({"hub_influx_healthy"})
"""Gauges whose hub-wide value is the smallest (healthy only if every worker's writes are)."""

SampleKey = tuple[str, tuple[tuple[str, str], ...]]
"""A sample's name and its sorted labels."""


def by_worker(text: str, name: str) -> dict[str, float]:
    """Each worker's value of the sample `name` (without other labels) in the supervisor's
    exposition: `{"1": 480.0, "2": 520.0}`. Pure."""
    return {
        sample.labels[WORKER_LABEL]: float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and set(sample.labels) == {WORKER_LABEL}
    }


def fold_workers(samples: Mapping[SampleKey, float]) -> dict[SampleKey, float]:
    """The hub's samples from its workers': the `worker` label dropped, values summed
    (counters, histogram buckets, connections, sizes), or the largest or smallest for the
    gauges that say yes or no (`ANY_WORKER`, `EVERY_WORKER`). A hub without workers'
    labels comes back as it is. Pure."""
    folded: dict[SampleKey, float] = {}
    for (name, labels), value in samples.items():
        key = (name, tuple(item for item in labels if item[0] != WORKER_LABEL))
        if key not in folded:
            folded[key] = value
        elif name in ANY_WORKER:
            folded[key] = max(folded[key], value)
        elif name in EVERY_WORKER:
            folded[key] = min(folded[key], value)
        else:
            folded[key] += value
    return folded


def merge_expositions(by_worker: Mapping[str, str]) -> list[Metric]:
    """The metric families of every worker's exposition text, each sample labelled with its
    worker; families in the order first seen. A text that does not parse is left out."""
    merged: dict[str, Metric] = {}
    for worker, text in by_worker.items():
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError:
            continue
        for family in families:
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            target.samples.extend(
                Sample(s.name, {**s.labels, WORKER_LABEL: worker}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            )
    return list(merged.values())


class _Families:
    """A collector that yields fixed families once (for `generate_latest`)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def render(families: Iterable[Metric]) -> bytes:
    """The Prometheus text format of `families`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


@dataclass(frozen=True, slots=True)
class CombinedHealth:
    """The hub's verdict from its workers' /healthz answers."""

    status: int
    body: dict[str, Any]


def combine_health(by_worker: Mapping[str, Mapping[str, Any] | None]) -> CombinedHealth:
    """200 while at least one worker is healthy (the port still takes devices: the kernel
    hands connections to the workers that listen), `"status": "degraded"` when not all are;
    503 when none is. A worker that did not answer is None."""
    healthy = [w for w, body in by_worker.items() if body is not None and body.get("healthy")]
    workers: dict[str, dict[str, Any]] = {
        worker: dict(body) if body is not None else {"status": "unavailable", "healthy": False,
                                                     "reasons": ["not answering"]}
        for worker, body in by_worker.items()
    }  # fmt: skip
    if by_worker and len(healthy) == len(by_worker):
        status = "ok"
    elif healthy:
        status = "degraded"
    else:
        status = "unavailable"
    reasons = [
        f"worker {worker}: {reason}"
        for worker, body in workers.items()
        for reason in body.get("reasons", [])
    ]
    body: dict[str, Any] = {
        "status": status,
        "healthy": bool(healthy),
        "workers_healthy": len(healthy),
        "workers": workers,
        "reasons": reasons,
    }
    return CombinedHealth(200 if healthy else 503, body)
