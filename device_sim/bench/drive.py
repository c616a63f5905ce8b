"""Driving load: load generator jobs, the run sampled as it goes, and its throughput figures.

Throughput is what InfluxDB holds afterwards (`SELECT count(...)`), divided by the time from
the first ack to the last; hub CPU and memory come from /proc while it runs, through a
`Meter`: one hub process, a supervisor and its workers, or several hubs summed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from device_sim.bench.loadgen import Job, Worker, start_worker
from device_sim.bench.procstat import ProcessSample, machine_busy_s, sample
from device_sim.device import Credentials
from device_sim.stats import LatencyHistogram

SAMPLE_S = 0.5
WORKER_START_S = 2.0
"""Head start for worker processes to import before their devices begin together."""

Meter = Callable[[], ProcessSample]
"""The hub's CPU and memory now: one process, or several summed."""


@dataclass
class Drive:
    """What the load generators and the hub did during one run."""

    started_at: float
    first_ack_at: float
    last_ack_at: float
    counters: dict[str, int]
    latency: LatencyHistogram
    steady_latency: LatencyHistogram
    """Latencies while every device was connected: without the connection ramp."""
    finals: list[dict[str, Any]]
    loadgen_cpu_s: float
    hub_cpu_s: float
    hub_peak_rss: int
    influx_cpu_s: float
    machine_busy_s: float
    """Busy CPU seconds of the whole machine (all CPUs) while the load ran."""
    machine_total_s: float
    series: list[dict[str, Any]]


def make_jobs(
    processes: int,
    kind: str,
    url: str,
    devices: list[Credentials],
    *,
    rate: float,
    batch: int,
    duration: float,
    options: dict[str, Any] | None = None,
    database: str = "",
) -> list[Job]:
    """The devices dealt over `processes` load generator jobs that start together."""
    count = max(1, min(processes, len(devices)))
    start_at = time.time() + WORKER_START_S
    return [
        Job(
            kind=kind,
            url=url,
            credentials=[(d.device_id, d.token) for d in devices[n::count]],
            rate=rate,
            batch=batch,
            duration=duration,
            start_at=start_at,
            options=options or {},
            database=database,
        )
        for n in range(count)
    ]


async def drive(jobs: list[Job], meter: Meter | None, influx_pid: int) -> Drive:
    """Run the jobs in worker processes; sample the hub and the workers as they go."""
    workers = [await start_worker(job) for job in jobs]
    readers = [asyncio.create_task(w.read()) for w in workers]
    started_at = jobs[0].start_at
    await asyncio.sleep(max(0.0, started_at - time.time()))
    hub_before = meter() if meter else None
    influx_before = sample(influx_pid).cpu_s
    busy_before, total_before = machine_busy_s()
    devices = sum(len(job.credentials) for job in jobs)
    steady = LatencyHistogram()
    series = await _sample_until_done(workers, readers, meter, started_at, devices, steady)
    hub_after = meter() if meter else None
    influx_cpu = sample(influx_pid).cpu_s - influx_before
    busy_after, total_after = machine_busy_s()
    counters: dict[str, int] = {}
    latency = LatencyHistogram()
    for worker in workers:
        for key, value in worker.counters.items():
            counters[key] = counters.get(key, 0) + value
        latency.merge(worker.latency_total)
    return Drive(
        started_at=started_at,
        first_ack_at=min((w.first_ack_at for w in workers if w.first_ack_at), default=0.0),
        last_ack_at=max(w.last_ack_at for w in workers),
        counters=counters,
        latency=latency,
        steady_latency=steady,
        finals=[w.final or {} for w in workers],
        loadgen_cpu_s=sum(w.cpu_s for w in workers),
        hub_cpu_s=hub_after.cpu_s - hub_before.cpu_s if hub_after and hub_before else 0.0,
        hub_peak_rss=hub_after.peak_rss_bytes if hub_after else 0,
        influx_cpu_s=influx_cpu,
        machine_busy_s=busy_after - busy_before,
        machine_total_s=total_after - total_before,
        series=series,
    )


def throughput_metrics(drive: Drive, stored: int, devices: int, batch: int) -> dict[str, Any]:
    """Readings stored per second, ack latencies, and where the machine's CPU went."""
    # From the first ack to the last: worker start-up before it is not throughput.
    elapsed = max(1e-9, drive.last_ack_at - drive.first_ack_at)
    metrics: dict[str, Any] = {
        "devices": devices,
        "batch": batch,
        "sent": drive.counters.get("sent", 0),
        "acked": drive.counters.get("acked", 0),
        "stored": stored,
        "elapsed_s": round(elapsed, 2),
        "stored_per_s": round(stored / elapsed),
        "ack_latency_p50_ms": rounded(drive.latency.percentile(0.5)),
        "ack_latency_p99_ms": rounded(drive.latency.percentile(0.99)),
        "ack_latency_steady_p50_ms": rounded(drive.steady_latency.percentile(0.5)),
        "ack_latency_steady_p99_ms": rounded(drive.steady_latency.percentile(0.99)),
        "loadgen_cpu_s": round(drive.loadgen_cpu_s, 2),
        "influxdb_cpu_s": round(drive.influx_cpu_s, 2),
        "machine_busy_pct": round(drive.machine_busy_s / max(1e-9, drive.machine_total_s) * 100),
        # What the machine spent on anything but the hub, InfluxDB and the load generators.
        "other_cpu_s": round(
            drive.machine_busy_s - drive.hub_cpu_s - drive.influx_cpu_s - drive.loadgen_cpu_s,
            2,
        ),
    }
    if drive.hub_cpu_s:
        # CPU microseconds per reading = CPU seconds per million readings.
        whole_run = round(drive.hub_cpu_s / max(1, stored) * 1e6, 2)
        steady = _steady_cpu_per_reading(drive.series, devices)
        metrics.update(
            hub_cpu_s=round(drive.hub_cpu_s, 2),
            hub_cpu_us_per_reading_whole_run=whole_run,
            # A run too short for a steady window (a smoke run) reports the whole run.
            hub_cpu_us_per_reading=whole_run if steady is None else steady,
            # Which one that is: a device that reconnected leaves no window with all in.
            hub_cpu_window="whole_run" if steady is None else "steady",
            hub_peak_rss_mib=round(drive.hub_peak_rss / 2**20, 1),
        )
    return metrics


def _steady_cpu_per_reading(series: list[dict[str, Any]], devices: int) -> float | None:
    """Hub CPU µs per acked reading while every device was connected and sending.

    Leaves out the connection ramp (handshakes) and the final drain, which a run of a few
    seconds would otherwise weigh far more than a hub running for days does.
    """
    steady = [p for p in series if p.get("connected") == devices and "hub_cpu_s" in p]
    if len(steady) < 2 or steady[-1]["acked"] == steady[0]["acked"]:
        return None
    cpu: float = steady[-1]["hub_cpu_s"] - steady[0]["hub_cpu_s"]
    acked: int = steady[-1]["acked"] - steady[0]["acked"]
    return round(cpu / acked * 1e6, 2)


async def _sample_until_done(
    workers: list[Worker],
    readers: list[asyncio.Task[None]],
    meter: Meter | None,
    started_at: float,
    devices: int,
    steady: LatencyHistogram,
) -> list[dict[str, Any]]:
    """Sample every `SAMPLE_S` until the workers exit; `steady` gets the latencies of the
    samples taken while all `devices` were connected."""
    series: list[dict[str, Any]] = []
    last_at, last_acked = time.time(), 0
    last_cpu = meter().cpu_s if meter else 0.0
    while not all(reader.done() for reader in readers):
        await asyncio.wait(readers, timeout=SAMPLE_S)
        now = time.time()
        acked = sum(w.counters.get("acked", 0) for w in workers)
        latency = LatencyHistogram()
        for worker in workers:
            latency.merge(worker.take_latency())
        connected = sum(w.counters.get("connected", 0) for w in workers)
        if connected == devices:
            steady.merge(latency)
        point: dict[str, Any] = {
            "t": round(now - started_at, 2),
            "acked": acked,
            "acked_per_s": round((acked - last_acked) / max(1e-9, now - last_at)),
            "connected": connected,
            "ack_p50_ms": rounded(latency.percentile(0.5)),
            "ack_p99_ms": rounded(latency.percentile(0.99)),
        }
        if meter is not None:
            with contextlib.suppress(OSError):
                now_sample = meter()
                point["hub_cpu_s"] = now_sample.cpu_s
                point["hub_cpu_pct"] = round((now_sample.cpu_s - last_cpu) / (now - last_at) * 100)
                point["hub_rss_mib"] = round(now_sample.rss_bytes / 2**20, 1)
                last_cpu = now_sample.cpu_s
        series.append(point)
        last_at, last_acked = now, acked
    for reader in readers:
        reader.result()  # a worker's crash is the benchmark's failure
    return series


async def until(check: Callable[[], bool], limit_s: float, poll_s: float = 0.1) -> float:
    """Seconds until `check()` holds, polling state another process changes; at most `limit_s`."""
    started = time.monotonic()
    async with asyncio.timeout(limit_s):
        while not check():  # noqa: ASYNC110 (the state is in the hub's process or in SQLite)
            await asyncio.sleep(poll_s)
    return time.monotonic() - started


def percentile(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of `values` (None when empty). For small samples whose
    values may be negative, where `LatencyHistogram`'s log buckets do not apply."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def merged(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Counters of several load generators added up, key by key."""
    total: dict[str, int] = {}
    for one in counts:
        for key, value in one.items():
            total[key] = total.get(key, 0) + value
    return total


def rounded(value: float | None) -> float | None:
    """Two decimals, or None."""
    return None if value is None else round(value, 2)
