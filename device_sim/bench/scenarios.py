"""The benchmark's scenarios, each measured against a fresh hub process and database.

Throughput is what InfluxDB holds afterwards (`SELECT count(...)`), divided by the time from
the start of the load to the last ack; hub CPU and memory come from /proc while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from device_sim.bench.harness import hub_sample, start_hub
from device_sim.bench.loadgen import Job, Worker, start_worker
from device_sim.bench.procstat import machine_busy_s, sample
from device_sim.client import DeviceClient
from device_sim.device import Credentials
from device_sim.hub_process import HubProcess, provision
from device_sim.local_servers import LocalServer, create_database, influxql
from device_sim.sensors import MEASUREMENT
from device_sim.stats import LatencyHistogram
from hub.registry.sqlite import Registry
from schemas.messages import Config

SAMPLE_S = 0.5
WORKER_START_S = 2.0
"""Head start for worker processes to import before their devices begin together."""
CONNECT_WAIT_S = 120.0
CONFIG_POLL_S = 0.001
"""`registry_poll_s` of the second config round-trip measurement (the default is 0.2 s)."""
FLEET_PUSH_POLL_S = 0.1
"""Reading 10,000 devices' config state costs the benchmark ~30 ms: not more often."""


@dataclass(frozen=True)
class BenchSizes:
    """How big each scenario is; `smoke()` is the test suite's tiny version."""

    duration_s: float = 20.0
    workers: int = 2
    """Load generator processes."""
    devices: int = 1000
    batch: int = 50
    batched_rate: float = 5.0
    """Messages a second per device in scenario 3: more than the hub takes, so it runs flat out."""
    window: int = 1
    """Unacked messages per device: enough in flight to keep the hub's pipeline full."""
    single_devices: int = 1000
    single_rate: float = 40.0
    single_window: int = 4
    ceiling_points: int = 1_000_000
    ceiling_concurrency: int = 4
    idle_devices: int = 10_000
    idle_connect_s: float = 10.0
    """Idle devices connect spread over this many seconds."""
    storm_devices: int = 5_000
    config_round_trips: int = 100
    final_wait_s: float = 15.0

    @classmethod
    def smoke(cls) -> BenchSizes:
        """Seconds, not minutes: every scenario runs, with a handful of devices."""
        return cls(
            duration_s=1.5,
            workers=1,
            devices=8,
            batch=5,
            batched_rate=5.0,
            single_devices=8,
            single_rate=5.0,
            ceiling_points=10_000,
            idle_devices=20,
            idle_connect_s=0.5,
            storm_devices=20,
            config_round_trips=3,
            final_wait_s=5.0,
        )


@dataclass
class Scenario:
    """One scenario's figures and time series."""

    name: str
    title: str
    metrics: dict[str, Any] = field(default_factory=dict)
    series: list[dict[str, Any]] = field(default_factory=list)


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


class Bench:
    """Runs the scenarios against one InfluxDB; a new hub process and database for each."""

    def __init__(self, influx: LocalServer, work_dir: Path, sizes: BenchSizes) -> None:
        self.influx = influx
        self.work_dir = work_dir
        self.sizes = sizes
        self.state_dir = work_dir / "hub-state"
        self.results: dict[str, Scenario] = {}
        self._databases = itertools.count(1)
        self._sim: list[Credentials] = []
        self._idle: list[Credentials] = []
        self._probe: list[Credentials] = []

    def provision(self) -> float:
        """Register every device the scenarios use; returns the seconds it took."""
        started = time.monotonic()
        sizes = self.sizes
        self._sim = provision(self.state_dir, max(sizes.devices, sizes.single_devices), "sim-")
        idle = max(sizes.idle_devices, sizes.storm_devices)
        self._idle = provision(self.state_dir, idle, "idle-")
        self._probe = provision(self.state_dir, 1, "probe-")
        return time.monotonic() - started

    def _hub(self, label: str, environment: dict[str, str] | None = None) -> HubProcess:
        return start_hub(
            self.state_dir, self.influx, f"bench_{next(self._databases)}_{label}", environment
        )

    def stored(self, database: str) -> int:
        """Readings InfluxDB holds in `database`."""
        query = f'SELECT count("temperature") FROM "{MEASUREMENT}"'  # noqa: S608 (constants)
        rows = influxql(self.influx.url, database, query)
        return int(rows[0]["count"]) if rows else 0

    # --- 1 ---------------------------------------------------------------------------------

    async def ceiling(self) -> Scenario:
        """InfluxDB alone: 5000-line batches POSTed straight to it, a few at a time."""
        sizes = self.sizes
        database = f"bench_{next(self._databases)}_ceiling"
        create_database(self.influx.url, database)
        batches = await asyncio.to_thread(_ceiling_batches, sizes.ceiling_points, 5000)
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for body in batches:
            queue.put_nowait(body)
        url = f"{self.influx.url}/write?db={database}&precision=u"
        influx_before = sample(self.influx.pid).cpu_s

        async def post_all(session: aiohttp.ClientSession) -> None:
            while not queue.empty():
                body = queue.get_nowait()
                async with session.post(url, data=body) as response:
                    if response.status != 204:
                        raise RuntimeError(f"InfluxDB answered {response.status}")

        started = time.monotonic()
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(post_all(session) for _ in range(sizes.ceiling_concurrency)))
        elapsed = time.monotonic() - started
        influx_cpu = sample(self.influx.pid).cpu_s - influx_before
        stored = self.stored(database)
        scenario = Scenario("ceiling", "1. InfluxDB alone, 5000-line batches")
        scenario.metrics = {
            "points": sizes.ceiling_points,
            "stored": stored,
            "elapsed_s": round(elapsed, 3),
            "stored_per_s": round(stored / elapsed),
            "concurrency": sizes.ceiling_concurrency,
            "influxdb_cpu_s": round(influx_cpu, 2),
            "influxdb_cpu_us_per_point": round(influx_cpu / max(1, stored) * 1e6, 2),
        }
        return scenario

    # --- 2 ---------------------------------------------------------------------------------

    async def no_hub(self) -> Scenario:
        """Every device POSTs its own readings to InfluxDB over HTTP."""
        sizes = self.sizes
        database = f"bench_{next(self._databases)}_nohub"
        create_database(self.influx.url, database)
        jobs = self._jobs(
            "http",
            self.influx.url,
            self._sim[: sizes.devices],
            rate=sizes.batched_rate,
            batch=sizes.batch,
            duration=sizes.duration_s,
            database=database,
        )
        drive = await self._drive(jobs, None)
        stored = self.stored(database)
        scenario = Scenario("no_hub", "2. no hub: devices POST to InfluxDB")
        scenario.metrics = self._throughput(drive, stored, sizes.devices, sizes.batch)
        scenario.series = drive.series
        return scenario

    # --- 3, 4 ------------------------------------------------------------------------------

    async def hub_throughput(
        self,
        name: str,
        title: str,
        *,
        devices: int,
        rate: float,
        batch: int,
        window: int,
    ) -> Scenario:
        """Devices stream through a hub process; what InfluxDB holds afterwards counts."""
        hub = self._hub(name)
        await hub.start()
        try:
            jobs = self._jobs(
                "fleet",
                hub.url,
                self._sim[:devices],
                rate=rate,
                batch=batch,
                duration=self.sizes.duration_s,
                options={"window": window, "final_wait_s": self.sizes.final_wait_s},
            )
            drive = await self._drive(jobs, hub)
        finally:
            await hub.stop()
        stored = self.stored(hub.bucket)
        scenario = Scenario(name, title)
        scenario.metrics = self._throughput(drive, stored, devices, batch)
        scenario.metrics["offered_per_s"] = round(devices * rate * batch)
        scenario.series = drive.series
        return scenario

    # --- 5, 7 ------------------------------------------------------------------------------

    async def idle_and_config(self) -> tuple[Scenario, Scenario]:
        """10,000 idle connections: RSS each; then config round trips and a fleet-wide push."""
        sizes = self.sizes
        idle = self._idle[: sizes.idle_devices]
        hub = self._hub("idle")
        await hub.start()
        try:
            await asyncio.sleep(1.0)
            before = hub_sample(hub)
            jobs = self._jobs(
                "fleet",
                hub.url,
                idle,
                rate=0,
                batch=1,
                duration=3600,
                options={"start_spread_s": sizes.idle_connect_s, "final_wait_s": 1.0},
            )
            workers = [await start_worker(job) for job in jobs]
            readers = [asyncio.create_task(w.read()) for w in workers]
            try:
                connect_s = await _until(
                    lambda: sum(w.counters.get("connected", 0) for w in workers) >= len(idle),
                    CONNECT_WAIT_S,
                )
                await asyncio.sleep(2.0)  # let the last handshakes' garbage go
                after = hub_sample(hub)
                idle_scenario = Scenario("idle", "5. idle connections")
                per_connection = (after.rss_bytes - before.rss_bytes) / len(idle)
                idle_scenario.metrics = {
                    "connections": len(idle),
                    "all_connected_s": round(connect_s, 2),
                    "hub_rss_before_mib": round(before.rss_bytes / 2**20, 1),
                    "hub_rss_after_mib": round(after.rss_bytes / 2**20, 1),
                    "rss_per_connection_kib": round(per_connection / 1024, 2),
                }
                config = Scenario("config", "7. config push")
                config.metrics = await self._config_round_trips(hub)
                config.metrics.update(await self._config_fleet_push(idle))
                config.metrics["hub_peak_rss_mib"] = round(
                    hub_sample(hub).peak_rss_bytes / 2**20, 1
                )
            finally:
                for worker in workers:
                    await worker.stop()
                await asyncio.gather(*readers)
        finally:
            await hub.stop()
        return idle_scenario, config

    async def _config_round_trips(self, hub: HubProcess) -> dict[str, Any]:
        """One device: operator sets a config, the device gets it, its ack is recorded."""
        probe = self._probe[0]
        received: dict[int, float] = {}
        arrived = asyncio.Event()

        async def on_config(config: Config) -> str | None:
            received[config.version] = time.perf_counter()
            arrived.set()
            return None

        registry = Registry(self.state_dir / "registry.sqlite3")
        push, round_trip = LatencyHistogram(), LatencyHistogram()
        try:
            async with DeviceClient(hub.url, probe.token, on_config=on_config):
                await asyncio.sleep(0.5)
                for number in range(self.sizes.config_round_trips):
                    arrived.clear()
                    set_at = time.perf_counter()
                    version = registry.set_config([probe.device_id], updates={"n": number})[
                        probe.device_id
                    ]
                    await asyncio.wait_for(arrived.wait(), 10)
                    await _until(
                        lambda v=version: (
                            (  # type: ignore[misc]
                                registry.config_state(probe.device_id).acked_version or 0
                            )
                            >= v
                        ),
                        10.0,
                        CONFIG_POLL_S,
                    )
                    done_at = time.perf_counter()
                    push.add((received[version] - set_at) * 1000)
                    round_trip.add((done_at - set_at) * 1000)
                    await asyncio.sleep(random.uniform(0, 0.05))
        finally:
            registry.close()
        return {
            "round_trips": round_trip.total,
            "push_p50_ms": _round(push.percentile(0.5)),
            "push_p99_ms": _round(push.percentile(0.99)),
            "round_trip_p50_ms": _round(round_trip.percentile(0.5)),
            "round_trip_p99_ms": _round(round_trip.percentile(0.99)),
        }

    async def _config_fleet_push(self, devices: list[Credentials]) -> dict[str, Any]:
        """A new config for every connected device; seconds until all of them acked it."""
        registry = Registry(self.state_dir / "registry.sqlite3")
        ids = [d.device_id for d in devices]
        try:
            started = time.monotonic()
            versions = registry.set_config(ids, updates={"unit": "F"})
            set_s = time.monotonic() - started

            def all_acked() -> bool:
                states = registry.config_states(ids)
                return all((s.acked_version or 0) >= versions[s.device_id] for s in states)

            elapsed = await _until(all_acked, 60.0, FLEET_PUSH_POLL_S)
            acked = sum(
                (s.acked_version or 0) >= versions[s.device_id] for s in registry.config_states(ids)
            )
        finally:
            registry.close()
        return {
            "fleet_push_devices": len(ids),
            "fleet_push_acked": acked,
            "fleet_push_set_s": round(set_s, 3),
            "fleet_push_all_acked_s": round(elapsed, 3),
        }

    # --- 6 ---------------------------------------------------------------------------------

    async def connect_storm(self) -> Scenario:
        """Every device connects at the same moment and sends one reading."""
        devices = self._idle[: self.sizes.storm_devices]
        hub = self._hub("storm")
        await hub.start()
        try:
            jobs = self._jobs(
                "fleet",
                hub.url,
                devices,
                rate=1,
                batch=1,
                duration=60,
                options={"start_spread_s": 0, "messages": 1, "final_wait_s": 30},
            )
            drive = await self._drive(jobs, hub)
        finally:
            await hub.stop()
        connected = [t for f in drive.finals for t in f.get("connected_at", []) if t]
        acked = [t for f in drive.finals for t in f.get("first_ack_at", []) if t]
        scenario = Scenario("storm", "6. connect storm")
        scenario.metrics = {
            "devices": len(devices),
            "connected": len(connected),
            "acked": len(acked),
            "all_connected_s": _round(max(connected) - drive.started_at if connected else None),
            "all_acked_s": _round(max(acked) - drive.started_at if acked else None),
            "failed_connects": drive.counters.get("failed_connects", 0),
            "connect_errors": _merged(
                f.get("summary", {}).get("connect_errors", {}) for f in drive.finals
            ),
            "hub_cpu_s": round(drive.hub_cpu_s, 2),
            "hub_peak_rss_mib": round(drive.hub_peak_rss / 2**20, 1),
        }
        scenario.series = drive.series
        return scenario

    # --- Driving load ----------------------------------------------------------------------

    def _jobs(
        self,
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
        count = max(1, min(self.sizes.workers, len(devices)))
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

    async def _drive(self, jobs: list[Job], hub: HubProcess | None) -> Drive:
        """Run the jobs in worker processes; sample the hub and the workers as they go."""
        workers = [await start_worker(job) for job in jobs]
        readers = [asyncio.create_task(w.read()) for w in workers]
        started_at = jobs[0].start_at
        await asyncio.sleep(max(0.0, started_at - time.time()))
        hub_before = hub_sample(hub) if hub else None
        influx_before = sample(self.influx.pid).cpu_s
        busy_before, total_before = machine_busy_s()
        devices = sum(len(job.credentials) for job in jobs)
        steady = LatencyHistogram()
        series = await _sample_until_done(workers, readers, hub, started_at, devices, steady)
        hub_after = hub_sample(hub) if hub else None
        influx_cpu = sample(self.influx.pid).cpu_s - influx_before
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

    def _throughput(self, drive: Drive, stored: int, devices: int, batch: int) -> dict[str, Any]:
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
            "ack_latency_p50_ms": _round(drive.latency.percentile(0.5)),
            "ack_latency_p99_ms": _round(drive.latency.percentile(0.99)),
            "ack_latency_steady_p50_ms": _round(drive.steady_latency.percentile(0.5)),
            "ack_latency_steady_p99_ms": _round(drive.steady_latency.percentile(0.99)),
            "loadgen_cpu_s": round(drive.loadgen_cpu_s, 2),
            "influxdb_cpu_s": round(drive.influx_cpu_s, 2),
            "machine_busy_pct": round(
                drive.machine_busy_s / max(1e-9, drive.machine_total_s) * 100
            ),
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
    hub: HubProcess | None,
    started_at: float,
    devices: int,
    steady: LatencyHistogram,
) -> list[dict[str, Any]]:
    """Sample every `SAMPLE_S` until the workers exit; `steady` gets the latencies of the
    samples taken while all `devices` were connected."""
    series: list[dict[str, Any]] = []
    last_at, last_acked = time.time(), 0
    last_cpu = hub_sample(hub).cpu_s if hub else 0.0
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
            "ack_p50_ms": _round(latency.percentile(0.5)),
            "ack_p99_ms": _round(latency.percentile(0.99)),
        }
        if hub is not None:
            with contextlib.suppress(OSError):
                now_sample = hub_sample(hub)
                point["hub_cpu_s"] = now_sample.cpu_s
                point["hub_cpu_pct"] = round((now_sample.cpu_s - last_cpu) / (now - last_at) * 100)
                point["hub_rss_mib"] = round(now_sample.rss_bytes / 2**20, 1)
                last_cpu = now_sample.cpu_s
        series.append(point)
        last_at, last_acked = now, acked
    for reader in readers:
        reader.result()  # a worker's crash is the benchmark's failure
    return series


async def _until(check: Callable[[], bool], limit_s: float, poll_s: float = 0.1) -> float:
    """Seconds until `check()` holds, polling state another process changes; at most `limit_s`."""
    started = time.monotonic()
    async with asyncio.timeout(limit_s):
        while not check():  # noqa: ASYNC110 (the state is in the hub's process or in SQLite)
            await asyncio.sleep(poll_s)
    return time.monotonic() - started


def _merged(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in counts:
        for key, value in one.items():
            total[key] = total.get(key, 0) + value
    return total


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _ceiling_batches(points: int, batch: int) -> list[bytes]:
    """Line protocol like the simulator's readings: 1000 devices, unique times per device."""
    rng = random.Random(1)
    base_us = time.time_ns() // 1000 - 3600 * 10**6
    bodies = []
    for start in range(0, points, batch):
        lines = []
        for number in range(start, min(points, start + batch)):
            device = number % 1000
            lines.append(
                f"{MEASUREMENT},device=ceil-{device:05d},room=room-{device % 40} "
                f"temperature={20 + rng.random():.3f},humidity={45 + rng.random():.2f},"
                f"pressure={1000 + rng.random():.2f},battery={3.9 + rng.random() / 10:.3f} "
                f"{base_us + number // 1000}"
            )
        bodies.append("\n".join(lines).encode())
    return bodies


def as_json(scenario: Scenario) -> dict[str, Any]:
    """A scenario as JSON-friendly data."""
    return asdict(scenario)
