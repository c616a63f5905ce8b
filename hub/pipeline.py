"""The write pipeline: batches points from every connection and writes them to a sink.

Connections `submit` the lines of one message and get a future that completes once those
lines are durable. Batches are sealed by size or age and written by a few workers at once;
transient failures are retried with capped exponential backoff and full jitter (or the
server's `Retry-After`), permanent ones go to the dead-letter file. `submit` waits while the
pipeline holds `max_pending_readings`, which stops connections from reading: memory stays
bounded while InfluxDB is away, and devices feel TCP backpressure instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from hub.errors import PermanentWriteError, TransientWriteError
from hub.influx import Sink
from hub.settings import Settings

log = logging.getLogger("hub.pipeline")


@dataclass
class PipelineCounters:
    """What the pipeline has done since start."""

    points_written: int = 0
    batches_written: int = 0
    retries: int = 0
    dead_lettered_points: int = 0


@dataclass(eq=False)
class _Batch:
    chunks: list[str] = field(default_factory=list)
    count: int = 0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class DeadLetterFile:
    """Batches InfluxDB refused for good, with its reason, one JSON object a line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, body: bytes, error: PermanentWriteError) -> None:
        """Append and fsync one refused batch."""
        record = {
            "time": time.time(),
            "status": error.status,
            "reason": error.reason,
            "lines": body.decode("utf-8").split("\n"),
        }
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)


class Pipeline:
    """Batching, concurrent writes, retries and backpressure in front of one sink."""

    def __init__(self, sink: Sink, dead_letters: DeadLetterFile, settings: Settings) -> None:
        self.sink = sink
        self.settings = settings
        self.counters = PipelineCounters()
        self._dead_letters = dead_letters
        self._current: _Batch | None = None
        self._sealed: asyncio.Queue[_Batch] = asyncio.Queue()
        self._pending = 0
        self._room = asyncio.Condition()
        self._workers: list[asyncio.Task[None]] = []
        self._failing = False

    @property
    def pending(self) -> int:
        """Readings submitted and not yet durable."""
        return self._pending

    def start(self) -> None:
        """Start the write workers."""
        self._workers = [
            asyncio.create_task(self._work(), name=f"writer-{n}")
            for n in range(self.settings.max_inflight_writes)
        ]

    async def submit(self, lines: str, count: int) -> asyncio.Future[None]:
        """Queue `count` points (newline-separated `lines`); the future completes when durable.

        Waits while the pipeline is full. One message larger than the whole limit is let in
        alone rather than never.
        """
        limit = self.settings.max_pending_readings
        async with self._room:
            await self._room.wait_for(lambda: self._pending == 0 or self._pending + count <= limit)
            self._pending += count
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch = self._current
        if batch is None:
            batch = self._current = _Batch()
            asyncio.get_running_loop().call_later(
                self.settings.flush_interval_s, self._seal_if_current, batch
            )
        batch.chunks.append(lines)
        batch.count += count
        batch.waiters.append(done)
        if batch.count >= self.settings.batch_size:
            self._seal_if_current(batch)
        return done

    def flush(self) -> None:
        """Seal the open batch now instead of waiting for its age."""
        if self._current is not None:
            self._seal_if_current(self._current)

    async def drain(self) -> None:
        """Flush and wait until everything submitted so far is durable."""
        self.flush()
        async with self._room:
            await self._room.wait_for(lambda: self._pending == 0)

    async def close(self) -> None:
        """Stop the workers (unwritten batches stay unacknowledged) and close the sink."""
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self.sink.close()

    def _seal_if_current(self, batch: _Batch) -> None:
        if self._current is batch:
            self._current = None
            self._sealed.put_nowait(batch)

    async def _work(self) -> None:
        while True:
            batch = await self._sealed.get()
            try:
                await self._write(batch)
            except BaseException as exc:
                for waiter in batch.waiters:
                    if not waiter.done():
                        waiter.set_exception(exc if isinstance(exc, Exception) else RuntimeError())
                await self._release(batch.count)
                raise
            for waiter in batch.waiters:
                if not waiter.done():
                    waiter.set_result(None)
            await self._release(batch.count)

    async def _release(self, count: int) -> None:
        async with self._room:
            self._pending -= count
            self._room.notify_all()

    async def _write(self, batch: _Batch) -> None:
        body = "\n".join(batch.chunks).encode("utf-8")
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                await self.sink.write(body)
            except TransientWriteError as exc:
                delay = self._backoff(attempt, exc.retry_after)
                self._note_failure(exc, delay)
                self.counters.retries += 1
                attempt += 1
                await asyncio.sleep(delay)
                continue
            except PermanentWriteError as exc:
                self._dead_letters.append(body, exc)
                self.counters.dead_lettered_points += batch.count
                log.error(
                    "InfluxDB refused a batch of %d points for good (%s); kept in %s",
                    batch.count,
                    exc,
                    self._dead_letters.path,
                )
                return
            if self._failing:
                self._failing = False
                log.info("InfluxDB writes succeed again")
            self.counters.points_written += batch.count
            self.counters.batches_written += 1
            log.debug(
                "wrote %d points in %.1f ms", batch.count, (time.monotonic() - started) * 1000
            )
            return

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.settings.retry_max_s * 6)
        cap = min(self.settings.retry_max_s, self.settings.retry_initial_s * 2**attempt)
        return random.uniform(self.settings.retry_initial_s / 2, cap)  # noqa: S311

    def _note_failure(self, exc: TransientWriteError, delay: float) -> None:
        if not self._failing:
            self._failing = True
            log.warning("InfluxDB write failed (%s); retrying, acks wait meanwhile", exc)
        else:
            log.debug("InfluxDB write failed again (%s); next try in %.1f s", exc, delay)
