"""Each worker of `hub serve --workers 2` on a PostgreSQL registry is a node of its own.

Found by `device-sim chaos`: the workers registered under the hub's node id, so a worker
restarted by its supervisor registered that id again, which released every device of its
sibling too, and the sibling's safety net then closed all of them with 4000 (replaced).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from device_sim.cluster import HubCluster
from device_sim.local_servers import LocalServer
from device_sim.servers.postgres import PostgresDatabase
from tests.packages import ensure_haproxy

pytestmark = pytest.mark.e2e

WAIT_S = 60.0


def nodes(registry_url: str) -> dict[str, dict[str, Any]]:
    """`hub nodes --json`, by node id."""
    result = subprocess.run(
        [sys.executable, "-m", "hub", "nodes", "--json", "--registry-url", registry_url],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return {row["node"]: row for row in json.loads(result.stdout)}


async def until(what: str, condition: Any) -> Any:
    """Poll `condition()` (off the loop) until it gives something true; fail after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        value = await asyncio.to_thread(condition)
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_each_worker_registers_its_own_node_and_keeps_it_across_a_sibling_restart(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str, postgres_db: PostgresDatabase
) -> None:
    """`hub nodes` lists hub-1/1 and hub-1/2 (not hub-1); after worker 2 is SIGKILLed and
    restarted, worker 1 is still the same registration and nobody re-used its id."""
    ensure_haproxy()
    cluster = HubCluster(
        tmp_path, influxdb, influx_db_name, postgres_db.dsn, count=1, worker_counts=[2]
    )
    async with cluster:
        hub = cluster.hubs[0]
        before = await until(
            "both workers' nodes",
            lambda: (found := nodes(postgres_db.dsn)).keys() >= {"hub-1/1", "hub-1/2"} and found,
        )
        assert "hub-1" not in before, before
        _, health = hub.healthz()
        victim = int(health["workers"]["2"]["pid"])
        os.kill(victim, signal.SIGKILL)
        await until(
            "worker 2 replaced and listening",
            lambda: victim not in hub.worker_pids() and hub.all_listening(),
        )
        after = await until(
            "worker 2 registered again",
            lambda: (
                (found := nodes(postgres_db.dsn))["hub-1/2"]["started_at"]
                != before["hub-1/2"]["started_at"]
                and found
            ),
        )
        assert after["hub-1/1"]["started_at"] == before["hub-1/1"]["started_at"]
        assert after["hub-1/1"]["live"] and after["hub-1/2"]["live"], after
        assert "registered by another process" not in hub.process.log, hub.process.log[-3000:]
