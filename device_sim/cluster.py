"""Several `hub serve` processes on one PostgreSQL registry, behind one HAProxy: a small fleet.

One place for the tests, the benchmarks and the chaos run to start "three hubs behind a
balancer" the way docs/scale-out.md tells an operator to: each hub a real process with its own
state directory (its spool), its own node id and health port, all on one PostgreSQL database
and one InfluxDB database; HAProxy in TCP mode in front, `leastconn`, the PROXY header v2 on
every connection (so each hub sees the device's address, `proxy_protocol_from`), health checks
on each hub's `/healthz`, and a dead hub's connections redispatched to the others.

Every process is started and stopped by its process id: the hubs by `HubProcess`, HAProxy by
`HAProxyServer`, PostgreSQL by its caller (a cluster never owns the database server: the chaos
run and the tests kill and freeze it on their own).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from device_sim.device import Credentials
from device_sim.fleet import read_tokens
from device_sim.hub_process import HubProcess
from device_sim.local_servers import LocalServer, free_port
from device_sim.servers.haproxy import HAProxyServer, start_haproxy

HEALTH_CHECK_INTERVAL_MS = 300
"""How often HAProxy asks each hub's /healthz (two failures mark it down)."""


@dataclass(frozen=True, slots=True)
class ClusterHub:
    """One hub of the cluster: its process and the port of its /healthz."""

    node_id: str
    process: HubProcess
    health_port: int


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
    default-server inter {inter}ms fall 2 rise 1 send-proxy-v2 on-marked-down shutdown-sessions
{servers}"""


class HubCluster:
    """`count` hubs on the PostgreSQL database at `registry_url`, and HAProxy in front of
    them once `start` ran. `hub_args` go to every `hub serve`; `env` adds to its variables."""

    def __init__(
        self,
        work_dir: Path,
        influx: LocalServer,
        bucket: str,
        registry_url: str,
        count: int = 3,
        hub_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
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
                env={
                    **self.env,
                    "HUB_NODE_ID": node_id,
                    "HUB_PROXY_PROTOCOL_FROM": '["127.0.0.1"]',
                },
            )  # fmt: skip
            self.hubs.append(ClusterHub(node_id, process, health_port))
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
        """Start every hub (in parallel, each waited for until it listens), then HAProxy."""
        await asyncio.gather(*(hub.process.start() for hub in self.hubs))
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
        subprocess.run(
            [
                sys.executable, "-m", "hub", "token", "add",
                "--count", str(count), "--prefix", prefix, "--out", str(out),
                "--registry-url", self.registry_url,
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        return read_tokens(out)

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
