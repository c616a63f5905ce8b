"""Watching a chaos run while it goes: what it did so far, each hub process's RSS every
second (each worker under its slot, each restart a new incarnation), the machine's load, and
a progress line every few seconds."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from device_sim.bench.procstat import sample
from device_sim.chaos.environment import Environment
from device_sim.chaos.fleet import ChaosFleet
from device_sim.chaos.memory import MemoryLog, format_rss
from device_sim.cluster import ClusterHub

SAMPLE_S = 1.0

Echo = Callable[[str], None]


@dataclass
class Progress:
    """What the progress line and the report read while the run goes on."""

    started: float
    faults: list[dict[str, Any]] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    slots: dict[int, str] = field(default_factory=dict)
    elapsed_s: float = 0.0
    started_pids: dict[int, str] = field(default_factory=dict)
    """Every server process seen running (pid -> name), for the report: all must be gone."""

    def note(self, env: Environment) -> None:
        """Remember every process of `env` now running."""
        for name, pid in env.processes().items():
            self.started_pids.setdefault(pid, name)
        if env.cluster is not None:
            for pid in env.workers_hub.worker_pids():
                self.started_pids.setdefault(pid, f"{env.workers_hub.node_id} worker")


async def sample_memory(env: Environment, memory: MemoryLog, progress: Progress) -> None:
    """Every second: each hub process's RSS (each worker under its slot), and the load."""
    loop = asyncio.get_running_loop()
    while True:
        at = loop.time() - progress.started
        progress.loads.append(os.getloadavg()[0])
        for hub in env.hubs:
            process = hub.process.process
            if process is None or process.poll() is not None:
                continue
            pids = [(hub.node_id if hub.workers == 1 else f"{hub.node_id}/sup", process.pid)]
            if hub.workers > 1:
                workers = hub.worker_pids()
                if any(pid not in progress.slots for pid in workers):
                    await _learn_slots(hub, progress)
                pids += [(progress.slots.get(pid, f"{hub.node_id}/w?"), pid) for pid in workers]
            for name, pid in pids:
                with contextlib.suppress(OSError):
                    rss = sample(pid).rss_bytes
                    if rss > 0:  # 0: killed, not yet reaped (a zombie has no memory)
                        memory.add(at, name, pid, rss)
        await asyncio.sleep(SAMPLE_S)


async def _learn_slots(hub: ClusterHub, progress: Progress) -> None:
    """Which worker slot each worker pid holds, from the supervisor's /healthz."""
    try:
        _, body = await asyncio.to_thread(hub.healthz)
    except (OSError, ValueError):
        return
    for slot, worker in body.get("workers", {}).items():
        if worker.get("pid"):
            progress.slots[int(worker["pid"])] = f"{hub.node_id}/w{slot}"


async def show_progress(
    fleet: ChaosFleet,
    memory: MemoryLog,
    progress: Progress,
    devices: int,
    every_s: float,
    echo: Echo,
) -> None:
    """A progress line every `every_s`: elapsed, faults, acks, connections, load, RSS."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every_s)
        stats = fleet.stats
        latest = sorted(memory.latest().items())
        echo(
            f"[{loop.time() - progress.started:7.1f} s] faults {len(progress.faults)} "
            f"acked {stats.acked} connected {stats.connected}/{devices} "
            f"{f'crashed {len(fleet.crashed)} ' if fleet.crashed else ''}"
            f"load {os.getloadavg()[0]:.1f} rss {format_rss(latest)}"
        )
