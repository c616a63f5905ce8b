"""The writers: sealed batches to the server within a deadline, or to the buffer, or retried.

`SinkWriter` is one write to the server, shared by the writers and the replayer: the batch
re-checked for the kind of server it goes to (`hub.reformat`; what that server cannot store
exactly goes to the dead letters, never to it as other points), the deadline (a late answer
counts as a transient failure), and the bookkeeping: counters, write stats, sink health.

`Writers` are `max_inflight_writes` tasks, each taking the oldest sealed batch from the
accumulator. A round for a batch tries the server while it is healthy (`SinkHealth.try_sink`),
then the buffer, then backs off and goes again; so while the server fails, batches go
straight to the buffer instead of waiting on it. Without a buffer (or while it is full) a
failed batch stays unacknowledged and is retried with capped exponential backoff and jitter,
or the server's `Retry-After`. Points the server refuses for good go to `Refusals`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from hub.core.dialects import Dialect
from hub.core.reformat import reformat_batch
from hub.errors import PermanentWriteError, TransientWriteError, WriteError
from hub.ingest.accumulator import Accumulator, Batch
from hub.ingest.buffer import BufferAccess
from hub.ingest.deadletters import lines_of
from hub.ingest.refusals import Refusals
from hub.ingest.sinkhealth import SinkHealth, backoff_s
from hub.ingest.sinks import Sink
from hub.ingest.stats import TIMEOUT, PipelineCounters, WriteStats
from hub.options import BatchOptions

log = logging.getLogger("hub.pipeline")

Lines = tuple[bytes, int, Dialect | None]
"""A batch's body, its points, and the dialect it is formatted for (None: not known here)."""


class SinkWriter:
    """Writes to `sink` within `write_deadline_s`, keeping `health`, `counters`, `stats`."""

    def __init__(
        self,
        sink: Sink,
        options: BatchOptions,
        health: SinkHealth,
        counters: PipelineCounters,
        stats: WriteStats,
        where_failed_go: str,
    ) -> None:
        self.sink = sink
        self.options = options
        self.health = health
        self.counters = counters
        self.stats = stats
        self._where_failed_go = where_failed_go
        """Where batches go while the server fails, for the log line."""

    async def write(self, body: bytes, count: int) -> None:
        """Write to the server within the deadline; a late answer is a transient failure."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.options.write_deadline_s):
                await self.sink.write(body)
        except TimeoutError:
            self.stats.failed(TIMEOUT)
            raise TransientWriteError(
                f"no answer within {self.options.write_deadline_s:g} s"
            ) from None
        except WriteError as exc:
            self.stats.failed(exc.status)
            raise
        finally:
            self.stats.write_seconds.observe(time.monotonic() - started)
        self.stats.batch_points.observe(count)
        self.counters.points_written += count
        self.counters.batches_written += 1
        if self.health.succeeded():
            log.info("InfluxDB writes succeed again")
        log.debug("wrote %d points in %.1f ms", count, (time.monotonic() - started) * 1000)

    async def write_again(self, body: bytes) -> None:
        """One write of part of a refused batch, to find what the server refuses."""
        async with asyncio.timeout(self.options.write_deadline_s):
            await self.sink.write(body)

    def failed(self, exc: TransientWriteError) -> None:
        """A write failed for now: the server is failing until a write succeeds."""
        if self.health.failed():
            log.warning(
                "InfluxDB write failed (%s); batches go to %s until it recovers",
                exc,
                self._where_failed_go,
            )
        else:
            log.debug("InfluxDB write failed again (%s)", exc)

    async def for_server(self, lines: Lines, refusals: Refusals) -> Lines:
        """The batch as the server must get it: re-checked if formatted for another kind of
        server; what it cannot store goes to the dead letters."""
        try:
            await self.sink.detect()  # learns the kind of server on first contact
        except WriteError as exc:  # counted as the write it stands for would have been
            self.stats.failed(exc.status)
            raise
        body, _, source = lines
        target = self.sink.dialect
        if source is not None and source.reads_as(target):
            return lines
        if source is None:
            reason = "formatted for a kind of server this hub does not know; not re-checked"
            await refusals.not_written(lines_of(body), reason)
            return b"", 0, target
        # Rare (a change of server) but up to batch_size points: off the event loop.
        result = await asyncio.to_thread(reformat_batch, body, source, target)
        by_reason: dict[str, list[str]] = {}
        for line, reason in result.refused:
            by_reason.setdefault(reason, []).append(line)
        for reason, refused in by_reason.items():
            await refusals.not_written(refused, f"not written: {reason}")
        return result.body, result.points, target


class Writers:
    """The writer tasks: each makes sealed batches durable and settles their futures."""

    def __init__(
        self,
        accumulator: Accumulator,
        writer: SinkWriter | None,
        buffer: BufferAccess | None,
        health: SinkHealth,
        refusals: Refusals,
        counters: PipelineCounters,
        options: BatchOptions,
    ) -> None:
        self.accumulator = accumulator
        self.writer = writer
        self.buffer = buffer
        self.health = health
        self.refusals = refusals
        self.counters = counters
        self.options = options

    def start(self) -> list[asyncio.Task[None]]:
        """Start `max_inflight_writes` writer tasks."""
        return [
            asyncio.create_task(self._work(), name=f"writer-{n}")
            for n in range(self.options.max_inflight_writes)
        ]

    async def _work(self) -> None:
        while True:
            batch = await self.accumulator.next_sealed()
            try:
                await self.make_durable(batch)
            except BaseException as exc:
                await self.accumulator.complete(batch, exc)
                raise
            await self.accumulator.complete(batch)

    async def make_durable(self, batch: Batch) -> None:
        """Write `batch` to the server or the buffer, retrying until one takes it."""
        lines: Lines = (batch.body(), batch.count, batch.dialect)
        attempt = 0
        buffer_refused = False
        while True:
            retry_after = None
            writer = self.writer
            if writer is not None and self.health.try_sink(self.buffer is not None, buffer_refused):
                try:
                    lines = await writer.for_server(lines, self.refusals)
                    if lines[1]:
                        await writer.write(lines[0], lines[1])
                    return
                except TransientWriteError as exc:
                    retry_after = exc.retry_after
                    writer.failed(exc)
                except PermanentWriteError as exc:
                    await self.refusals.refused(lines[0], exc)
                    return
            if self.buffer is not None:
                if await self._to_buffer(self.buffer, *lines):
                    return
                buffer_refused = True
            self.counters.retries += 1
            await asyncio.sleep(backoff_s(attempt, retry_after, self.options))
            attempt += 1

    async def _to_buffer(
        self, buffer: BufferAccess, body: bytes, count: int, dialect: Dialect | None
    ) -> bool:
        try:
            stored = await buffer.append(body, count, dialect or Dialect.STRICT)
        except OSError as exc:  # a full or failing disk: keep the batch, acks wait
            log.error("cannot write to %s: %s", buffer.buffer.location, exc)
            stored = False
        self.health.buffered(stored)
        if stored:
            self.counters.points_spooled += count
        elif self.counters.retries % 100 == 0:
            log.warning(
                "%s is full (%d bytes): acks wait", buffer.buffer.location, buffer.buffer.max_bytes
            )
        return stored
