"""Helpers for the tests of a fleet: hubs behind a real HAProxy, devices that stream with acks.

`running_cluster` starts `device_sim.cluster.HubCluster` (three `hub serve` processes on one
PostgreSQL registry, HAProxy in front) and stops it by pid, failing unless every hub exits 0.
`FleetView` reads the registry the operator's way (`hub devices --json`, `hub nodes --json`)
and, where a test polls fast, through the operator's port in-process (`holders`).
The check that every acked reading is in InfluxDB is tests/support.py's
`assert_every_ack_stored`, as for the other fault tests.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_sim.cluster import HubCluster
from device_sim.local_servers import LocalServer
from hub.registry.postgres.operator import PostgresOperator
from tests.support import FAST_WRITES
from tests.test_postgres_hub import eventually, hub_command

FLEET_SETTINGS = {**FAST_WRITES, "HUB_REGISTRY_TIMEOUT_S": "1"}
"""The fault tests' hub variables, and a frozen PostgreSQL given up on after 1 s."""


@dataclass
class FleetView:
    """The registry of a running cluster, read as an operator reads it."""

    cluster: HubCluster
    operator: PostgresOperator

    @property
    def env(self) -> dict[str, str]:
        """The environment that points `hub` commands at the cluster's registry."""
        return {"HUB_REGISTRY_URL": self.cluster.registry_url}

    async def cli(self, *args: str) -> str:
        """`hub ARGS` on the cluster's registry; its stdout, failing on a non-zero exit."""
        run = await hub_command(*args, env=self.env)
        assert run.returncode == 0, f"`hub {' '.join(args)}` exited {run.returncode}:\n{run.stderr}"
        return run.stdout

    async def device_rows(self) -> dict[str, dict[str, Any]]:
        """`hub devices --json`, by device id."""
        rows = json.loads(await self.cli("devices", "--json"))
        return {row["device"]: row for row in rows}

    async def nodes(self) -> dict[str, dict[str, Any]]:
        """`hub nodes --json`, by node id."""
        return {row["node"]: row for row in json.loads(await self.cli("nodes", "--json"))}

    async def holders(self) -> dict[str, str]:
        """device id -> the node holding its connection, read in-process (fast polls)."""
        return await self.operator.holders()

    async def live_connections(self) -> dict[str, int]:
        """node id -> its live connections, as `hub nodes --json` shows them."""
        return {node: row["live_connections"] for node, row in (await self.nodes()).items()}

    async def reopen(self) -> None:
        """A new operator connection (after PostgreSQL was killed and started again)."""
        await self.operator.close()
        self.operator = await PostgresOperator.open(self.cluster.registry_url)

    async def wait_idle(self) -> None:
        """Wait until no hub holds a device (a test's devices all gone), so that HAProxy's
        leastconn starts the next test from equal hubs."""
        await eventually(self.holders, lambda held: not held, "devices still held", 20.0)


@asynccontextmanager
async def running_cluster(
    work_dir: Path,
    influx: LocalServer,
    database: str,
    registry_url: str,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[FleetView]:
    """Three hubs behind HAProxy on `registry_url` and the InfluxDB `database`, stopped by
    pid at the end; every hub must exit 0 and none may have logged a traceback."""
    # Migrates the schema once, before three hubs race to (they may; this is only faster).
    cluster = HubCluster(work_dir, influx, database, registry_url, env=env)
    view = FleetView(cluster, await PostgresOperator.open(registry_url))
    try:
        async with cluster:
            yield view
        codes = {hub.node_id: exit_status(hub.process.process) for hub in cluster.hubs}
    finally:
        await view.operator.close()
    assert set(codes.values()) == {0}, f"hub exit statuses {codes}\n{cluster.logs()[-6000:]}"
    assert "Traceback" not in cluster.logs(), cluster.logs()[-6000:]


def exit_status(process: subprocess.Popen[bytes] | None) -> int | None:
    """A finished process's exit status (None: never started, or still running)."""
    return None if process is None else process.poll()
