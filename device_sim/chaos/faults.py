"""Doing one planned fault to the real servers, holding it, undoing it, and what it showed.

Each fault ends with everything restored: a killed or drained hub started again on its state
directory (so it replays its spool) and healthy with every worker listening, PostgreSQL and
InfluxDB running and answering. The faults run one at a time: each one's effect (devices
moving, a spool filling and draining) is then its own to measure.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from device_sim.chaos.environment import Environment
from device_sim.chaos.fleet import ChaosFleet
from device_sim.chaos.plan import PUSH_INTERVAL_FACTORS, Fault, FaultKind
from schemas.codes import CloseCode

RECONNECT_WAIT_S = 60.0
"""How long, after a hub kill, to wait for its devices to connect again (elsewhere)."""
BROKE_WINDOW_S = 3.0
"""A device whose connection closed this soon after a hub kill was on that hub."""
WORKER_BACK_S = 60.0
REPLACED_WAIT_S = 10.0
"""How long a takeover waits for the device's own connection to be closed with 4000."""
READY_S = 60.0

Details = dict[str, Any]


async def apply(
    fault: Fault, env: Environment, fleet: ChaosFleet, base_interval_s: float
) -> Details:
    """Do `fault`, hold it, undo it; what it did and measured (JSON-friendly)."""
    if fault.kind is FaultKind.CONFIG_PUSH:
        interval = round(base_interval_s * PUSH_INTERVAL_FACTORS[fault.target], 3)
        return await fleet.push(env.registry_url, interval)
    if fault.kind is FaultKind.TAKEOVER:
        return await _takeover(fault, fleet)
    action = _ACTIONS[fault.kind]
    details = await action(fault, env, fleet)
    await wait_restored(env)
    return details


async def wait_restored(env: Environment) -> None:
    """Wait (bounded) until every hub is healthy with all its workers, and both servers run."""
    assert env.postgres is not None and env.influx is not None
    if not (env.postgres.running and env.influx.running):
        raise RuntimeError("PostgreSQL or InfluxDB is not running after its fault was undone")
    await asyncio.gather(*(hub.wait_ready(READY_S) for hub in env.hubs))
    env.note_workers()


async def restore(env: Environment) -> list[str]:
    """After a fault that failed midway: continue, start again, whatever is not running; what
    had to be done."""
    done: list[str] = []
    assert env.postgres is not None and env.influx is not None
    await asyncio.to_thread(env.postgres.resume)
    await asyncio.to_thread(env.influx.resume)
    if not env.postgres.running:
        await asyncio.to_thread(env.postgres.start)
        done.append("postgres started")
    if not env.influx.running:
        await asyncio.to_thread(env.influx.restart)
        done.append("influxdb started")
    for hub in env.hubs:
        process = hub.process.process
        if process is None or process.poll() is not None:
            await hub.process.start()
            done.append(f"{hub.node_id} started")
    await wait_restored(env)
    return done


async def _hub_kill(fault: Fault, env: Environment, fleet: ChaosFleet) -> Details:
    hub = env.single_hubs[fault.target]
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    await hub.process.kill()
    await asyncio.sleep(fault.hold_s)
    started = loop.time()
    await hub.process.start()
    details: Details = {"hub": hub.node_id, "restart_s": round(loop.time() - started, 3)}
    details.update(await _reconnects(fleet, killed_at))
    return details


async def _reconnects(fleet: ChaosFleet, killed_at: float) -> Details:
    """Wait (bounded) until every device cut by the kill connected again; how long it took."""
    loop = asyncio.get_running_loop()
    while True:
        times = fleet.reconnect_times(killed_at, BROKE_WINDOW_S)
        if None not in times or loop.time() - killed_at > RECONNECT_WAIT_S:
            break
        await asyncio.sleep(0.1)
    done = [t for t in times if t is not None]
    return {
        "devices_cut": len(times),
        "reconnected": len(done),
        "reconnect_max_s": round(max(done), 3) if done else None,
    }


async def _worker_kill(fault: Fault, env: Environment, fleet: ChaosFleet) -> Details:
    hub = env.workers_hub
    pids = hub.worker_pids()
    if not pids:
        raise RuntimeError(f"{hub.node_id} has no worker to kill")
    victim = pids[fault.target % len(pids)]
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + WORKER_BACK_S
    while victim in hub.worker_pids() or len(hub.worker_pids()) < hub.workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{hub.node_id}: worker {victim} not replaced in {WORKER_BACK_S} s")
        await asyncio.sleep(0.05)
    await hub.wait_ready(READY_S)
    details: Details = {
        "hub": hub.node_id,
        "pid": victim,
        "replaced_in_s": round(loop.time() - killed_at, 3),
    }
    details.update(await _reconnects(fleet, killed_at))
    return details


async def _hub_drain(fault: Fault, env: Environment, fleet: ChaosFleet) -> Details:
    hub = env.hubs[fault.target]
    loop = asyncio.get_running_loop()
    started = loop.time()
    status = await hub.process.stop()
    drained_s = loop.time() - started
    await asyncio.sleep(fault.hold_s)
    await hub.process.start()
    if status != 0:
        raise RuntimeError(f"{hub.node_id} exited {status} on SIGTERM:\n{hub.process.log[-3000:]}")
    return {"hub": hub.node_id, "exit_status": status, "drain_s": round(drained_s, 3)}


class _Server(Protocol):
    """What a freeze and a kill need of PostgreSQL's and InfluxDB's launchers."""

    def kill(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def restart(self) -> None: ...


async def _freeze(server: _Server, hold_s: float) -> Details:
    await asyncio.to_thread(server.pause)
    try:
        await asyncio.sleep(hold_s)
    finally:
        await asyncio.to_thread(server.resume)
    return {}


async def _kill(server: _Server, hold_s: float) -> Details:
    await asyncio.to_thread(server.kill)
    await asyncio.sleep(hold_s)
    started = time.monotonic()
    await asyncio.to_thread(server.restart)  # on the same port and data
    return {"restart_s": round(time.monotonic() - started, 3)}


def _postgres(env: Environment) -> _Server:
    assert env.postgres is not None
    return env.postgres


def _influx(env: Environment) -> _Server:
    assert env.influx is not None
    return env.influx


async def _takeover(fault: Fault, fleet: ChaosFleet) -> Details:
    device = fleet.devices[fault.target % len(fleet.devices)]
    replaced_before = device.close_codes.count(CloseCode.REPLACED)
    was_connected = device.connected
    details = await fleet.takeover(fault.target % len(fleet.devices))
    # The device's own connection, if it had one, is closed with 4000 (replaced).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REPLACED_WAIT_S
    while was_connected and loop.time() < deadline:
        if device.close_codes.count(CloseCode.REPLACED) > replaced_before:
            break
        await asyncio.sleep(0.05)
    details["was_connected"] = was_connected
    details["replaced"] = device.close_codes.count(CloseCode.REPLACED) > replaced_before
    return details


_ACTIONS: dict[FaultKind, Callable[[Fault, Environment, ChaosFleet], Awaitable[Details]]] = {
    FaultKind.HUB_KILL: _hub_kill,
    FaultKind.WORKER_KILL: _worker_kill,
    FaultKind.HUB_DRAIN: _hub_drain,
    FaultKind.POSTGRES_FREEZE: lambda fault, env, _: _freeze(_postgres(env), fault.hold_s),
    FaultKind.POSTGRES_KILL: lambda fault, env, _: _kill(_postgres(env), fault.hold_s),
    FaultKind.INFLUX_KILL: lambda fault, env, _: _kill(_influx(env), fault.hold_s),
    FaultKind.INFLUX_FREEZE: lambda fault, env, _: _freeze(_influx(env), fault.hold_s),
}
