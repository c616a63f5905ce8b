"""The replayer: buffered batches back to the server, oldest first, with backoff.

It runs beside the live writers, so neither a backlog nor live traffic starves the other.
Its first success marks the server healthy again (`SinkHealth`), which sends new batches
back to the server instead of the buffer. A batch is re-checked for the server once, not
per retry; a batch the server refuses for good goes to the dead letters and is done.
"""

from __future__ import annotations

import asyncio
import logging

from hub.errors import PermanentWriteError, TransientWriteError
from hub.ingest.buffer import BufferAccess
from hub.ingest.refusals import Refusals
from hub.ingest.sinkhealth import backoff_s
from hub.ingest.stats import PipelineCounters
from hub.ingest.writers import Lines, SinkWriter

log = logging.getLogger("hub.pipeline")


class Replayer:
    """Writes what `buffer` holds through `writer`, in order, until cancelled."""

    def __init__(
        self,
        buffer: BufferAccess,
        writer: SinkWriter,
        refusals: Refusals,
        counters: PipelineCounters,
    ) -> None:
        self.buffer = buffer
        self.writer = writer
        self.refusals = refusals
        self.counters = counters

    async def run(self) -> None:
        """Replay forever: wait while the buffer is empty, back off while the server fails."""
        attempt = 0
        checked: tuple[tuple[int, int], Lines] | None = None  # re-checked once, not per retry
        while True:
            self.buffer.appended.clear()
            try:
                batch = await self.buffer.oldest()
            except OSError as exc:
                log.error("cannot read %s: %s", self.buffer.buffer.location, exc)
                await asyncio.sleep(backoff_s(attempt, None, self.writer.options))
                attempt += 1
                continue
            if batch is None:
                await self.buffer.appended.wait()
                continue
            try:
                if checked is None or checked[0] != (batch.segment, batch.offset):
                    lines = (batch.body, batch.points, batch.dialect)
                    checked = (
                        (batch.segment, batch.offset),
                        await self.writer.for_server(lines, self.refusals),
                    )
                body, points, _ = checked[1]
                if points:
                    await self.writer.write(body, points)
            except TransientWriteError as exc:
                self.writer.failed(exc)
                await asyncio.sleep(backoff_s(attempt, exc.retry_after, self.writer.options))
                attempt += 1
                continue
            except PermanentWriteError as exc:
                stored = await self.refusals.refused(body, exc)
                self.counters.points_replayed += stored
            else:
                self.counters.points_replayed += points
            attempt = 0
            # Done with: the check is kept only while this batch is retried. (A later batch
            # can lie where this one lay: the same segment and offset.)
            checked = None
            try:
                await self.buffer.written(batch)
            except OSError as exc:  # the batch is in the server; only its file lingers
                log.error("cannot delete a replayed spool segment: %s", exc)
