"""`hub serve` and `hub token add` run the way an operator runs them: as real processes.

One place for the demo, the benchmark and the tests to start a hub (stopped by its process
id) and to provision devices.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from device_sim.device import Credentials
from device_sim.fleet import read_tokens
from device_sim.local_servers import LocalServer, free_port

PROCESS_START_S = 30.0
PROCESS_STOP_S = 20.0


def provision(
    state_dir: Path,
    count: int,
    prefix: str,
    out: Path | None = None,
    registry_url: str = "",
) -> list[Credentials]:
    """Register `count` devices with `hub token add --count`; their credentials from the CSV.
    In the SQLite registry of `state_dir`, or, given `registry_url`, in that one (then
    `state_dir` only places the CSV)."""
    out = out or state_dir.parent / f"tokens-{prefix.rstrip('-')}.csv"
    registry = ["--registry-url", registry_url] if registry_url else ["--state-dir", str(state_dir)]
    subprocess.run(
        [
            sys.executable, "-m", "hub", "token", "add",
            "--count", str(count), "--prefix", prefix, "--out", str(out), *registry,
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return read_tokens(out)


class HubProcess:
    """`hub serve` as a real child process on a free port; stopped by pid. `env` adds to
    (or overrides) the test's environment."""

    def __init__(
        self,
        state_dir: Path,
        influx: LocalServer,
        bucket: str,
        *args: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.bucket = bucket
        self.env = {**os.environ, **env} if env is not None else None
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.log_path = state_dir.parent / f"hub-{self.port}.log"
        self.argv = [
            sys.executable, "-m", "hub", "serve",
            "--state-dir", str(state_dir),
            "--port", str(self.port),
            "--influx-url", influx.url,
            "--influx-bucket", bucket,
            "--health-port", "0",
            *args,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The hub's process id."""
        assert self.process is not None
        return self.process.pid

    @property
    def log(self) -> str:
        """Everything the hub printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def launch(self) -> None:
        """Start the hub process without waiting for it."""
        with self.log_path.open("ab") as output:
            self.process = subprocess.Popen(
                self.argv, stdout=output, stderr=subprocess.STDOUT, env=self.env
            )

    async def start(self) -> None:
        """Start the hub and wait (bounded) until it accepts connections."""
        self.launch()
        assert self.process is not None
        deadline = time.monotonic() + PROCESS_START_S
        while True:
            assert self.process.poll() is None, f"hub exited early:\n{self.log}"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                assert time.monotonic() < deadline, f"hub not listening:\n{self.log}"
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return

    def signal(self, sig: signal.Signals) -> None:
        """Send a signal to the hub process."""
        assert self.process is not None
        os.kill(self.process.pid, sig)

    async def kill(self) -> None:
        """SIGKILL, as a crash or power loss would, and reap the process."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        await asyncio.to_thread(self.process.wait, PROCESS_STOP_S)

    async def stop(self) -> int:
        """SIGTERM, wait (bounded, SIGKILL after), return the exit status."""
        process = self.process
        if process is None or process.poll() is not None:
            return process.returncode if process else 0
        os.kill(process.pid, signal.SIGTERM)
        try:
            return await asyncio.to_thread(process.wait, PROCESS_STOP_S)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait, PROCESS_STOP_S)
            raise AssertionError(f"hub did not stop on SIGTERM:\n{self.log}") from None

    async def __aenter__(self) -> HubProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
