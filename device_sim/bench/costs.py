"""Scenario 9: what a reading costs a hub on PostgreSQL, against hubs on SQLite at the same
load (the issue 12 target: the registry is never on the hot path).

The hubs run as in `device_sim.bench.multihub`, connected to directly; the configurations
take turns, `compare_rounds` times, and the figures are the means of their rounds.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
from pathlib import Path
from typing import Any

from device_sim.bench.drive import drive, throughput_metrics
from device_sim.bench.harness import start_hub
from device_sim.bench.model import Scenario
from device_sim.bench.multihub import ClusterBench, dealt_jobs, hubs_sample, provision_registry
from device_sim.bench.scenarios import Bench
from device_sim.device import Credentials
from device_sim.hub_process import HubProcess, provision


async def postgres_vs_sqlite(cb: ClusterBench) -> Scenario:
    """The same fixed load through one SQLite hub, one hub on PostgreSQL, `cluster_hubs`
    hubs each on a SQLite registry of its own (a third of the devices each) and
    `cluster_hubs` hubs on PostgreSQL, taking turns. The target is the last against the
    third: the same hubs at the same load each, on the same busy box, differing only in the
    registry, which must cost nothing per reading. The first two tell the registry's cost
    for one hub; the first against the third, what splitting the load costs by itself.

    The devices connect to the hubs directly, dealt over them, not through the cluster's
    HAProxy: its checks (every 300 ms, a check that takes longer fails, two failures mark a
    hub down and shut its sessions down) mark hubs at full load on a shared 2-core box down
    and cut every session of theirs, and the run measures reconnections instead of the cost
    of a reading. The connections open over `compare_connect_s`, not at once, for the same
    reason: see docs/benchmarks.md on 1000 handshakes at once on PostgreSQL."""
    bench, sizes = cb.bench, cb.bench.sizes
    registry_url = cb.new_registry()
    devices = await provision_registry(registry_url, sizes.devices, "pgsim-")
    own_registries, own_devices = _sqlite_shares(bench)
    runs: dict[str, list[dict[str, Any]]] = {
        "sqlite": [],
        "postgres_one": [],
        "sqlite_three": [],
        "cluster": [],
    }
    for _ in range(sizes.compare_rounds):
        sqlite = bench.hub("compare_sqlite")
        runs["sqlite"].append(await _fixed_load(bench, [sqlite], bench.sim[: sizes.devices]))
        alone = cb.one_hub(registry_url)
        runs["postgres_one"].append(await _fixed_load(bench, [alone], devices))
        apart = [
            start_hub(state_dir, bench.influx, bench.database(f"compare_sqlite_{n + 1}"))
            for n, state_dir in enumerate(own_registries)
        ]
        runs["sqlite_three"].append(await _fixed_load(bench, apart, own_devices))
        hubs = [cb.one_hub(registry_url, f"hub-{n + 1}") for n in range(sizes.cluster_hubs)]
        runs["cluster"].append(await _fixed_load(bench, hubs, devices))
    scenario = Scenario(
        "postgres",
        f"9. {sizes.cluster_hubs} hubs on PostgreSQL vs one SQLite hub, same load",
    )
    scenario.metrics = compare_runs(runs)
    scenario.metrics["offered_per_s"] = round(sizes.devices * sizes.compare_rate * sizes.batch)
    scenario.metrics["hubs"] = sizes.cluster_hubs
    scenario.metrics["connect_spread_s"] = sizes.compare_connect_s
    scenario.series = runs["cluster"][-1].pop("series")
    for one in runs.values():
        for run in one:
            run.pop("series", None)
    return scenario


def _sqlite_shares(bench: Bench) -> tuple[list[Path], list[Credentials]]:
    """`cluster_hubs` state directories, each a SQLite registry holding its share of
    `devices` devices; the devices in the order `dealt_jobs` deals them (the n-th of every
    `cluster_hubs` to the n-th hub)."""
    sizes = bench.sizes
    hubs = sizes.cluster_hubs
    state_dirs = [bench.work_dir / f"sqlite-hub-{n + 1}" / "state" for n in range(hubs)]
    for state_dir in state_dirs:
        state_dir.parent.mkdir(parents=True)
    shares = [
        provision(state_dir, len(range(n, sizes.devices, hubs)), f"sq{n + 1}-")
        for n, state_dir in enumerate(state_dirs)
    ]
    dealt = [shares[n % hubs][n // hubs] for n in range(sizes.devices)]
    return state_dirs, dealt


async def _fixed_load(
    bench: Bench, hubs: list[HubProcess], devices: list[Credentials]
) -> dict[str, Any]:
    """Start the hubs, run the scenario's fixed load through them (`cluster_hubs` load
    generators, whatever the number of hubs), stop them; the figures, with the series."""
    sizes = bench.sizes
    urls = [hubs[n % len(hubs)].url for n in range(sizes.cluster_hubs)]
    try:
        await asyncio.gather(*(hub.start() for hub in hubs))
        jobs = dealt_jobs(
            urls,
            devices[: sizes.devices],
            rate=sizes.compare_rate,
            batch=sizes.batch,
            duration=sizes.duration_s,
            options={
                "window": sizes.window,
                "final_wait_s": sizes.final_wait_s,
                "start_spread_s": sizes.compare_connect_s,
            },
        )
        load = await drive(jobs, functools.partial(hubs_sample, hubs), bench.influx.pid)
    finally:
        await asyncio.gather(*(hub.stop() for hub in hubs))
    stored = sum(bench.stored(hub.bucket) for hub in hubs)
    metrics = throughput_metrics(load, stored, sizes.devices, sizes.batch)
    metrics["series"] = load.series
    return metrics


def compare_runs(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The cluster's figures (the means of its rounds) beside the single hubs'."""

    def mean(name: str, key: str) -> float:
        return statistics.fmean(run[key] for run in runs[name])

    cluster, sqlite, alone = runs["cluster"], runs["sqlite"], runs["postgres_one"]
    cluster_cpu = mean("cluster", "hub_cpu_us_per_reading")
    sqlite_cpu = mean("sqlite", "hub_cpu_us_per_reading")
    alone_cpu = mean("postgres_one", "hub_cpu_us_per_reading")
    apart_cpu = mean("sqlite_three", "hub_cpu_us_per_reading")
    last = cluster[-1]
    return {
        "rounds": len(cluster),
        "devices": last["devices"],
        "batch": last["batch"],
        "acked": sum(run["acked"] for run in cluster),
        "stored": sum(run["stored"] for run in cluster),
        "stored_per_s": round(mean("cluster", "stored_per_s")),
        "sqlite_stored_per_s": round(mean("sqlite", "stored_per_s")),
        "postgres_one_stored_per_s": round(mean("postgres_one", "stored_per_s")),
        "hub_cpu_us_per_reading": round(cluster_cpu, 2),
        "sqlite_hub_cpu_us_per_reading": round(sqlite_cpu, 2),
        "postgres_one_hub_cpu_us_per_reading": round(alone_cpu, 2),
        "sqlite_three_hub_cpu_us_per_reading": round(apart_cpu, 2),
        # The target: the same hubs at the same load, only the registry differs.
        "cpu_ratio_to_sqlite_three": round(cluster_cpu / apart_cpu, 3),
        "cpu_ratio_to_sqlite": round(cluster_cpu / sqlite_cpu, 3),
        "postgres_one_cpu_ratio_to_sqlite": round(alone_cpu / sqlite_cpu, 3),
        "sqlite_three_cpu_ratio_to_sqlite": round(apart_cpu / sqlite_cpu, 3),
        # The same over each whole run, ramp and drain included: comparable even when a
        # configuration had no sample with every device connected (`hub_cpu_windows`).
        "cpu_ratio_to_sqlite_whole_run": round(
            mean("cluster", "hub_cpu_us_per_reading_whole_run")
            / mean("sqlite", "hub_cpu_us_per_reading_whole_run"),
            3,
        ),
        "hub_cpu_us_per_reading_rounds": [run["hub_cpu_us_per_reading"] for run in cluster],
        "sqlite_hub_cpu_us_per_reading_rounds": [run["hub_cpu_us_per_reading"] for run in sqlite],
        "postgres_one_hub_cpu_us_per_reading_rounds": [
            run["hub_cpu_us_per_reading"] for run in alone
        ],
        "sqlite_three_hub_cpu_us_per_reading_rounds": [
            run["hub_cpu_us_per_reading"] for run in runs["sqlite_three"]
        ],
        "hub_cpu_windows": sorted({run["hub_cpu_window"] for one in runs.values() for run in one}),
        "all_stored": all(run["stored"] == run["acked"] for one in runs.values() for run in one),
        "ack_latency_steady_p99_ms": last["ack_latency_steady_p99_ms"],
        "sqlite_ack_latency_steady_p99_ms": sqlite[-1]["ack_latency_steady_p99_ms"],
        "hub_cpu_s": round(mean("cluster", "hub_cpu_s"), 2),
        "hub_peak_rss_mib": last["hub_peak_rss_mib"],
        "loadgen_cpu_s": round(mean("cluster", "loadgen_cpu_s"), 2),
        "influxdb_cpu_s": round(mean("cluster", "influxdb_cpu_s"), 2),
        "machine_busy_pct": round(
            statistics.fmean(run["machine_busy_pct"] for one in runs.values() for run in one)
        ),
        "other_cpu_s": round(mean("cluster", "other_cpu_s"), 2),
    }
