"""`device-sim bench`: start InfluxDB, provision devices, run every scenario, report."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from device_sim.bench import costs, multihub, report
from device_sim.bench.model import BenchSizes, Scenario
from device_sim.bench.scenarios import Bench
from device_sim.bench.workers import workers_scenario
from device_sim.local_servers import start_influxdb
from device_sim.servers.postgres import start_postgres

SCENARIOS = (
    "ceiling",
    "no_hub",
    "batched",
    "single",
    "idle",
    "storm",
    "workers",
    "postgres",
    "takeover",
    "cluster_push",
)
"""Scenario groups `--only` can pick; `batched` includes its half-rate latency run and
`idle` the config push (scenario 7), which runs on the idle connections."""
ON_POSTGRESQL = frozenset({"postgres", "takeover", "cluster_push"})
"""The groups that need a PostgreSQL server (one for the run, a database each)."""


async def run_bench(
    out_dir: Path,
    sizes: BenchSizes,
    only: set[str] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the chosen scenarios; write `bench.json` and `bench.png` into `out_dir`."""
    console = console or Console(stderr=True)
    wanted = only or set(SCENARIOS)
    scenarios: dict[str, Scenario] = {}
    failed: dict[str, str] = {}
    """Scenario groups that raised, with the error: in the report, and the command fails."""
    started = time.monotonic()
    # A SIGTERM (someone stopping the run) cancels it, so that the hubs, load generators,
    # PostgreSQL and InfluxDB it started are stopped by their pids on the way out, not left
    # running (the default action would end this process at once).
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.ExitStack() as servers:
        work = servers.enter_context(tempfile.TemporaryDirectory(prefix="hub-bench-"))
        influx = servers.enter_context(start_influxdb(Path(work) / "influxdb"))
        bench = Bench(influx, Path(work), sizes)
        provision_s = bench.provision()
        console.log(f"provisioned devices with `hub token add --count` in {provision_s:.2f} s")

        async def step(name: str, run: Any) -> Any:
            console.log(f"scenario {name}...")
            try:
                result = await run
            except Exception as exc:  # reported; the other scenarios still run
                failed[name] = f"{type(exc).__name__}: {exc}"[:4000]
                console.log(f"  scenario {name} FAILED: {failed[name]}")
                return None
            for scenario in result if isinstance(result, tuple) else (result,):
                scenarios[scenario.name] = scenario
                console.log(f"  {scenario.title}: {scenario.metrics}")
            return result

        if "ceiling" in wanted:
            await step("ceiling", bench.ceiling())
        if "no_hub" in wanted:
            await step("no_hub", bench.no_hub())
        if "batched" in wanted:
            batched = await step(
                "batched",
                bench.hub_throughput(
                    "batched",
                    f"3. hub, {sizes.batch} readings a message",
                    devices=sizes.devices,
                    rate=sizes.batched_rate,
                    batch=sizes.batch,
                    window=sizes.window,
                ),
            )
        if "batched" in wanted and batched is not None:
            half = batched.metrics["stored_per_s"] / 2 / (sizes.devices * sizes.batch)
            await step(
                "batched_half",
                bench.hub_throughput(
                    "batched_half",
                    "3b. hub, batched, at half the maximum rate",
                    devices=sizes.devices,
                    rate=max(half, 0.05),
                    batch=sizes.batch,
                    window=sizes.window,
                ),
            )
        if "single" in wanted:
            await step(
                "single",
                bench.hub_throughput(
                    "single",
                    "4. hub, one reading a message",
                    devices=sizes.single_devices,
                    rate=sizes.single_rate,
                    batch=1,
                    window=sizes.single_window,
                ),
            )
        if "idle" in wanted:
            await step("idle", bench.idle_and_config())
        if "storm" in wanted:
            await step("storm", bench.connect_storm())
        if "workers" in wanted:
            await step("workers", workers_scenario(bench))
        if wanted & ON_POSTGRESQL:
            postgres = servers.enter_context(start_postgres(Path(work) / "postgres"))
            cluster = multihub.ClusterBench(bench, postgres)
            if "postgres" in wanted:
                await step("postgres", costs.postgres_vs_sqlite(cluster))
            if "takeover" in wanted:
                await step("takeover", multihub.takeover(cluster))
            if "cluster_push" in wanted:
                await step("cluster_push", multihub.cluster_push(cluster))
    command = shlex.join(["device-sim", *sys.argv[1:]])
    extra = {
        "provision_s": round(provision_s, 3),
        "total_s": round(time.monotonic() - started, 1),
        "influxdb": "1.6.7 (Debian package), same machine",
        "postgresql": "15 (Debian package), same machine" if wanted & ON_POSTGRESQL else None,
        "failed": failed,
    }
    result = report.build(scenarios, sizes, command, extra)
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, at the end)
    report.write_json(result, out_dir / "bench.json")
    if not report.write_chart(result, out_dir / "bench.png"):
        console.log("no chart: install the plot extra (pip install 'sensor-hub[plot]')")
    return result
