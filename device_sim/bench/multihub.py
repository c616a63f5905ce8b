"""Scenarios 9-11: `hub serve` three times on one PostgreSQL registry (9 in `costs`).

In 10 (takeover) the hubs run as `device_sim.cluster.HubCluster` starts them, the way
docs/scale-out.md tells an operator to: HAProxy in TCP mode, `leastconn`, the PROXY header
v2, health checks on each hub's /healthz; the device connects to HAProxy, which sends each
new connection to a hub holding fewer than the device's current one. In 9 (cost per
reading) and 11 (push to 10,000) the devices are dealt over the hubs and connect to them
directly: why in `costs.postgres_vs_sqlite` and `cluster_push`.

Each scenario gets a fresh PostgreSQL database (so `--all` means exactly its devices) and its
own hubs; the devices are registered through the operator's port of the registry
(`PostgresOperator.add_many`, what `hub token add --count` runs).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import sys
import time
from typing import Any

import asyncpg

from device_sim.bench.drive import (
    WORKER_START_S,
    make_jobs,
    merged,
    percentile,
    rounded,
    until,
)
from device_sim.bench.harness import hub_arguments, start_hub
from device_sim.bench.loadgen import Job, Worker, start_worker
from device_sim.bench.model import Scenario
from device_sim.bench.procstat import ProcessSample, sum_samples, tree_sample
from device_sim.bench.scenarios import Bench
from device_sim.client import DeviceClient
from device_sim.cluster import HubCluster
from device_sim.device import Credentials
from device_sim.hub_process import HubProcess
from device_sim.local_servers import create_database
from device_sim.servers.postgres import PostgresDatabase, PostgresServer
from hub.registry.postgres.operator import PostgresOperator
from schemas.codes import CloseCode

MOVE_WAIT_S = 10.0
PUSH_WAIT_S = 120.0
"""`hub config set --wait` of scenario 11: far above the target, so a slow push is measured."""
PUSH_CONNECT_SLACK_S = 240.0
"""How long after the ramp the last of scenario 11's devices may still connect: a
bound for a loaded box, not a goal."""
PUSH_LABEL = ("site", "bench")
OWNER = "SELECT owner_node FROM connections WHERE device_id = $1"
HOLDERS = (
    "SELECT owner_node, count(*) AS devices FROM connections"
    " WHERE owner_node IS NOT NULL GROUP BY owner_node ORDER BY owner_node"
)


class ClusterBench:
    """What scenarios 9-11 share: the bench (InfluxDB, sizes, the SQLite hub of the
    comparison) and one PostgreSQL server, a new database and cluster for each scenario."""

    def __init__(self, bench: Bench, postgres: PostgresServer) -> None:
        self.bench = bench
        self.postgres = postgres
        self._numbers = itertools.count(1)

    def new_registry(self) -> str:
        """The `registry_url` of a fresh database owned by a fresh non-superuser role."""
        role, name = self.postgres.new_database()
        return PostgresDatabase(self.postgres, role, name).dsn

    def one_hub(self, registry_url: str, node_id: str = "alone") -> HubProcess:
        """One `hub serve` (not yet started) on `registry_url`, connected to directly (no
        PROXY header expected), writing to a new database."""
        work_dir = self.bench.work_dir / f"postgres-hub-{next(self._numbers)}"
        work_dir.mkdir(parents=True)
        return start_hub(
            work_dir / "state",
            self.bench.influx,
            self.bench.database(f"postgres_{node_id.replace('-', '_')}"),
            env={"HUB_REGISTRY_URL": registry_url, "HUB_NODE_ID": node_id},
        )

    def cluster(self, registry_url: str, label: str) -> HubCluster:
        """`cluster_hubs` hubs (not yet started) on `registry_url`, writing to a new database."""
        work_dir = self.bench.work_dir / f"cluster-{next(self._numbers)}-{label}"
        work_dir.mkdir(parents=True)
        bucket = self.bench.database(label)
        create_database(self.bench.influx.url, bucket)
        return HubCluster(
            work_dir,
            self.bench.influx,
            bucket,
            registry_url,
            count=self.bench.sizes.cluster_hubs,
            hub_args=hub_arguments(work_dir),
        )


async def provision_registry(
    registry_url: str, count: int, prefix: str, labels: dict[str, str] | None = None
) -> list[Credentials]:
    """Register `count` devices PREFIX00001 and on in the registry; their credentials."""
    ids = [f"{prefix}{number:05d}" for number in range(1, count + 1)]
    operator = await PostgresOperator.open(registry_url)
    try:
        tokens = await operator.add_many(ids, labels)
    finally:
        await operator.close()
    return [Credentials(device_id, token) for device_id, token in zip(ids, tokens, strict=True)]


def hubs_sample(hubs: list[HubProcess]) -> ProcessSample:
    """Every hub's CPU and memory together."""
    return sum_samples([tree_sample(hub.pid) for hub in hubs])


def dealt_jobs(urls: list[str], devices: list[Credentials], **load: Any) -> list[Job]:
    """One load generator per URL, each with every `len(urls)`-th device, starting together."""
    start_at = time.time() + WORKER_START_S
    jobs = [
        make_jobs(1, "fleet", url, devices[n :: len(urls)], **load)[0] for n, url in enumerate(urls)
    ]
    for job in jobs:
        job.start_at = start_at
    return jobs


# --- 10 ------------------------------------------------------------------------------------


def _record_time(times: list[float]) -> None:
    times.append(time.perf_counter())


async def takeover(cb: ClusterBench) -> Scenario:
    """One device connects again and again through HAProxy, each time landing on another hub
    (leastconn: its old connection's hub has one more): the time from the new connect
    returning to the old connection's close with 4000."""
    moves = cb.bench.sizes.takeover_moves
    registry_url = cb.new_registry()
    (mover,) = await provision_registry(registry_url, 1, "mover-")
    after_return: list[float] = []
    after_begin: list[float] = []
    connect_ms: list[float] = []
    same_hub = 0
    owners = await asyncpg.connect(registry_url)
    try:
        async with cb.cluster(registry_url, "takeover") as cluster:
            current = DeviceClient(cluster.url, mover.token)
            await asyncio.wait_for(current.connect(), MOVE_WAIT_S)
            holder = await owners.fetchval(OWNER, mover.device_id)
            try:
                for _ in range(moves):
                    closed_at: list[float] = []
                    current.on_closed(functools.partial(_record_time, closed_at))
                    moved = DeviceClient(cluster.url, mover.token)
                    began = time.perf_counter()
                    await asyncio.wait_for(moved.connect(), MOVE_WAIT_S)
                    returned = time.perf_counter()
                    code, _ = await asyncio.wait_for(current.wait_closed(), MOVE_WAIT_S)
                    await asyncio.wait_for(current.close(), MOVE_WAIT_S)  # closed_at is set
                    if code != CloseCode.REPLACED:
                        raise RuntimeError(f"the old connection closed with {code}, not 4000")
                    current = moved
                    now_held_by = await owners.fetchval(OWNER, mover.device_id)
                    if now_held_by == holder:
                        same_hub += 1  # not a move across hubs: not counted
                    else:
                        # Negative when the old hub closed before the new handshake's answer.
                        after_return.append((closed_at[0] - returned) * 1000)
                        after_begin.append((closed_at[0] - began) * 1000)
                        connect_ms.append((returned - began) * 1000)
                    holder = now_held_by
            finally:
                await asyncio.wait_for(current.close(), MOVE_WAIT_S)
    finally:
        await owners.close()
    scenario = Scenario("takeover", f"10. takeover across {cb.bench.sizes.cluster_hubs} hubs")
    scenario.metrics = {
        "moves": moves,
        "moves_across_hubs": len(after_return),
        "same_hub_moves": same_hub,
        "takeover_p50_ms": rounded(percentile(after_return, 0.5)),
        "takeover_p99_ms": rounded(percentile(after_return, 0.99)),
        "takeover_max_ms": rounded(max(after_return, default=None)),
        "from_connect_start_p50_ms": rounded(percentile(after_begin, 0.5)),
        "from_connect_start_p99_ms": rounded(percentile(after_begin, 0.99)),
        "connect_p50_ms": rounded(percentile(connect_ms, 0.5)),
        "connect_p99_ms": rounded(percentile(connect_ms, 0.99)),
    }
    return scenario


# --- 11 ------------------------------------------------------------------------------------


async def cluster_push(cb: ClusterBench) -> Scenario:
    """`push_devices` idle devices dealt over `cluster_hubs` hubs, connected to directly;
    `hub config set --all`, then `--label`, each timed from the command's start until it saw
    every device's answer.

    Directly, not through HAProxy: a proxied connection takes two file descriptors in
    HAProxy, which derives its `maxconn` from its open-files limit, and where that limit is
    20,000 (a container's hard limit, that only root outside can raise) 10,000 devices do
    not fit through one HAProxy. What is measured, the routing of a push from PostgreSQL to
    the hub holding each device, is the same either way. They connect at `push_connects_per_s`:
    see docs/benchmarks.md on many handshakes at once on PostgreSQL."""
    sizes = cb.bench.sizes
    registry_url = cb.new_registry()
    devices = await provision_registry(
        registry_url, sizes.push_devices, "push-", {PUSH_LABEL[0]: PUSH_LABEL[1]}
    )
    metrics: dict[str, Any] = {"devices": len(devices), "hubs": sizes.cluster_hubs}
    hubs = [cb.one_hub(registry_url, f"hub-{n + 1}") for n in range(sizes.cluster_hubs)]
    ramp_s = len(devices) / sizes.push_connects_per_s
    metrics["connect_ramp_s"] = round(ramp_s, 1)
    owners = await asyncpg.connect(registry_url)
    try:
        await asyncio.gather(*(hub.start() for hub in hubs))
        jobs = dealt_jobs(
            [hub.url for hub in hubs],
            devices,
            rate=0,
            batch=1,
            duration=3600,
            options={"start_spread_s": ramp_s, "final_wait_s": 1.0},
        )
        workers = [await start_worker(job) for job in jobs]
        readers = [asyncio.create_task(w.read()) for w in workers]
        try:
            connected = functools.partial(_connected, workers)
            bound_s = ramp_s + PUSH_CONNECT_SLACK_S
            try:
                connect_s = await until(lambda: connected() >= len(devices), bound_s)
            except TimeoutError:
                raise RuntimeError(
                    f"{connected()} of {len(devices)} devices connected after "
                    f"{bound_s:.0f} s (the hubs' logs, in {cb.bench.work_dir}, say why)"
                ) from None
            metrics["all_connected_s"] = round(connect_s, 2)
            held = {row["owner_node"]: row["devices"] for row in await owners.fetch(HOLDERS)}
            metrics["devices_per_hub"] = held
            everyone = await timed_config_set(registry_url, "--all", "unit=F")
            labelled = await timed_config_set(
                registry_url, "--label", "=".join(PUSH_LABEL), "unit=C"
            )
            peak = hubs_sample(hubs).peak_rss_bytes
            metrics["hub_peak_rss_mib"] = round(peak / 2**20, 1)
        finally:
            for worker in workers:
                await worker.stop()
            await asyncio.gather(*readers)
    finally:
        await owners.close()
        await asyncio.gather(*(hub.stop() for hub in hubs))
    metrics["connect_errors"] = merged(
        (w.final or {}).get("summary", {}).get("connect_errors", {}) for w in workers
    )
    metrics.update({f"all_{key}": value for key, value in everyone.items()})
    metrics.update({f"label_{key}": value for key, value in labelled.items()})
    scenario = Scenario(
        "cluster_push",
        f"11. config push to {len(devices):,} devices over {sizes.cluster_hubs} hubs",
    )
    scenario.metrics = metrics
    return scenario


def _connected(workers: list[Worker]) -> int:
    return sum(w.counters.get("connected", 0) for w in workers)


async def timed_config_set(registry_url: str, *args: str) -> dict[str, Any]:
    """Run `hub config set ARGS --wait`; seconds from its start until it wrote the configs
    and until it saw every answer (its own "applied by all" line), and how many answered.
    Answers still missing after `PUSH_WAIT_S` are a figure (`all_acked_s` None), not an
    error; a command that failed otherwise is."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub", "config", "set", *args,
        "--wait", str(PUSH_WAIT_S), "--registry-url", registry_url,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    set_at = applied_at = None
    answered = ""
    tail: list[str] = []
    async for line in process.stderr:
        now = time.monotonic()
        text = line.decode(errors="replace")
        tail = [*tail[-20:], text]
        if text.startswith("config set for"):
            set_at = now
        elif text.startswith("answered "):
            answered = text.split()[1]
        elif text.startswith("applied by all"):
            applied_at = now
    code = await process.wait()
    timed_out = any(text.startswith("no answer within") for text in tail)
    if set_at is None or (applied_at is None and not timed_out):
        raise RuntimeError(f"hub config set {' '.join(args)} exited {code}:\n{''.join(tail)}")
    return {
        "set_s": round(set_at - started, 3),
        "all_acked_s": None if applied_at is None else round(applied_at - started, 3),
        "acked_after_set_s": None if applied_at is None else round(applied_at - set_at, 3),
        "answered": answered,
        "wait_s": PUSH_WAIT_S,
    }
