"""Scenario 8: `hub serve --workers N` on one port.

How evenly connections spread over the workers (`spread_connections` opened at once and held,
counted per worker from the supervisor's aggregated /metrics), both ways the workers can
share the port:

- `reuseport`: each worker binds the port with SO_REUSEPORT (`hub serve` without systemd);
- `shared`: one listening socket handed to the hub as systemd's `hub.socket` does
  (`LISTEN_FDS`), which the supervisor passes on to every worker;

then the batched load of scenario 3 through the SO_REUSEPORT hub: readings stored per second
and the hub's CPU per reading, the supervisor's and every worker's together (from /proc).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from typing import Any

from device_sim.bench.drive import drive, make_jobs, rounded, throughput_metrics, until
from device_sim.bench.harness import hub_sample
from device_sim.bench.loadgen import start_worker
from device_sim.bench.model import Scenario
from device_sim.bench.scenarios import CONNECT_WAIT_S, Bench
from device_sim.hub_process import HubProcess
from device_sim.local_servers import free_port, http_request
from hub.workers.exposition import by_worker

READY_S = 60.0
AS_SYSTEMD_DOES = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""
"""Run as `python -c AS_SYSTEMD_DOES FD ARGV...`: the socket at fd 3 and LISTEN_PID the
hub's own pid, as systemd starts a socket-activated unit."""


class SocketActivatedHub:
    """Starts a `HubProcess` the way systemd starts `hub.service` with `hub.socket`: the
    listening socket made here, passed as fd 3 with `LISTEN_FDS`."""

    def __init__(self, hub: HubProcess) -> None:
        self.hub = hub
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", hub.port))
        self.listener.listen(4096)
        fd = self.listener.fileno()
        hub.argv = [sys.executable, "-c", AS_SYSTEMD_DOES, str(fd), *hub.argv]
        hub.env = {**(hub.env or {}), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "devices"}

    def launch(self) -> None:
        """Start the hub with the socket inherited (HubProcess.launch closes every fd)."""
        with self.hub.log_path.open("ab") as output:
            self.hub.process = subprocess.Popen(
                self.hub.argv,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=self.hub.env,
                pass_fds=(self.listener.fileno(),),
            )

    def close(self) -> None:
        """Close the benchmark's copy of the socket (after the hub stopped)."""
        self.listener.close()


def worker_connections(health_port: int) -> dict[str, float]:
    """Each worker's open connections, from the supervisor's /metrics."""
    _, body = http_request(f"http://127.0.0.1:{health_port}/metrics", timeout=5)
    return by_worker(body.decode(), "hub_connections")


async def wait_all_workers(hub: HubProcess, health_port: int, workers: int) -> None:
    """Until /healthz answers 200 and every worker reports in /metrics (bounded)."""
    deadline = time.monotonic() + READY_S
    while True:
        if hub.process is not None and hub.process.poll() is not None:
            raise RuntimeError(f"the hub exited:\n{hub.log[-3000:]}")
        try:
            status, _ = await asyncio.to_thread(
                http_request, f"http://127.0.0.1:{health_port}/healthz", timeout=2
            )
            reporting = await asyncio.to_thread(worker_connections, health_port)
            if status == 200 and len(reporting) == workers:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"not every worker listens after {READY_S:.0f} s:\n{hub.log}")
        await asyncio.sleep(0.1)


async def spread(bench: Bench, hub: HubProcess, health_port: int) -> dict[str, float]:
    """`spread_connections` devices connect at once and stay; the connections per worker."""
    devices = bench.idle[: bench.sizes.spread_connections]
    jobs = make_jobs(
        bench.sizes.workers,
        "fleet",
        hub.url,
        devices,
        rate=0,
        batch=1,
        duration=3600,
        options={"start_spread_s": 0, "final_wait_s": 1.0},
    )
    workers = [await start_worker(job) for job in jobs]
    readers = [asyncio.create_task(w.read()) for w in workers]
    try:
        await until(
            lambda: sum(w.counters.get("connected", 0) for w in workers) >= len(devices),
            CONNECT_WAIT_S,
        )
        counts: dict[str, float] = {}

        def all_counted() -> bool:  # the hub counts a session a moment after its handshake
            counts.update(worker_connections(health_port))
            return sum(counts.values()) >= len(devices)

        await until(all_counted, 30.0)
        return counts
    finally:
        for worker in workers:
            await worker.stop()
        await asyncio.gather(*readers)


def spread_metrics(counts: dict[str, float], prefix: str) -> dict[str, Any]:
    """Connections per worker and their max/mean."""
    mean = sum(counts.values()) / max(1, len(counts))
    return {
        f"{prefix}_connections_per_worker": {k: int(v) for k, v in sorted(counts.items())},
        f"{prefix}_max_over_mean": rounded(max(counts.values()) / mean if mean else None),
    }


async def workers_scenario(bench: Bench) -> Scenario:
    """Connection spread both ways, then the batched load through the SO_REUSEPORT hub."""
    sizes = bench.sizes
    count = str(sizes.hub_workers)
    metrics: dict[str, Any] = {"workers": sizes.hub_workers}
    health_port = free_port()
    shared = SocketActivatedHub(
        bench.hub("workers_shared", "--workers", count, "--health-port", str(health_port))
    )
    try:
        shared.launch()
        await wait_all_workers(shared.hub, health_port, sizes.hub_workers)
        metrics.update(spread_metrics(await spread(bench, shared.hub, health_port), "shared"))
    finally:
        await shared.hub.stop()
        shared.close()
    health_port = free_port()
    hub = bench.hub("workers", "--workers", count, "--health-port", str(health_port))
    await hub.start()
    try:
        await wait_all_workers(hub, health_port, sizes.hub_workers)
        metrics.update(spread_metrics(await spread(bench, hub, health_port), "reuseport"))
        jobs = make_jobs(
            sizes.workers,
            "fleet",
            hub.url,
            bench.sim[: sizes.devices],
            rate=sizes.batched_rate,
            batch=sizes.batch,
            duration=sizes.duration_s,
            options={"window": sizes.window, "final_wait_s": sizes.final_wait_s},
        )
        load = await drive(jobs, lambda: hub_sample(hub), bench.influx.pid)
    finally:
        await hub.stop()
    scenario = Scenario("workers", f"8. hub serve --workers {count}, one port, batched")
    scenario.metrics = {
        **metrics,
        **throughput_metrics(load, bench.stored(hub.bucket), sizes.devices, sizes.batch),
        "offered_per_s": round(sizes.devices * sizes.batched_rate * sizes.batch),
    }
    scenario.series = load.series
    return scenario
