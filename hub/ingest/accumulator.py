"""Readings waiting to be written: batches sealed by size or age, futures, backpressure.

Connections `submit` the lines of one message and get a future that completes once the
writers have made them durable (`complete`). Lines go into the open batch, which is sealed
when it holds `batch_size` points, when `flush_interval_s` has passed since its first
lines, or when lines formatted for another dialect arrive (one dialect per batch). The
writers take sealed batches in order (`next_sealed`).

`submit` waits while `max_pending_readings` are not yet durable, which stops connections
from reading: memory stays bounded, and devices feel TCP backpressure instead. One message
larger than the whole limit is let in alone rather than never.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from hub.core.dialects import Dialect
from hub.options import BatchOptions


@dataclass(eq=False)
class Batch:
    """Lines of several messages, formatted for one dialect, and the futures they wait on."""

    dialect: Dialect = Dialect.STRICT
    chunks: list[str] = field(default_factory=list)
    count: int = 0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def body(self) -> bytes:
        """The lines as one write body."""
        return "\n".join(self.chunks).encode("utf-8")


class Accumulator:
    """The open batch, the sealed ones, and the count of readings not yet durable.

    Reads `batch_size`, `flush_interval_s` and `max_pending_readings` from `options`, which
    a reload may replace (`apply`); `default_dialect` is the dialect of lines submitted
    without one.
    """

    def __init__(self, options: BatchOptions, default_dialect: Callable[[], Dialect]) -> None:
        self.options = options
        self._default_dialect = default_dialect
        self._current: Batch | None = None
        self._sealed: asyncio.Queue[Batch] = asyncio.Queue()
        self._pending = 0
        self._room = asyncio.Condition()

    @property
    def pending(self) -> int:
        """Readings submitted and not yet durable."""
        return self._pending

    def has_room(self, count: int) -> bool:
        """Whether `submit` of `count` points would go through now, without waiting."""
        return self._pending == 0 or self._pending + count <= self.options.max_pending_readings

    async def submit(
        self, lines: str, count: int, dialect: Dialect | None = None
    ) -> asyncio.Future[None]:
        """Queue `count` points (newline-separated `lines`, formatted for `dialect`, by
        default the default dialect); the future completes when durable. Waits while full."""
        if dialect is None:  # the dialect the lines were formatted with, before any wait
            dialect = self._default_dialect()
        if not self.has_room(count):  # the lock and its wait only when full
            async with self._room:
                await self._room.wait_for(lambda: self.has_room(count))
        return self.submit_nowait(lines, count, dialect)

    def submit_nowait(
        self, lines: str, count: int, dialect: Dialect | None = None
    ) -> asyncio.Future[None]:
        """`submit` when `has_room(count)`, without waiting (the caller checked)."""
        self._pending += count
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        batch = self._current
        dialect = dialect or self._default_dialect()
        if batch is not None and not dialect.reads_as(batch.dialect):  # one dialect a batch
            self._seal_if_current(batch)
            batch = None
        if batch is None:
            batch = self._current = Batch(dialect)
            loop.call_later(self.options.flush_interval_s, self._seal_if_current, batch)
        batch.chunks.append(lines)
        batch.count += count
        batch.waiters.append(done)
        if batch.count >= self.options.batch_size:
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

    async def next_sealed(self) -> Batch:
        """The oldest sealed batch, once there is one; the caller must `complete` it."""
        return await self._sealed.get()

    async def complete(self, batch: Batch, error: BaseException | None = None) -> None:
        """`batch` is durable (or, with `error`, never will be here): settle its futures and
        make room for as many readings."""
        if error is None:
            for waiter in batch.waiters:
                if not waiter.done():
                    waiter.set_result(None)
        else:  # a cancellation reaches the futures as an error, never as a cancellation
            failure = error if isinstance(error, Exception) else RuntimeError()
            for waiter in batch.waiters:
                if not waiter.done():
                    waiter.set_exception(failure)
        async with self._room:
            self._pending -= batch.count
            self._room.notify_all()

    def _seal_if_current(self, batch: Batch) -> None:
        if self._current is batch:
            self._current = None
            self._sealed.put_nowait(batch)
