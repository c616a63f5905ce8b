"""The whole chaos run: servers up, devices streaming, faults one after another with a pause
between them, progress lines, then everything restored, the devices stopped, InfluxDB checked
for every acked reading, the report written, and every process stopped by its pid.

The run never ends before every kind of fault happened once (the plan's first round), so a
short run still covers them all; after that it starts no new fault once `duration_s` passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from device_sim.chaos.environment import DB, Environment
from device_sim.chaos.faults import apply, restore, wait_restored
from device_sim.chaos.fleet import ChaosFleet
from device_sim.chaos.memory import MemoryLog
from device_sim.chaos.plan import FaultKind, FaultPlan, Targets, Timing
from device_sim.chaos.report import (
    checks,
    faults_by_kind,
    push_figures,
    reconnect_figures,
    traceback_logs,
)
from device_sim.chaos.verify import loss_summary, missing_readings
from device_sim.chaos.watch import Echo, Progress, sample_memory, show_progress
from device_sim.device import DeviceOptions, DeviceReport
from device_sim.local_servers import ServerError

FAULT_TIMEOUT_S = 240.0
"""A fault (do, hold, undo, wait for the devices) taking longer than this failed."""
CONNECT_WAIT_S = 60.0


@dataclass(frozen=True)
class ChaosOptions:
    """What `device-sim chaos` was asked for."""

    duration_s: float
    out_dir: Path
    seed: int
    devices: int = 100
    rate: float = 1.0
    batch: int = 10
    timing: Timing = field(default_factory=Timing)
    progress_s: float = 5.0
    converge_s: float = 120.0
    """After the devices stopped: how long InfluxDB may take to hold every acked reading."""
    reconnect_bound_s: float = 10.0

    @property
    def rss_min_life_s(self) -> float:
        """A process incarnation shorter than this is not judged flat or not."""
        return min(300.0, max(20.0, self.duration_s / 2))


async def run_chaos(options: ChaosOptions, echo: Echo) -> tuple[bool, dict[str, Any]]:
    """Run it; whether every check held, and the report (also written to `out_dir`)."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    if main is not None:  # a SIGTERM ends the run like Ctrl-C: cleaned up, by pid
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    env = Environment(options.out_dir / "servers")
    memory = MemoryLog(options.rss_min_life_s)
    progress = Progress(loop.time())
    background: list[asyncio.Task[None]] = []
    echo(f"chaos: seed {options.seed}, {options.devices} devices, {options.duration_s:g} s; "
         f"repeat with --seed {options.seed}; files under {options.out_dir}")  # fmt: skip
    stop_problems: list[str] = []
    partial: dict[str, Any] | None = None
    try:
        await env.start()
        echo(f"servers up: {env.processes()}")
        progress.note(env)
        credentials = await asyncio.to_thread(env.provision, options.devices)
        device_options = DeviceOptions(
            rate=options.rate, batch=options.batch, backoff_cap_s=5.0, final_wait_s=30.0
        )
        assert env.cluster is not None
        fleet = ChaosFleet(env.cluster.url, credentials, device_options)
        fleet.start(loop.time() + 10 * options.duration_s + 3600)
        background.append(asyncio.create_task(sample_memory(env, memory, progress)))
        background.append(
            asyncio.create_task(
                show_progress(fleet, memory, progress, options.devices, options.progress_s, echo)
            )
        )
        await _until_connected(fleet, options.devices)
        await _faults(options, env, fleet, progress, echo)
        await restore(env)
        echo("every server restored; stopping the devices")
        reports = await fleet.stop()
        acked = {
            r.device_id: set(r.acked_times_ns()) | set(fleet.extra_acked_ns.get(r.device_id, []))
            for r in reports
        }
        assert env.influx is not None
        missing = await missing_readings(env.influx, DB, acked, options.converge_s)
        logs = [(hub.node_id, hub.process.log) for hub in env.hubs]
    except BaseException as exc:
        # Cut short (Ctrl-C, SIGTERM, a server that would not come back): what happened so
        # far goes to the report all the same, then the error goes on up.
        partial = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:3000],
                   "seed": options.seed, "faults": progress.faults}  # fmt: skip
        raise
    finally:
        for task in background:
            task.cancel()
        with contextlib.suppress(RuntimeError, ValueError, StopIteration):
            progress.note(env)
        stop_problems = await env.close()
        if stop_problems:
            echo(f"stopping: {'; '.join(stop_problems)}")
        if partial is not None:
            partial["processes"] = _pids(progress)
            (options.out_dir / "chaos.json").write_text(json.dumps(partial, indent=2) + "\n")
    progress.elapsed_s = loop.time() - progress.started
    report = _report(options, progress, memory, fleet, reports, missing, acked, logs, stop_problems)
    path = options.out_dir / "chaos.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for name, check in report["checks"].items():
        echo(f"{'ok  ' if check['ok'] else 'FAIL'} {name}: {check['detail']}")
    echo(f"report: {path}")
    return report["ok"], report


async def _until_connected(fleet: ChaosFleet, count: int) -> None:
    """Wait (bounded) until every device connected once: faults start on a full fleet."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_WAIT_S
    # A shared counter, not an event: polled.
    while fleet.stats.connected < count and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)


async def _faults(
    options: ChaosOptions, env: Environment, fleet: ChaosFleet, progress: Progress, echo: Echo
) -> None:
    """Fault after fault, each with its pause after it, until the duration passed (and every
    kind happened once)."""
    loop = asyncio.get_running_loop()
    targets = Targets(
        single_hubs=len(env.single_hubs),
        all_hubs=len(env.hubs),
        workers=env.workers_hub.workers,
        devices=len(fleet.devices),
    )
    plan = FaultPlan(options.seed, targets, options.timing)
    base_interval = 1 / options.rate if options.rate > 0 else 1.0
    while True:
        elapsed = loop.time() - progress.started
        if elapsed >= options.duration_s and len(progress.faults) >= len(FaultKind):
            return
        fault = plan.next_fault()
        record: dict[str, Any] = {
            **asdict(fault),
            "kind": str(fault.kind),
            "at_s": round(elapsed, 1),
        }
        echo(f"[{elapsed:7.1f} s] fault {fault.number}: {fault.kind} target {fault.target} "
             f"hold {fault.hold_s:g} s")  # fmt: skip
        began = loop.time()
        try:
            details = await asyncio.wait_for(
                apply(fault, env, fleet, base_interval), FAULT_TIMEOUT_S
            )
            record.update(details, ok=True)
        except (RuntimeError, AssertionError, OSError, ServerError, TimeoutError) as exc:
            record.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:3000])
            echo(f"fault {fault.number} failed: {record['error'][:500]}")
            record["restored"] = await restore(env)
        record["took_s"] = round(loop.time() - began, 3)
        progress.faults.append(record)
        await wait_restored(env)
        progress.note(env)
        await asyncio.sleep(fault.pause_s)


def _report(
    options: ChaosOptions,
    progress: Progress,
    memory: MemoryLog,
    fleet: ChaosFleet,
    reports: list[DeviceReport],
    missing: dict[str, list[int]],
    acked: dict[str, set[int]],
    logs: list[tuple[str, str]],
    stop_problems: list[str],
) -> dict[str, Any]:
    loss = loss_summary(missing)
    total_acked = sum(len(times) for times in acked.values())
    found = checks(
        lost=int(str(loss["lost"])),
        acked=total_acked,
        faults=progress.faults,
        memory=memory,
        devices=reports,
        reconnect_bound_s=options.reconnect_bound_s,
        stop_problems=stop_problems,
        tracebacks=traceback_logs(logs),
        crashed=fleet.crashed,
    )
    loads = progress.loads or [0.0]
    configs = sum(len(r.configs_applied) for r in reports)
    return {
        "ok": all(c.ok for c in found),
        "checks": {c.name: c.to_json() for c in found},
        "seed": options.seed,
        "command": f"device-sim chaos --duration {options.duration_s:g} --devices "
        f"{options.devices} --seed {options.seed} --hold {options.timing.hold_s:g} "
        f"--pause {options.timing.pause_s:g}",
        "options": {**asdict(options), "out_dir": str(options.out_dir)},
        "elapsed_s": round(progress.elapsed_s, 1),
        "load_1m": {
            "min": min(loads),
            "mean": round(sum(loads) / len(loads), 2),
            "max": max(loads),
        },
        "acked": total_acked,
        "lost": loss,
        "fleet": {
            "sent": sum(r.sent for r in reports),
            "resent": sum(r.resent for r in reports),
            "reconnects": sum(r.reconnects for r in reports),
            "failed_connects": sum(r.failed_connects for r in reports),
            "configs_applied": configs,
            "close_codes": _close_codes(reports),
            "crashed": fleet.crashed,
        },
        "faults_by_kind": faults_by_kind(progress.faults),
        "reconnect_after_kills": reconnect_figures(progress.faults),
        "pushes": push_figures(progress.faults),
        "memory": memory.summary(),
        "faults": progress.faults,
        "processes": _pids(progress),
    }


def _pids(progress: Progress) -> list[dict[str, Any]]:
    """Every server process the run saw, each stopped by now."""
    return [{"pid": pid, "name": name} for pid, name in sorted(progress.started_pids.items())]


def _close_codes(reports: list[DeviceReport]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for report in reports:
        for code in report.close_codes:
            counts[str(code)] = counts.get(str(code), 0) + 1
    return dict(sorted(counts.items()))
