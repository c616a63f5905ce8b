"""`hub serve --workers N` as a real process for tests: its supervisor's /healthz and
/metrics, which worker holds which slot, and waiting for all of them to listen."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from device_sim.hub_process import HubProcess
from device_sim.local_servers import LocalServer, free_port, http_request
from hub.workers.exposition import by_worker
from tests.support import FAST_WRITES as FAST
from tests.support import stored_times

__all__ = ["FAST", "WorkersHub", "stored_times"]

READY_S = 60.0


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
