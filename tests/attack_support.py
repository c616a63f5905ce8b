"""What the attack tests share: a real `hub serve`, a well-behaved device measured while an
attack runs, raw sockets, the hub's metrics, and a bounded stop.

Every attack test replays its attack against a `hub serve` process over loopback and checks
three things: the attack is answered as the rule says, a well-behaved device keeps being
acked meanwhile (its ack latency measured, p99 printed and bounded, and fresh connections
of another device let in), and the hub stops within `shutdown_timeout_s` afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from device_sim.client import DeviceClient
from device_sim.device import Credentials
from device_sim.hub_process import HubProcess
from device_sim.local_servers import LocalServer
from hub.registry.sqlite import Registry

WAIT_S = 15.0
SHUTDOWN_TIMEOUT_S = 4.0
STOP_SLACK_S = 1.5
"""Beyond shutdown_timeout_s: interpreter teardown of a process on a loaded 2-core box."""
ACK_P99_BOUND_S = 0.5
"""The well-behaved device's ack latency p99 during an attack. Today's code fails it by
never acking or refusing the device; a loaded 2-core box meets it with a wide margin (the
measured figures are printed, typically a few milliseconds)."""
PROBE_INTERVAL_S = 0.02
READING = {"name": "attack_probe", "time": 1_700_000_000_000, "fields": {"value": 1.0}}

BASE_ENV = {
    "HUB_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_TIMEOUT_S),
    "HUB_PRESENCE_FLUSH_S": "0.1",
}


def upgrade_request(token: str | None, path: str = "/v1/ws") -> bytes:
    """A valid WebSocket upgrade request, with `token` as a bearer header if given."""
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def reset(sock: socket.socket) -> None:
    """Close `sock` with a TCP reset (SO_LINGER 0), as a crashed or hostile client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def raw_socket(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A blocking TCP connection to the hub from `source` (any 127/8 address is ours)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def closed_within(sock: socket.socket, limit_s: float) -> tuple[bool, bytes]:
    """Whether the hub closes `sock` within `limit_s`, and what it sent before."""
    received = b""
    deadline = time.monotonic() + limit_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return False, received
        except ConnectionError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


MIN_PROBE_ACKS = 20


@dataclass
class ProbeReport:
    """What the well-behaved devices saw during an attack."""

    ack_latencies_s: list[float] = field(default_factory=list)
    fresh_connections: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def p99_s(self) -> float:
        """The 99th percentile ack latency, in seconds."""
        ordered = sorted(self.ack_latencies_s)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else float("inf")

    def check(self, attack: str) -> None:
        """Print the figures and assert the well-behaved devices were served throughout."""
        print(
            f"\n{attack}: good device {len(self.ack_latencies_s)} acks, p99 "
            f"{self.p99_s * 1000:.1f} ms, max {max(self.ack_latencies_s, default=0) * 1000:.1f} "
            f"ms; {self.fresh_connections} fresh connections, {len(self.failures)} failures"
        )
        assert not self.failures, (
            f"{attack}: {len(self.failures)} failures, first: {self.failures[0][:300]}"
        )
        assert len(self.ack_latencies_s) >= MIN_PROBE_ACKS, f"{attack}: too few probe acks"
        assert self.fresh_connections >= 2, f"{attack}: too few fresh connections tried"
        assert self.p99_s <= ACK_P99_BOUND_S, f"{attack}: ack p99 {self.p99_s:.3f} s"


class GoodDevices:
    """Two well-behaved devices: `steady` streams one reading per PROBE_INTERVAL_S on one
    connection; `fresh` connects anew (connect, store, close) whenever the test asks."""

    def __init__(self, url: str, steady: Credentials, fresh: Credentials) -> None:
        self.url = url
        self.steady = steady
        self.fresh_device = fresh
        self.report = ProbeReport()
        self._stop = asyncio.Event()

    async def fresh(self) -> None:
        """One fresh connection of the `fresh` device: it must get in and be acked."""
        self.report.fresh_connections += 1
        try:
            async with (
                asyncio.timeout(WAIT_S),
                DeviceClient(self.url, self.fresh_device.token) as device,
            ):
                ack = await device.store([READING])
                if ack.accepted != 1:
                    self.report.failures.append(f"fresh ack {ack}")
        except Exception as exc:
            self.report.failures.append(f"fresh: {exc!r}")

    async def stream(self) -> None:
        """The steady device, until stopped."""
        async with DeviceClient(self.url, self.steady.token) as device:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    ack = await asyncio.wait_for(device.store([READING]), WAIT_S)
                except Exception as exc:
                    self.report.failures.append(f"steady: {exc!r}")
                    return
                self.report.ack_latencies_s.append(time.monotonic() - started)
                if ack.accepted != 1:
                    self.report.failures.append(f"steady ack {ack}")
                await asyncio.sleep(PROBE_INTERVAL_S)

    async def acks_reach(self, count: int) -> None:
        """Wait (bounded) until the steady device has `count` acks, or failed."""
        async with asyncio.timeout(WAIT_S):
            while len(self.report.ack_latencies_s) < count and not self.report.failures:
                await asyncio.sleep(PROBE_INTERVAL_S)


@contextlib.asynccontextmanager
async def good_devices(
    url: str, steady: Credentials, fresh: Credentials
) -> AsyncIterator[GoodDevices]:
    """The well-behaved devices, streaming before the block and until enough acks after it;
    one fresh connection before and one after."""
    good = GoodDevices(url, steady, fresh)
    task = asyncio.create_task(good.stream())
    try:
        await good.acks_reach(1)
        await good.fresh()
        yield good
        await good.fresh()
        await good.acks_reach(len(good.report.ack_latencies_s) + 5)
        await good.acks_reach(MIN_PROBE_ACKS)
    finally:
        good._stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, WAIT_S)


class AttackedHub(HubProcess):
    """`hub serve` started with BASE_ENV plus `env`, optionally with a low soft file limit
    (as systemd gives a unit without LimitNOFILE)."""

    def __init__(
        self,
        state_dir: Path,
        influx: LocalServer,
        bucket: str,
        env: Mapping[str, str] | None = None,
        soft_file_limit: int | None = None,
    ) -> None:
        super().__init__(state_dir, influx, bucket, env={**BASE_ENV, **(env or {})})
        self.soft_file_limit = soft_file_limit

    def launch(self) -> None:
        """Start the hub process, with the soft file limit lowered if asked."""
        limit = self.soft_file_limit

        def lower_limit() -> None:
            if limit is not None:
                _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

        with self.log_path.open("ab") as output:
            self.process = subprocess.Popen(
                self.argv, stdout=output, stderr=subprocess.STDOUT, env=self.env,
                preexec_fn=lower_limit,
            )  # fmt: skip

    async def metrics(self) -> dict[str, float]:
        """The hub's /metrics, as `name{labels}` -> value."""
        found = re.search(r"health and metrics at (http://\S+)/healthz", self.log)
        assert found, f"no health address in the log:\n{self.log}"
        timeout = aiohttp.ClientTimeout(total=WAIT_S)
        async with (
            aiohttp.ClientSession(timeout=timeout) as client,
            client.get(found.group(1) + "/metrics") as answer,
        ):
            text = await answer.text()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    async def metric_becomes(self, name: str, want: float) -> float:
        """Poll a metric until it equals `want` (bounded); its last value."""
        deadline = time.monotonic() + WAIT_S
        while True:
            value = (await self.metrics()).get(name, float("nan"))
            if value == want or time.monotonic() > deadline:
                return value
            await asyncio.sleep(0.05)

    def open_fds(self) -> int:
        """File descriptors the hub process holds now."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        """The hub process's resident memory, in KiB."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        found = re.search(r"VmRSS:\s+(\d+)", status)
        assert found, status
        return int(found.group(1))

    async def fds_back_to(self, limit: int) -> int:
        """Wait (bounded) until the hub holds at most `limit` descriptors; how many it holds."""
        deadline = time.monotonic() + WAIT_S
        while (held := self.open_fds()) > limit and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return held

    async def log_count(self, text: str, count: int) -> None:
        """Wait (bounded) until `text` appears `count` times in the hub's log."""
        async with asyncio.timeout(WAIT_S):
            while self.log.count(text) < count:
                await asyncio.sleep(0.05)

    async def stop_within(self, limit_s: float = SHUTDOWN_TIMEOUT_S) -> float:
        """SIGTERM; assert the process exits within `limit_s` (plus STOP_SLACK_S); seconds taken.
        Killed by its pid if it does not."""
        assert self.process is not None and self.process.poll() is None, self.log
        started = time.monotonic()
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            status = await asyncio.to_thread(self.process.wait, limit_s + STOP_SLACK_S)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            await asyncio.to_thread(self.process.wait, WAIT_S)
            raise AssertionError(f"hub did not stop within {limit_s} s of SIGTERM") from None
        elapsed = time.monotonic() - started
        print(f"hub stopped {elapsed:.2f} s after SIGTERM (shutdown_timeout_s {limit_s})")
        assert status == 0, f"hub exited with {status}:\n{self.log[-3000:]}"
        return elapsed


@dataclass
class Devices:
    """The attacker's device and two well-behaved ones, registered with `hub token add`."""

    bad: Credentials
    steady: Credentials
    fresh: Credentials


def register(state_dir: Path) -> Devices:
    """Register the attack's three devices in `state_dir` (in-process, so that the token
    leak watch knows their tokens)."""
    registry = Registry(state_dir / "registry.sqlite3")
    ids = ["atk-bad", "atk-steady", "atk-fresh"]
    try:
        tokens = registry.add_many(ids)
    finally:
        registry.close()
    bad, steady, fresh = (Credentials(d, t) for d, t in zip(ids, tokens, strict=True))
    return Devices(bad, steady, fresh)


def hub_command(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a `hub` operator command on `state_dir`, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "hub", *args, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
