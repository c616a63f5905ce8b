"""Loopback ports for the suite's servers: each parallel runner its own range.

scripts/test.sh runs the integration layer in parallel runners (pytest-xdist workers
`gw0`, `gw1`, ...). Each takes its ports from a range of its own (`DEVICE_SIM_PORTS`, read
by `device_sim.local_servers.free_port`), below Linux's ephemeral range: no two runners can
pick the same port between choosing it and their server binding it, and no outgoing
connection of the thousands the tests open holds one of them. A run without xdist is runner
0. An operator's own `DEVICE_SIM_PORTS` is kept (and shared by the runners).
"""

from __future__ import annotations

import os
from pathlib import Path

from device_sim.local_servers import PORTS_ENV

FIRST_PORT = 12_000
PORTS_PER_RUNNER = 2_000
SET_BY_SUITE = "SENSOR_HUB_TEST_PORTS"
"""Set beside `DEVICE_SIM_PORTS` when the suite chose the range (not the operator)."""
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def runner_index(worker: str | None) -> int:
    """0 for `gw0` or no worker, 1 for `gw1`, ..."""
    if not worker or not worker.startswith("gw") or not worker[2:].isdigit():
        return 0
    return int(worker[2:])


def runner_port_range(index: int, ephemeral_low: int) -> tuple[int, int]:
    """The ports of runner `index`, all below `ephemeral_low`."""
    low = FIRST_PORT + index * PORTS_PER_RUNNER
    high = low + PORTS_PER_RUNNER - 1
    if high >= ephemeral_low:
        raise RuntimeError(
            f"runner {index} would take ports {low}-{high}, into the ephemeral range from "
            f"{ephemeral_low}: run fewer runners (scripts/test.sh: HUB_TEST_RUNNERS)"
        )
    return low, high


def ephemeral_low() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def claim_runner_ports() -> None:
    """Set `DEVICE_SIM_PORTS` for this runner (and the processes it starts).

    The xdist controller sets it too (it imports the conftest before it knows of runners)
    and its runners inherit its environment: so a value the suite set is replaced in each
    runner, marked by `SET_BY_SUITE`; only an operator's own is kept."""
    if os.environ.get(PORTS_ENV) and not os.environ.get(SET_BY_SUITE):
        return
    low, high = runner_port_range(
        runner_index(os.environ.get("PYTEST_XDIST_WORKER")), ephemeral_low()
    )
    os.environ[PORTS_ENV] = f"{low}-{high}"
    os.environ[SET_BY_SUITE] = "1"
