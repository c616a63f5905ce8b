"""The single-hub scenarios (1-7), each against a fresh hub process and database."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path
from typing import Any

import aiohttp

from device_sim.bench.drive import drive, make_jobs, merged, rounded, throughput_metrics, until
from device_sim.bench.harness import hub_sample, start_hub, stored_readings
from device_sim.bench.loadgen import start_worker
from device_sim.bench.model import BenchSizes, Scenario
from device_sim.bench.procstat import sample
from device_sim.client import DeviceClient
from device_sim.device import Credentials
from device_sim.hub_process import HubProcess, provision
from device_sim.local_servers import LocalServer, create_database
from device_sim.sensors import MEASUREMENT
from device_sim.stats import LatencyHistogram
from hub.registry.sqlite import Registry
from schemas.messages import Config

CONNECT_WAIT_S = 120.0
CONFIG_POLL_S = 0.001
"""`registry_poll_s` of the second config round-trip measurement (the default is 0.2 s)."""
FLEET_PUSH_POLL_S = 0.1
"""Reading 10,000 devices' config state costs the benchmark ~30 ms: not more often."""


class Bench:
    """Runs the scenarios against one InfluxDB; a new hub process and database for each."""

    def __init__(self, influx: LocalServer, work_dir: Path, sizes: BenchSizes) -> None:
        self.influx = influx
        self.work_dir = work_dir
        self.sizes = sizes
        self.state_dir = work_dir / "hub-state"
        self.results: dict[str, Scenario] = {}
        self._databases = itertools.count(1)
        self.sim: list[Credentials] = []
        self.idle: list[Credentials] = []
        self.probe: list[Credentials] = []

    def provision(self) -> float:
        """Register every device the scenarios use; returns the seconds it took."""
        started = time.monotonic()
        sizes = self.sizes
        self.sim = provision(self.state_dir, max(sizes.devices, sizes.single_devices), "sim-")
        idle = max(sizes.idle_devices, sizes.storm_devices, sizes.spread_connections)
        self.idle = provision(self.state_dir, idle, "idle-")
        self.probe = provision(self.state_dir, 1, "probe-")
        return time.monotonic() - started

    def database(self, label: str) -> str:
        """A new InfluxDB database name for one scenario's readings (not yet created)."""
        return f"bench_{next(self._databases)}_{label}"

    def hub(self, label: str, *args: str, environment: dict[str, str] | None = None) -> HubProcess:
        """A (not yet started) `hub serve` on the bench's SQLite registry and a new database;
        `args` go to `hub serve`."""
        return start_hub(self.state_dir, self.influx, self.database(label), *args, env=environment)

    def stored(self, database: str) -> int:
        """Readings InfluxDB holds in `database`."""
        return stored_readings(self.influx, database)

    # --- 1 ---------------------------------------------------------------------------------

    async def ceiling(self) -> Scenario:
        """InfluxDB alone: 5000-line batches POSTed straight to it, a few at a time."""
        sizes = self.sizes
        database = self.database("ceiling")
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
        database = self.database("nohub")
        create_database(self.influx.url, database)
        jobs = make_jobs(
            self.sizes.workers,
            "http",
            self.influx.url,
            self.sim[: sizes.devices],
            rate=sizes.batched_rate,
            batch=sizes.batch,
            duration=sizes.duration_s,
            database=database,
        )
        load = await drive(jobs, None, self.influx.pid)
        stored = self.stored(database)
        scenario = Scenario("no_hub", "2. no hub: devices POST to InfluxDB")
        scenario.metrics = throughput_metrics(load, stored, sizes.devices, sizes.batch)
        scenario.series = load.series
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
        hub = self.hub(name)
        await hub.start()
        try:
            jobs = make_jobs(
                self.sizes.workers,
                "fleet",
                hub.url,
                self.sim[:devices],
                rate=rate,
                batch=batch,
                duration=self.sizes.duration_s,
                options={"window": window, "final_wait_s": self.sizes.final_wait_s},
            )
            load = await drive(jobs, lambda: hub_sample(hub), self.influx.pid)
        finally:
            await hub.stop()
        stored = self.stored(hub.bucket)
        scenario = Scenario(name, title)
        scenario.metrics = throughput_metrics(load, stored, devices, batch)
        scenario.metrics["offered_per_s"] = round(devices * rate * batch)
        scenario.series = load.series
        return scenario

    # --- 5, 7 ------------------------------------------------------------------------------

    async def idle_and_config(self) -> tuple[Scenario, Scenario]:
        """10,000 idle connections: RSS each; then config round trips and a fleet-wide push."""
        sizes = self.sizes
        idle = self.idle[: sizes.idle_devices]
        hub = self.hub("idle")
        await hub.start()
        try:
            await asyncio.sleep(1.0)
            before = hub_sample(hub)
            jobs = make_jobs(
                self.sizes.workers,
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
                connect_s = await until(
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
        probe = self.probe[0]
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
                    await until(
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
            "push_p50_ms": rounded(push.percentile(0.5)),
            "push_p99_ms": rounded(push.percentile(0.99)),
            "round_trip_p50_ms": rounded(round_trip.percentile(0.5)),
            "round_trip_p99_ms": rounded(round_trip.percentile(0.99)),
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

            elapsed = await until(all_acked, 60.0, FLEET_PUSH_POLL_S)
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
        devices = self.idle[: self.sizes.storm_devices]
        hub = self.hub("storm")
        await hub.start()
        try:
            jobs = make_jobs(
                self.sizes.workers,
                "fleet",
                hub.url,
                devices,
                rate=1,
                batch=1,
                duration=60,
                options={"start_spread_s": 0, "messages": 1, "final_wait_s": 30},
            )
            load = await drive(jobs, lambda: hub_sample(hub), self.influx.pid)
        finally:
            await hub.stop()
        connected = [t for f in load.finals for t in f.get("connected_at", []) if t]
        acked = [t for f in load.finals for t in f.get("first_ack_at", []) if t]
        scenario = Scenario("storm", "6. connect storm")
        scenario.metrics = {
            "devices": len(devices),
            "connected": len(connected),
            "acked": len(acked),
            "all_connected_s": rounded(max(connected) - load.started_at if connected else None),
            "all_acked_s": rounded(max(acked) - load.started_at if acked else None),
            "failed_connects": load.counters.get("failed_connects", 0),
            "connect_errors": merged(
                f.get("summary", {}).get("connect_errors", {}) for f in load.finals
            ),
            "hub_cpu_s": round(load.hub_cpu_s, 2),
            "hub_peak_rss_mib": round(load.hub_peak_rss / 2**20, 1),
        }
        scenario.series = load.series
        return scenario


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
