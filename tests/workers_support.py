"""`hub serve --workers N` as a real process for tests: its supervisor's /healthz and
/metrics, which worker holds which slot, and waiting for all of them to listen."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from device_sim.hub_process import HubProcess
from device_sim.local_servers import LocalServer, free_port, http_request, influxql, quote_string
from hub.workers.exposition import by_worker

READY_S = 60.0
FAST = {
    "HUB_FLUSH_INTERVAL_S": "0.02",
    "HUB_WRITE_DEADLINE_S": "1",
    "HUB_RETRY_INITIAL_S": "0.1",
    "HUB_RETRY_MAX_S": "1",
    "HUB_SHUTDOWN_TIMEOUT_S": "5",
    "HUB_LOG_LEVEL": "INFO",
}


class WorkersHub(HubProcess):
    """`hub serve --workers N` on a free port, its health listener on another."""

    def __init__(
        self, state_dir: Path, influx: LocalServer, bucket: str, workers: int, *args: str
    ) -> None:
        self.health_port = free_port()
        self.workers = workers
        super().__init__(
            state_dir, influx, bucket,
            "--workers", str(workers), "--health-port", str(self.health_port), *args,
            env=FAST,
        )  # fmt: skip

    def healthz(self) -> dict[str, Any]:
        """The supervisor's /healthz body (whatever its status)."""
        _, body = http_request(f"http://127.0.0.1:{self.health_port}/healthz", timeout=5)
        answer: dict[str, Any] = json.loads(body)
        return answer

    def metrics(self) -> dict[str, dict[str, float]]:
        """Per metric name (a few), each worker's value: {"hub_connections": {"1": 3.0}}."""
        _, body = http_request(f"http://127.0.0.1:{self.health_port}/metrics", timeout=5)
        names = ("hub_connections", "hub_worker_up", "hub_worker_restarts_total",
                 "hub_readings_stored_total")  # fmt: skip
        return {name: by_worker(body.decode(), name) for name in names}

    def worker_pids(self) -> dict[int, int | None]:
        """Each slot's process id, as the supervisor says."""
        return {int(k): v.get("pid") for k, v in self.healthz()["workers"].items()}

    async def until(self, what: str, condition: Any, timeout_s: float = READY_S) -> None:
        """Poll `condition()` (errors count as false) until it holds, or fail with the log."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process is not None and self.process.poll() is None, (
                f"hub exited while waiting for {what}:\n{self.log[-4000:]}"
            )
            try:
                if condition():
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.log[-4000:]}"
            await asyncio.sleep(0.1)

    def all_listening(self) -> bool:
        """Every worker answers healthy."""
        return int(self.healthz()["workers_healthy"]) == self.workers

    async def start(self) -> None:
        """Start, and wait until every worker listens."""
        await super().start()
        await self.until("every worker to listen", self.all_listening)


def stored_times(influx: LocalServer, db: str, device_id: str) -> set[int]:
    """Timestamps (ns) of a device's `environment` readings in InfluxDB."""
    rows = influxql(
        influx.url,
        db,
        f'SELECT "temperature" FROM "environment" WHERE "device" = {quote_string(device_id)}',
    )
    return {int(row["time"]) for row in rows}
