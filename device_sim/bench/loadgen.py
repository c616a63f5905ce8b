"""Load generator worker processes: simulated devices outside the benchmark's own process.

The parent starts `python -m device_sim.bench.loadgen`, writes one JSON job line to its
stdin and reads JSON lines from its stdout: a `progress` line every `PROGRESS_S` (counters
and the ack latencies since the previous line) and one `final` line. Writing `stop` to its
stdin ends the run early, as the fleet's stop event. Jobs:

* `fleet`: `run_fleet` against the hub, the devices of `device_sim.device`;
* `http`: the same devices without a hub, each POSTing its readings as line protocol
  straight to InfluxDB's `/write` over its own keep-alive connection.

Every worker starts its devices at the wall-clock `start_at` of the job, so several workers
begin together, after their imports.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

import aiohttp

from device_sim.device import Credentials, DeviceOptions
from device_sim.fleet import run_fleet
from device_sim.sensors import MEASUREMENT, SensorProfile
from device_sim.stats import FleetStats, LatencyHistogram
from hub.core.lineprotocol import format_point  # the devices format line protocol like the hub
from hub.ops.runtime import run_event_loop, tune_garbage_collector

PROGRESS_S = 0.5
STDOUT_LIMIT = 64 * 2**20


@dataclass
class Job:
    """What one worker runs."""

    kind: str
    url: str
    credentials: list[tuple[str, str]]
    rate: float
    batch: int
    duration: float
    start_at: float
    options: dict[str, Any] = field(default_factory=dict)
    database: str = ""

    def to_json(self) -> str:
        """One line of JSON."""
        return json.dumps(self.__dict__)


# --- The worker ----------------------------------------------------------------------------


def _emit(out: IO[str], message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


async def _report_progress(stats: FleetStats, out: IO[str]) -> None:
    while True:
        await asyncio.sleep(PROGRESS_S)
        _emit(
            out,
            {
                "progress": stats.counters(),
                "first_ack_at": stats.first_ack_at,
                "last_ack_at": stats.last_ack_at,
                "latency": stats.take_recent().to_json(),
            },
        )


async def _watch_stdin(commands: asyncio.StreamReader, stop: asyncio.Event) -> None:
    while True:
        line = await commands.readline()
        if not line or line.strip() == b"stop":
            stop.set()
            return


async def _fleet(job: Job, stats: FleetStats, stop: asyncio.Event) -> dict[str, Any]:
    report = await run_fleet(
        job.url,
        [Credentials(*pair) for pair in job.credentials],
        rate=job.rate,
        batch=job.batch,
        duration=job.duration,
        stop=stop,
        stats=stats,
        options=DeviceOptions(record_times=False),
        **job.options,
    )
    return {
        "summary": report.summary(),
        "connected_at": [d.first_connected_at for d in report.devices.values()],
        "first_ack_at": [d.first_ack_at for d in report.devices.values()],
    }


async def _http_device(
    session: aiohttp.ClientSession,
    job: Job,
    device_id: str,
    stats: FleetStats,
    stop: asyncio.Event,
    deadline: float,
) -> None:
    """One device writing straight to InfluxDB: a POST of `batch` lines per message."""
    rng = random.Random(device_id)
    sensor = SensorProfile(rng, f"room-{rng.randrange(1, 40)}")
    tags = {"device": device_id, "room": sensor.room}
    await asyncio.sleep(rng.uniform(0, min(1.0, 1 / job.rate)))
    url = f"{job.url}/write?db={job.database}&precision=u"
    stats.connected += 1  # sending: the benchmark's steady state starts when all are
    try:
        await _post_until(session, url, job, sensor, tags, stats, stop, deadline)
    finally:
        stats.connected -= 1


async def _post_until(
    session: aiohttp.ClientSession,
    url: str,
    job: Job,
    sensor: SensorProfile,
    tags: dict[str, str],
    stats: FleetStats,
    stop: asyncio.Event,
    deadline: float,
) -> None:
    loop = asyncio.get_running_loop()
    interval = 1 / job.rate
    next_send, last_us = loop.time(), 0
    while not stop.is_set() and loop.time() < deadline:
        now_us = time.time_ns() // 1000
        lines = []
        for index in range(job.batch):
            last_us = max(now_us - (job.batch - 1 - index), last_us + 1)
            reading = sensor.reading(last_us)
            lines.append(format_point(MEASUREMENT, tags, reading["fields"], last_us))
        body = "\n".join(lines).encode()
        stats.sent += job.batch
        stats.in_flight += job.batch
        sent_at = loop.time()
        try:
            async with session.post(url, data=body) as response:
                await response.read()
                ok = response.status == 204
        except (aiohttp.ClientError, OSError, TimeoutError):
            ok = False
        if ok:
            stats.ack(job.batch, 0, (loop.time() - sent_at) * 1000)
        else:
            stats.in_flight -= job.batch
            stats.failed_connects += 1
        next_send = max(next_send + interval, loop.time())
        await asyncio.sleep(next_send - loop.time())


async def _http(job: Job, stats: FleetStats, stop: asyncio.Event) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + job.duration
    started = loop.time()
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in job.credentials
    ]
    try:
        await asyncio.gather(
            *(
                _http_device(session, job, device_id, stats, stop, deadline)
                for session, (device_id, _) in zip(sessions, job.credentials, strict=True)
            )
        )
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    elapsed = loop.time() - started
    return {
        "summary": {
            "devices": len(job.credentials),
            "elapsed_s": elapsed,
            **stats.counters(),
        }
    }


async def work(job: Job, commands: asyncio.StreamReader, out: IO[str]) -> None:
    """Run one job, reporting progress on `out`; a `stop` line on `commands` ends it early."""
    stats = FleetStats()
    stop = asyncio.Event()
    await asyncio.sleep(max(0.0, job.start_at - time.time()))
    tasks = [
        asyncio.create_task(_report_progress(stats, out)),
        asyncio.create_task(_watch_stdin(commands, stop)),
    ]
    try:
        result = await (_fleet if job.kind == "fleet" else _http)(job, stats, stop)
    finally:
        for task in tasks:
            task.cancel()
    times = os.times()
    _emit(
        out,
        {
            "final": result,
            "progress": stats.counters(),
            "first_ack_at": stats.first_ack_at,
            "last_ack_at": stats.last_ack_at,
            "latency": stats.take_recent().to_json(),
            "cpu_s": times.user + times.system,
        },
    )


async def _main() -> None:
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader(limit=STDOUT_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    job = Job(**json.loads(await commands.readline()))
    await work(job, commands, sys.stdout)


def main() -> None:
    """Read the job from stdin, run it, exit."""
    tune_garbage_collector()
    try:
        run_event_loop(_main())
    except BrokenPipeError:
        # The benchmark stopped reading (it was stopped itself): nobody to report to. Point
        # stdout at /dev/null so that the interpreter's last flush does not fail again
        # (the recipe of Python's signal module documentation, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


# --- The parent's side ---------------------------------------------------------------------


@dataclass
class Worker:
    """A running worker process, as the benchmark sees it."""

    process: asyncio.subprocess.Process
    counters: dict[str, int] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    """Since the last `take_latency()`."""
    latency_total: LatencyHistogram = field(default_factory=LatencyHistogram)
    final: dict[str, Any] | None = None
    cpu_s: float = 0.0
    first_ack_at: float = 0.0
    last_ack_at: float = 0.0

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self.process.pid

    async def read(self) -> None:
        """Take in its lines until it exits."""
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            message = json.loads(line)
            self.counters = message["progress"]
            self.first_ack_at = message["first_ack_at"]
            self.last_ack_at = message["last_ack_at"]
            latency = LatencyHistogram.from_json(message["latency"])
            self.latency.merge(latency)
            self.latency_total.merge(latency)
            if "final" in message:
                self.final = message["final"]
                self.cpu_s = message["cpu_s"]
        await self.process.wait()

    def take_latency(self) -> LatencyHistogram:
        """Latencies received since the last call."""
        latency, self.latency = self.latency, LatencyHistogram()
        return latency

    async def stop(self) -> None:
        """Ask it to end early (it still drains, bounded)."""
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.write(b"stop\n")
            await self.process.stdin.drain()


async def start_worker(job: Job) -> Worker:
    """Start one worker process on `job`."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "device_sim.bench.loadgen",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=STDOUT_LIMIT,
    )
    assert process.stdin is not None
    process.stdin.write(job.to_json().encode() + b"\n")
    await process.stdin.drain()
    return Worker(process)


if __name__ == "__main__":
    main()
