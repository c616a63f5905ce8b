"""The workers' /metrics merged with a `worker` label, their /healthz combined
(hub.workers.exposition), and the notifications they send (hub.workers.relay)."""

from __future__ import annotations

import os

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hub.ops.sdnotify import Notifier
from hub.workers.exposition import (
    SampleKey,
    by_worker,
    combine_health,
    fold_workers,
    merge_expositions,
    render,
)
from hub.workers.relay import NotifyRelay, parse_notification

pytestmark = pytest.mark.unit


def exposition(connections: int, refused: int) -> str:
    """What one worker's /metrics could say."""
    registry = CollectorRegistry()
    Gauge("hub_connections", "open", registry=registry).set(connections)
    Counter("hub_handshakes_refused", "refused", ["reason"], registry=registry).labels(
        "unauthorized"
    ).inc(refused)
    Histogram("hub_ack_latency_seconds", "ack", registry=registry, buckets=(0.1, 1)).observe(0.5)
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_sample_keeps_its_worker_in_a_label() -> None:
    """Two workers' expositions become one that parses back, each sample once per worker,
    with the worker's label beside its own."""
    merged = render(merge_expositions({"1": exposition(3, 1), "2": exposition(5, 2)})).decode()
    found = samples(merged)
    assert found[("hub_connections", (("worker", "1"),))] == 3
    assert found[("hub_connections", (("worker", "2"),))] == 5
    refused = (("reason", "unauthorized"), ("worker", "2"))
    assert found[("hub_handshakes_refused_total", refused)] == 2
    bucket = (("le", "1.0"), ("worker", "1"))
    assert found[("hub_ack_latency_seconds_bucket", bucket)] == 1
    assert merged.count("# TYPE hub_connections gauge") == 1


def test_a_worker_answer_that_does_not_parse_is_left_out() -> None:
    """One broken answer does not cost the others."""
    merged = render(merge_expositions({"1": "this is { not prometheus", "2": exposition(4, 0)}))
    found = samples(merged.decode())
    assert ("hub_connections", (("worker", "2"),)) in found
    assert not any(dict(labels).get("worker") == "1" for _, labels in found)


def healthy(ok: bool) -> dict[str, object]:
    """A worker's /healthz body."""
    return {"status": "ok" if ok else "unavailable", "healthy": ok,
            "reasons": [] if ok else ["shutting down: refusing new devices"]}  # fmt: skip


def test_health_is_ok_when_every_worker_is() -> None:
    """200, status ok."""
    combined = combine_health({"1": healthy(True), "2": healthy(True)})
    assert (combined.status, combined.body["status"]) == (200, "ok")
    assert combined.body["workers_healthy"] == 2


def test_health_is_degraded_but_200_while_one_worker_takes_devices() -> None:
    """The port still takes devices; the reasons name the worker that does not."""
    combined = combine_health({"1": healthy(False), "2": healthy(True)})
    assert (combined.status, combined.body["status"]) == (200, "degraded")
    assert combined.body["reasons"] == ["worker 1: shutting down: refusing new devices"]


def test_health_is_503_when_no_worker_answers_healthy() -> None:
    """A worker that does not answer counts as unavailable."""
    combined = combine_health({"1": None, "2": healthy(False)})
    assert (combined.status, combined.body["status"]) == (503, "unavailable")
    assert combined.body["workers"]["1"]["reasons"] == ["not answering"]
    assert combine_health({}).status == 503


def test_a_notification_is_its_assignments() -> None:
    """KEY=VALUE lines; a line without `=` is ignored."""
    assert parse_notification(b"READY=1\nSTATUS=listening on x\nnoise\nHUB_HEALTH_PORT=9") == {
        "READY": "1", "STATUS": "listening on x", "HUB_HEALTH_PORT": "9",
    }  # fmt: skip


def test_the_relay_hears_its_process_and_nobody_else() -> None:
    """A datagram from the expected pid reaches the callback; with another pid expected,
    the same datagram is dropped (the sender's credentials, not its word)."""
    heard: list[dict[str, str]] = []
    relay = NotifyRelay(1, heard.append)
    notifier = Notifier({"NOTIFY_SOCKET": relay.address})
    try:
        relay.expected_pid = os.getpid() + 1
        notifier.ready("ignored")
        relay.read_pending()  # a local datagram is queued by the time sendto returns
        relay.expected_pid = os.getpid()
        notifier.ready("listening", "HUB_HEALTH_PORT=1234")
        relay.read_pending()
    finally:
        notifier.close()
        relay.close()
    assert heard == [{"READY": "1", "STATUS": "listening", "HUB_HEALTH_PORT": "1234"}]


def test_hub_top_reads_a_hub_of_workers_as_one() -> None:
    """The worker label folded away: counts and sizes summed, accepting if any worker is,
    InfluxDB healthy only if every worker's writes are; a single hub stays as it is."""
    samples = {
        ("hub_connections", (("worker", "1"),)): 3.0,
        ("hub_connections", (("worker", "2"),)): 5.0,
        ("hub_handshakes_refused_total", (("reason", "x"), ("worker", "1"))): 1.0,
        ("hub_handshakes_refused_total", (("reason", "x"), ("worker", "2"))): 2.0,
        ("hub_accepting", (("worker", "1"),)): 0.0,
        ("hub_accepting", (("worker", "2"),)): 1.0,
        ("hub_influx_healthy", (("worker", "1"),)): 1.0,
        ("hub_influx_healthy", (("worker", "2"),)): 0.0,
    }
    assert fold_workers(samples) == {
        ("hub_connections", ()): 8.0,
        ("hub_handshakes_refused_total", (("reason", "x"),)): 3.0,
        ("hub_accepting", ()): 1.0,
        ("hub_influx_healthy", ()): 0.0,
    }
    single: dict[SampleKey, float] = {("hub_connections", ()): 4.0}
    assert fold_workers(single) == single


def test_each_workers_value_of_a_sample() -> None:
    """by_worker reads one sample per worker from the supervisor's exposition."""
    text = render(merge_expositions({"1": exposition(3, 0), "2": exposition(7, 0)})).decode()
    assert by_worker(text, "hub_connections") == {"1": 3.0, "2": 7.0}
    assert by_worker(text, "hub_missing") == {}
