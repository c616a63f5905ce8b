"""The servers a benchmark runs against: InfluxDB, `hub serve` as its own process, tokens."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from device_sim.bench.procstat import ProcessSample, sample
from device_sim.device import Credentials
from device_sim.fleet import read_tokens
from device_sim.local_servers import LocalServer, create_database, free_port
from device_sim.sensors import SCHEMA_TOML

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


def provision(state_dir: Path, count: int, prefix: str) -> list[Credentials]:
    """Register `count` devices with `hub token add --count`, as an operator would."""
    out = state_dir.parent / f"tokens-{prefix.rstrip('-')}.csv"
    subprocess.run(
        [
            sys.executable, "-m", "hub", "token", "add",
            "--count", str(count), "--prefix", prefix,
            "--out", str(out), "--state-dir", str(state_dir),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return read_tokens(out)


class HubProcess:
    """`hub serve` in its own process, writing to one InfluxDB database."""

    def __init__(
        self,
        state_dir: Path,
        influx: LocalServer,
        database: str,
        environment: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.database = database
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.log_path = state_dir.parent / f"hub-{database}.log"
        schemas = state_dir.parent / "schemas.toml"
        schemas.write_text(SCHEMA_TOML)
        create_database(influx.url, database)
        self.argv = [
            sys.executable, "-m", "hub", "serve",
            "--state-dir", str(state_dir),
            "--port", str(self.port),
            "--influx-url", influx.url,
            "--influx-bucket", database,
            "--influx-api", "v1",
            "--schemas", str(schemas),
            "--health-port", "0",
        ]  # fmt: skip
        self.environment = {**os.environ, **(environment or {})}
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        """The hub's process id."""
        assert self.process is not None
        return self.process.pid

    def sample(self) -> ProcessSample:
        """The hub's CPU seconds and memory now."""
        return sample(self.pid)

    async def start(self) -> None:
        """Start the hub and wait until it accepts connections."""
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.environment
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.returncode is not None:
                raise RuntimeError(f"the hub exited; see {self.log_path}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the hub is not listening; see {self.log_path}") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return

    async def stop(self) -> None:
        """SIGTERM, and SIGKILL if it does not exit in time."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()
