"""Where batches wait while the server cannot take them: the buffer interface.

The writers append a batch the server failed (or that arrived while it fails), and the
replayer writes buffered batches back in order, oldest first, deleting each once the server
has it. Two implementations: `hub.ingest.spool.Spool` (segments on disk, fsynced: what the
hub runs with, since a batch in it may be acked) and `MemoryBuffer` (bounded, lost at exit:
for tests and embedding code that cannot write to a disk). A buffer's methods may block;
`BufferAccess` runs them in a worker thread, one at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Protocol

from hub.core.dialects import Dialect
from hub.ingest.spool import SpooledBatch, SpoolStatus


class Buffer(Protocol):
    """Batches kept in order until written on; bounded by `max_bytes`."""

    @property
    def max_bytes(self) -> int:
        """The size limit: `append` refuses what would go past it."""

    @property
    def location(self) -> str:
        """Where batches are kept, for log lines."""

    def append(self, body: bytes, points: int, dialect: Dialect = Dialect.STRICT) -> bool:
        """Keep a batch formatted for `dialect`; False, keeping nothing, when full."""

    def oldest(self) -> SpooledBatch | None:
        """The oldest batch not yet written on, if any."""

    def written(self, batch: SpooledBatch) -> None:
        """`batch` (the one `oldest` returned) is written on: forget it."""

    def status(self) -> SpoolStatus:
        """What waits: batches, points, bytes, and when the oldest was kept."""

    def close(self) -> None:
        """Release what the buffer holds open."""


class MemoryBuffer:
    """A `Buffer` in memory: bounded by the bytes of the bodies it holds, lost at exit."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be at least 0, got {max_bytes}")
        self._max_bytes = max_bytes
        self._batches: deque[SpooledBatch] = deque()
        self._size = 0
        self._next = 0

    @property
    def max_bytes(self) -> int:
        """The size limit, in bytes of batch bodies."""
        return self._max_bytes

    @property
    def location(self) -> str:
        """Where batches are kept, for log lines."""
        return "memory"

    def append(self, body: bytes, points: int, dialect: Dialect = Dialect.STRICT) -> bool:
        """Keep a batch; False when it would pass `max_bytes`."""
        if self._size + len(body) > self._max_bytes:
            return False
        self._batches.append(SpooledBatch(0, self._next, body, points, time.time(), dialect))
        self._next += 1
        self._size += len(body)
        return True

    def oldest(self) -> SpooledBatch | None:
        """The oldest batch not yet written on, if any."""
        return self._batches[0] if self._batches else None

    def written(self, batch: SpooledBatch) -> None:
        """Forget `batch`, which must be the oldest."""
        assert self._batches and self._batches[0] is batch, "replay out of order"
        self._batches.popleft()
        self._size -= len(batch.body)

    def status(self) -> SpoolStatus:
        """What waits, as the spool reports it (no segments, nothing skipped)."""
        return SpoolStatus(
            segments=0,
            bytes=self._size,
            batches=len(self._batches),
            points=sum(batch.points for batch in self._batches),
            oldest=self._batches[0].written_at if self._batches else None,
            skipped_bytes=0,
        )

    def close(self) -> None:
        """Nothing to release."""


class BufferAccess:
    """A buffer used from the event loop: one call at a time, each in a worker thread (the
    spool fsyncs), and an event the replayer waits on while the buffer is empty."""

    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer
        self.appended = asyncio.Event()
        """Set by every append; the replayer clears it before it looks for a batch."""
        self._lock = asyncio.Lock()

    async def append(self, body: bytes, points: int, dialect: Dialect) -> bool:
        """`Buffer.append` off the event loop."""
        async with self._lock:
            stored = await asyncio.to_thread(self.buffer.append, body, points, dialect)
        if stored:
            self.appended.set()
        return stored

    async def oldest(self) -> SpooledBatch | None:
        """`Buffer.oldest` off the event loop."""
        async with self._lock:
            return await asyncio.to_thread(self.buffer.oldest)

    async def written(self, batch: SpooledBatch) -> None:
        """`Buffer.written` off the event loop."""
        async with self._lock:
            await asyncio.to_thread(self.buffer.written, batch)

    async def close(self) -> None:
        """`Buffer.close`, once no call is under way."""
        async with self._lock:
            self.buffer.close()
