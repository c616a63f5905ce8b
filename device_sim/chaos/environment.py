"""Every server a chaos run needs, started under one directory and stopped by process id.

PostgreSQL 15 (one database owned by a non-superuser role), InfluxDB 1.6.7, three
single-process hubs and one `--workers 2` hub on that one database behind HAProxy
(`HubCluster`, as docs/scale-out.md configures it). `close()` stops everything it started,
whatever state each is in (a frozen server is continued first by its own `stop`), and is safe
to call after a partial start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from device_sim.cluster import ClusterHub, HubCluster
from device_sim.device import Credentials
from device_sim.local_servers import LocalServer, create_database, start_influxdb
from device_sim.servers.postgres import PostgresServer, start_postgres

DB = "chaos"
SINGLE_HUBS = 3
WORKERS = 2
HUB_ENV = {
    # Quick retries and a short write deadline, so an outage goes to the spool and back
    # within the run's pace; INFO so the hub logs say what each fault did.
    "HUB_WRITE_DEADLINE_S": "1",
    "HUB_RETRY_INITIAL_S": "0.1",
    "HUB_RETRY_MAX_S": "1",
    "HUB_SHUTDOWN_TIMEOUT_S": "5",
    "HUB_LOG_LEVEL": "INFO",
}


@dataclass
class Environment:
    """The servers of one run; `start()` then `close()`."""

    work_dir: Path
    postgres: PostgresServer | None = None
    influx: LocalServer | None = None
    cluster: HubCluster | None = None
    registry_url: str = ""
    worker_pids_seen: set[int] = field(default_factory=set)

    async def start(self) -> None:
        """PostgreSQL, InfluxDB, then the hubs and HAProxy."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.postgres = await asyncio.to_thread(start_postgres, self.work_dir / "postgres")
        role, database = await asyncio.to_thread(self.postgres.new_database)
        self.registry_url = self.postgres.dsn(database, role)
        self.influx = await asyncio.to_thread(start_influxdb, self.work_dir / "influxdb")
        await asyncio.to_thread(create_database, self.influx.url, DB)
        self.cluster = HubCluster(
            self.work_dir / "hubs",
            self.influx,
            DB,
            self.registry_url,
            count=SINGLE_HUBS + 1,
            env=HUB_ENV,
            worker_counts=[1] * SINGLE_HUBS + [WORKERS],
        )
        await self.cluster.start()
        self.note_workers()

    @property
    def hubs(self) -> list[ClusterHub]:
        """Every hub, the `--workers` one last."""
        assert self.cluster is not None
        return self.cluster.hubs

    @property
    def single_hubs(self) -> list[ClusterHub]:
        """The single-process hubs."""
        return [hub for hub in self.hubs if hub.workers == 1]

    @property
    def workers_hub(self) -> ClusterHub:
        """The `--workers` hub."""
        return next(hub for hub in self.hubs if hub.workers > 1)

    def note_workers(self) -> None:
        """Remember the workers' process ids, so `close()` can make sure each one ended."""
        self.worker_pids_seen.update(self.workers_hub.worker_pids())

    def provision(self, count: int) -> list[Credentials]:
        """Register `count` devices in the registry."""
        assert self.cluster is not None
        return self.cluster.provision(count, "chaos-")

    def processes(self) -> dict[str, int]:
        """The process id of every server now running: name -> pid."""
        found: dict[str, int] = {}
        if self.postgres is not None and self.postgres.running:
            found["postgres"] = self.postgres.pid
        if self.influx is not None and self.influx.running:
            found["influxdb"] = self.influx.pid
        if self.cluster is not None:
            if self.cluster.balancer is not None and self.cluster.balancer.running:
                found["haproxy"] = self.cluster.balancer.pid
            for hub in self.cluster.hubs:
                process = hub.process.process
                if process is not None and process.poll() is None:
                    found[hub.node_id] = process.pid
        return found

    async def close(self) -> list[str]:
        """Stop everything, each by its pid; what did not stop cleanly."""
        problems: list[str] = []
        if self.cluster is not None:
            with contextlib.suppress(RuntimeError, ValueError):
                self.note_workers()
            try:
                statuses = await self.cluster.stop()
            except AssertionError as exc:  # a hub ignored SIGTERM: HubProcess killed it
                problems.append(str(exc)[:500])
            else:
                problems += [
                    f"{hub.node_id} exited {status} on SIGTERM"
                    for hub, status in zip(self.cluster.hubs, statuses, strict=True)
                    if status != 0
                ]
            marker = str(self.workers_hub.process.state_dir)
            for pid in sorted(self.worker_pids_seen):
                # A worker outliving its supervisor would hold its spool's lock: end it, if
                # the pid is still that worker's (pids are reused) and nobody else's.
                if _runs_with(pid, marker):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    problems.append(f"worker pid {pid} outlived its supervisor")
        if self.influx is not None:
            await asyncio.to_thread(self.influx.close)
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.close)
        return problems


def _runs_with(pid: int, marker: str) -> bool:
    """Whether process `pid` is alive with `marker` among its arguments."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return marker.encode() in argv
