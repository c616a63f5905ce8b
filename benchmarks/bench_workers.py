"""`hub serve --workers N` on one port: how evenly connections spread over the workers, and
what the fleet's readings cost there against one process.

    python benchmarks/bench_workers.py [--workers 2] [--connections 1000] [--seconds 10]

Starts a throwaway InfluxDB 1.6.7 (Debian's `influxdb` package), registers the devices, and
for each way the workers can share the port:

- `reuseport`: each worker binds the port with SO_REUSEPORT (`hub serve` without systemd);
- `shared`: one listening socket passed to the hub as systemd's `hub.socket` would
  (`LISTEN_FDS`), which the supervisor hands on to every worker;

opens `--connections` connections at once, each acked once, then prints the connections
per worker from the supervisor's /metrics and their max/mean (issue 12 asks for at most
1.2 after 1000). Then `--seconds` of streaming from 50 of those devices (50 messages/s of
20 readings each): readings acked per second and the hub's CPU per reading (supervisor and
workers together, from /proc), beside the same for one process (`--workers 1`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from device_sim.client import DeviceClient
from device_sim.fleet import Credentials, run_fleet
from device_sim.hub_process import provision
from device_sim.local_servers import (
    LocalServer,
    create_database,
    free_port,
    http_request,
    start_influxdb,
)
from hub.ops.top import parse_scrape
from hub.workers.exposition import by_worker

DB = "bench"
AS_SYSTEMD_DOES = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def process_tree_cpu_s(pid: int) -> float:
    """User and system CPU seconds of `pid` and its children still running."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(child) for child in children.read_text().split()]
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


class BenchHub:
    """`hub serve` for the benchmark, binding the port itself or handed a listening socket."""

    def __init__(self, base: Path, influx: LocalServer, workers: int, shared: bool) -> None:
        self.port, self.health_port = free_port(), free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.workers = workers
        argv = [
            sys.executable, "-m", "hub", "serve", "--state-dir", str(base / "state"),
            "--port", str(self.port), "--influx-url", influx.url, "--influx-bucket", DB,
            "--health-port", str(self.health_port), "--workers", str(workers),
        ]  # fmt: skip
        env = {**os.environ, "HUB_LOG_LEVEL": "WARNING", "HUB_MAX_CONNECTIONS": "5000"}
        pass_fds: tuple[int, ...] = ()
        self.listener: socket.socket | None = None
        if shared:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(4096)
            self.listener = listener
            pass_fds = (listener.fileno(),)
            env.update(LISTEN_FDS="1", LISTEN_FDNAMES="devices")
            # As systemd starts a unit: the socket at fd 3, LISTEN_PID the hub's own pid.
            argv = [sys.executable, "-c", AS_SYSTEMD_DOES, str(listener.fileno()), *argv]
        self.log = open(base / f"hub-{self.port}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            argv, env=env, pass_fds=pass_fds, stdout=self.log, stderr=subprocess.STDOUT
        )

    def scrape(self) -> dict[str, float]:
        """Each worker's open connections (the hub's own for one process)."""
        _, body = http_request(f"http://127.0.0.1:{self.health_port}/metrics", timeout=5)
        text = body.decode()
        return by_worker(text, "hub_connections") or {
            "1": parse_scrape(text, time.time()).value("hub_connections")
        }

    async def ready(self) -> None:
        """Until every worker listens."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the hub exited; see its log"
            try:
                status, _ = http_request(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2)
                if status == 200 and len(self.scrape()) == self.workers:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError("the hub did not become ready")

    def stop(self) -> None:
        """SIGTERM by pid, and wait."""
        self.process.terminate()
        self.process.wait(60)
        self.log.close()
        if self.listener is not None:
            self.listener.close()


async def spread(hub: BenchHub, creds: list[Credentials]) -> dict[str, float]:
    """Open a connection per device at once, each acked once; the connections per worker."""
    clients = [DeviceClient(hub.url, device.token) for device in creds]
    now_ms = time.time_ns() // 10**6

    async def open_one(number: int, client: DeviceClient) -> None:
        await client.__aenter__()
        reading = {"name": "environment", "time": now_ms + number, "fields": {"t": 1.0}}
        await asyncio.wait_for(client.store([reading]), 60)

    try:
        await asyncio.gather(*(open_one(n, c) for n, c in enumerate(clients)))
        deadline = time.monotonic() + 30
        counts = hub.scrape()
        while sum(counts.values()) < len(creds):  # presence is counted a moment later
            assert time.monotonic() < deadline, counts
            await asyncio.sleep(0.1)
            counts = hub.scrape()
        return counts
    finally:
        await asyncio.gather(*(c.__aexit__(None, None, None) for c in clients))


async def throughput(
    hub: BenchHub, creds: list[Credentials], seconds: float
) -> tuple[float, float]:
    """Readings acked per second, and hub CPU microseconds per reading, while streaming."""
    cpu_before = process_tree_cpu_s(hub.process.pid)
    report = await run_fleet(hub.url, creds, rate=50, batch=20, duration=seconds, final_wait_s=30)
    cpu = process_tree_cpu_s(hub.process.pid) - cpu_before
    return report.acked / seconds, cpu / max(1, report.acked) * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as scratch:
        base = Path(scratch)
        influx = start_influxdb(base / "influxdb")
        try:
            create_database(influx.url, DB)
            for mode, workers, shared in (
                ("reuseport", args.workers, False),
                ("shared", args.workers, True),
                ("one process", 1, False),
            ):
                run = base / mode.replace(" ", "-")
                run.mkdir()
                creds = provision(run / "state", args.connections, "b-")
                hub = BenchHub(run, influx, workers, shared)
                try:
                    await hub.ready()
                    if workers > 1:
                        counts = await spread(hub, creds)
                        mean = sum(counts.values()) / len(counts)
                        print(
                            f"{mode}: {args.connections} connections over {workers} workers: "
                            f"{dict(sorted(counts.items()))}, max/mean "
                            f"{max(counts.values()) / mean:.3f}"
                        )
                    rate, cpu_us = await throughput(hub, creds[:50], args.seconds)
                    print(
                        f"{mode} ({workers} worker{'s' if workers > 1 else ''}): "
                        f"{rate:,.0f} readings/s acked, hub CPU {cpu_us:.1f} us per reading"
                    )
                finally:
                    hub.stop()
        finally:
            influx.stop()


if __name__ == "__main__":
    asyncio.run(main())
