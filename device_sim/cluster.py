"""Several `hub serve` processes on one PostgreSQL registry, behind one HAProxy: a small fleet.

One place for the tests, the benchmarks and the chaos run to start "three hubs behind a
balancer" the way docs/scale-out.md tells an operator to: each hub a real process with its own
state directory (its spool), its own node id and health port, all on one PostgreSQL database
and one InfluxDB database; HAProxy in TCP mode in front, `leastconn`, the PROXY header v2 on
every connection (so each hub sees the device's address, `proxy_protocol_from`), health checks
on each hub's `/healthz`, and a dead hub's connections redispatched to the others.

A hub may run `--workers N` (`worker_counts`): its supervisor is the hub's process, its
workers are the supervisor's children (`worker_pids`), and it counts as ready once its
/healthz says every worker listens (`wait_ready`).

Every process is started and stopped by its process id: the hubs by `HubProcess`, HAProxy by
`HAProxyServer`, PostgreSQL by its caller (a cluster never owns the database server: the chaos
run and the tests kill and freeze it on their own).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_sim.device import Credentials
from device_sim.hub_process import HubProcess, provision
from device_sim.local_servers import LocalServer, free_port, http_request
from device_sim.servers.haproxy import HAProxyServer, start_haproxy

HEALTH_CHECK_INTERVAL_MS = 300
"""How often HAProxy asks each hub's /healthz (two failures mark it down)."""
READY_TIMEOUT_S = 60.0
"""How long `wait_ready` waits for every worker of a hub to listen."""


@dataclass(frozen=True, slots=True)
class ClusterHub:
    """One hub of the cluster: its process and the port of its /healthz."""

    node_id: str
    process: HubProcess
    health_port: int
    workers: int = 1
    """Its `--workers`: 1 is a plain hub; more, a supervisor and that many worker processes."""

    def healthz(self) -> tuple[int, dict[str, Any]]:
        """The hub's /healthz status and body; raises OSError when nothing answers."""
        status, body = http_request(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2)
        answer: dict[str, Any] = json.loads(body)
        return status, answer

    def worker_pids(self) -> list[int]:
        """The live worker processes of a `--workers` hub (its supervisor's children)."""
        if self.process.process is None or self.process.process.poll() is not None:
            return []
        return child_pids(self.process.pid)

    def all_listening(self) -> bool:
        """Whether the hub answers /healthz healthy, with every worker listening."""
        try:
            status, body = self.healthz()
        except (OSError, ValueError):
            return False
        if self.workers == 1:
            return status == 200
        return status == 200 and int(body.get("workers_healthy", 0)) == self.workers

    async def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait (bounded) until the hub is healthy with every worker listening."""
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(self.all_listening):
            process = self.process.process
            if process is None or process.poll() is not None:
                raise RuntimeError(f"{self.node_id} exited:\n{self.process.log[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.node_id} not ready after {timeout_s:.0f} s:\n{self.process.log[-4000:]}"
                )
            await asyncio.sleep(0.1)


def child_pids(parent: int) -> list[int]:
    """The live (not zombie) processes whose parent is `parent`, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: split after the last.
        state, ppid = text.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == parent and state != "Z":
            children.append(int(entry.name))
    return sorted(children)


def balancer_config(port: int, hubs: Sequence[tuple[int, int]]) -> str:
    """HAProxy's config for hubs on 127.0.0.1, given as (device port, health port) pairs:
    the configuration of docs/scale-out.md, with checks tightened for a test's pace and
    `retries`/`redispatch` so a connect to a hub that just died goes to another."""
    servers = "".join(
        f"    server hub-{index + 1} 127.0.0.1:{device_port} check port {health_port}\n"
        for index, (device_port, health_port) in enumerate(hubs)
    )
    inter = HEALTH_CHECK_INTERVAL_MS
    return f"""\
global
    log stderr format raw local0 info

defaults
    log global
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    retries 3
    option redispatch 1

frontend devices
    mode tcp
    bind 127.0.0.1:{port}
    default_backend hubs

backend hubs
    mode tcp
    balance leastconn
    option httpchk GET /healthz
    http-check expect status 200
    timeout check 2s
    default-server inter {inter}ms fall 2 rise 1 send-proxy-v2 on-marked-down shutdown-sessions
{servers}"""


class HubCluster:
    """`count` hubs on the PostgreSQL database at `registry_url`, and HAProxy in front of
    them once `start` ran. `hub_args` go to every `hub serve`; `env` adds to its variables.
    `worker_counts` gives each hub's `--workers` (default: 1 for every hub)."""

    def __init__(
        self,
        work_dir: Path,
        influx: LocalServer,
        bucket: str,
        registry_url: str,
        count: int = 3,
        hub_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        worker_counts: Sequence[int] | None = None,
    ) -> None:
        workers = list(worker_counts) if worker_counts is not None else [1] * count
        if len(workers) != count or min(workers, default=1) < 1:
            raise ValueError(f"worker_counts must give {count} counts of at least 1: {workers}")
        self.work_dir = work_dir
        self.registry_url = registry_url
        self.env = {**(env or {}), "HUB_REGISTRY_URL": registry_url}
        self.hubs: list[ClusterHub] = []
        for index in range(count):
            node_id = f"hub-{index + 1}"
            health_port = free_port()
            state_dir = work_dir / node_id / "state"
            state_dir.mkdir(parents=True, exist_ok=True)
            process = HubProcess(
                state_dir,
                influx,
                bucket,
                *hub_args,
                "--health-port", str(health_port),
                *(("--workers", str(workers[index])) if workers[index] > 1 else ()),
                env={
                    **self.env,
                    "HUB_NODE_ID": node_id,
                    "HUB_PROXY_PROTOCOL_FROM": '["127.0.0.1"]',
                },
            )  # fmt: skip
            self.hubs.append(ClusterHub(node_id, process, health_port, workers[index]))
        self.balancer: HAProxyServer | None = None

    @property
    def url(self) -> str:
        """Where devices connect: the balancer's ws:// URL."""
        if self.balancer is None:
            raise RuntimeError("the cluster is not started")
        return self.balancer.url

    def hub(self, node_id: str) -> ClusterHub:
        """The hub named `node_id`."""
        for hub in self.hubs:
            if hub.node_id == node_id:
                return hub
        raise KeyError(node_id)

    async def start(self) -> None:
        """Start every hub (in parallel, each waited for until it listens, a `--workers` hub
        until every worker does), then HAProxy."""
        await asyncio.gather(*(hub.process.start() for hub in self.hubs))
        await asyncio.gather(*(hub.wait_ready() for hub in self.hubs if hub.workers > 1))
        pairs = [(hub.process.port, hub.health_port) for hub in self.hubs]
        self.balancer = await asyncio.to_thread(
            start_haproxy, self.work_dir / "haproxy", lambda port: balancer_config(port, pairs)
        )

    async def stop(self) -> list[int]:
        """Stop HAProxy, then every hub (SIGTERM, by pid); the hubs' exit statuses."""
        if self.balancer is not None:
            await asyncio.to_thread(self.balancer.stop)
        return list(await asyncio.gather(*(hub.process.stop() for hub in self.hubs)))

    def provision(self, count: int, prefix: str) -> list[Credentials]:
        """Register `count` devices in the cluster's registry (`hub token add --count`)."""
        out = self.work_dir / f"tokens-{prefix.rstrip('-')}.csv"
        return provision(self.work_dir, count, prefix, out, registry_url=self.registry_url)

    def logs(self) -> str:
        """Every hub's output so far, each under its node id (for a failing test's message)."""
        return "\n".join(f"--- {hub.node_id}\n{hub.process.log}" for hub in self.hubs)

    async def __aenter__(self) -> HubCluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
