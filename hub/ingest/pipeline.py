"""The write pipeline: batches points from every connection and makes them durable.

Connections `submit` the lines of one message and get a future that completes once those
lines are durable: written to the server, or kept in the buffer (the disk spool, fsynced).
`Pipeline` builds its parts and wires them; each lives in a module of its own:

* `hub.ingest.accumulator`: the open batch, size and age sealing, futures, backpressure;
* `hub.ingest.writers`: `max_inflight_writes` writers, each write within `write_deadline_s`,
  routed to the server or the buffer, retried with backoff;
* `hub.ingest.sinkhealth`: whether the server takes writes (pure state machine);
* `hub.ingest.buffer`: the buffer interface (`Spool`, `MemoryBuffer`);
* `hub.ingest.replayer`: the buffer written back in order, beside the live writers;
* `hub.ingest.refusals` and `hub.ingest.deadletters`: points refused for good;
* `hub.ingest.stats`: what `/metrics` reads, at scrape time (no component builds metrics).

The pipeline also keeps the hub-wide `FieldTypes` that sessions check readings against, and
asks InfluxDB once (in the background, never on a session's path) which types it holds.

Each batch remembers the dialect its lines were formatted for (`hub.dialects`), in the spool
too. One written to a server of another kind (a spool replayed after the hub was pointed
elsewhere, or lines formatted before the server first answered) is re-checked first
(`hub.reformat`): each point is spelled for that server, and the points it cannot store
exactly go to the dead-letter file with the reason, never to the server as other points.
"""

from __future__ import annotations

import asyncio
import logging
import time

from hub.core.dialects import Dialect
from hub.core.fieldtypes import FieldTypes
from hub.errors import PermanentWriteError, TransientWriteError
from hub.ingest.accumulator import Accumulator
from hub.ingest.buffer import Buffer, BufferAccess
from hub.ingest.deadletters import DeadLetterFile
from hub.ingest.influx_fields import fetch_field_types
from hub.ingest.refusals import Refusals
from hub.ingest.replayer import Replayer
from hub.ingest.sinkhealth import SinkHealth, backoff_s
from hub.ingest.sinks import Sink
from hub.ingest.stats import PipelineCounters, WriteStats
from hub.ingest.writers import SinkWriter, Writers
from hub.options import BatchOptions, InfluxOptions

log = logging.getLogger("hub.pipeline")

__all__ = ["Pipeline", "PipelineCounters"]


class Pipeline:
    """Batching, concurrent writes, buffering, retries and backpressure in front of a sink."""

    def __init__(
        self,
        sink: Sink | None,
        dead_letters: DeadLetterFile,
        options: BatchOptions,
        buffer: Buffer | None = None,
        influx: InfluxOptions | None = None,
    ) -> None:
        """`influx`: where to ask which field types the server holds (not asked without)."""
        self._sink = sink
        self._influx = influx
        self.spool = buffer
        """Where batches wait while the server fails (the disk spool when the hub runs)."""
        self.counters = PipelineCounters()
        self.write_stats = WriteStats()
        self.health = SinkHealth.for_sink(sink is not None)
        self.dead_letters = dead_letters
        self.field_catalog = FieldTypes()
        """Field types InfluxDB holds or will, per shard group: see `field_types`."""
        self._accumulator = Accumulator(options, self._default_dialect)
        self._buffer = BufferAccess(buffer) if buffer is not None else None
        self._writer = (
            None
            if sink is None
            else SinkWriter(
                sink,
                options,
                self.health,
                self.counters,
                self.write_stats,
                buffer.location if buffer is not None else "memory; acks wait",
            )
        )
        self._refusals = Refusals(
            dead_letters,
            self.counters,
            self.field_catalog,
            self._write_again,
            lambda: self._options.write_deadline_s,
        )
        self._writers = Writers(
            self._accumulator,
            self._writer,
            self._buffer,
            self.health,
            self._refusals,
            self.counters,
            options,
        )
        self._options = options
        self._tasks: list[asyncio.Task[None]] = []
        # The session's hot path, bound straight to the accumulator (no call in between):
        # `has_room(count)`, `submit_nowait(lines, count, dialect=None)` and the awaitable
        # `submit(lines, count, dialect=None)`, which waits while the pipeline is full.
        self.has_room = self._accumulator.has_room
        self.submit_nowait = self._accumulator.submit_nowait
        self.submit = self._accumulator.submit

    @property
    def options(self) -> BatchOptions:
        """The options every part reads."""
        return self._options

    def apply(self, options: BatchOptions) -> None:
        """Use reloaded options from now on (of them, a reload changes only the live
        `max_pending_readings`)."""
        self._options = options
        self._accumulator.options = options
        self._writers.options = options
        if self._writer is not None:
            self._writer.options = options

    @property
    def sink(self) -> Sink | None:
        """Where batches are written; one configured at start can be replaced by another
        (from then on the writers and the replayer write there)."""
        return self._sink

    @sink.setter
    def sink(self, sink: Sink | None) -> None:
        if (sink is None) != (self._sink is None):
            raise ValueError("a pipeline started without a sink cannot get one, nor lose it")
        self._sink = sink
        if self._writer is not None and sink is not None:
            self._writer.sink = sink

    @property
    def pending(self) -> int:
        """Readings submitted and not yet durable."""
        return self._accumulator.pending

    @property
    def healthy(self) -> bool:
        """Whether the last write to InfluxDB succeeded."""
        return self.health.healthy

    @property
    def spool_full(self) -> bool:
        """Whether the buffer refused the last batch offered to it since InfluxDB failed."""
        return self.health.buffer_full

    @property
    def dialect(self) -> Dialect:
        """The dialect to format lines in: the server's, STRICT while it is not known."""
        return self.sink.dialect if self.sink is not None else Dialect.STRICT

    @property
    def field_types(self) -> FieldTypes | None:
        """The field types to check readings against, while the server is known to be
        InfluxDB (the only one of the servers the hub writes to that has field types)."""
        return self.field_catalog if self.dialect.has_field_types else None

    def _default_dialect(self) -> Dialect:
        sink = self._sink
        return sink.dialect if sink is not None else Dialect.STRICT

    def start(self) -> None:
        """Start the write workers, the replayer when there is a buffer and a sink, and the
        question to InfluxDB about its field types."""
        self._tasks = self._writers.start()
        if self._buffer is not None and self._writer is not None:
            replayer = Replayer(self._buffer, self._writer, self._refusals, self.counters)
            self._tasks.append(asyncio.create_task(replayer.run(), name="replayer"))
        if self.sink is not None and self._influx is not None:
            self._tasks.append(
                asyncio.create_task(self._ask_field_types(self._influx), name="field-types")
            )

    def flush(self) -> None:
        """Seal the open batch now instead of waiting for its age."""
        self._accumulator.flush()

    async def drain(self) -> None:
        """Flush and wait until everything submitted so far is durable."""
        await self._accumulator.drain()

    async def close(self) -> None:
        """Stop writing (unwritten batches stay unacknowledged), close the sink and buffer."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.sink is not None:
            await self.sink.close()
        if self._buffer is not None:
            await self._buffer.close()

    async def _write_again(self, body: bytes) -> None:
        assert self._writer is not None, "refused by a server, so there is one"
        await self._writer.write_again(body)

    async def _ask_field_types(self, influx: InfluxOptions) -> None:
        """Learn InfluxDB's field types and shard group duration once it answers."""
        assert self.sink is not None
        attempt = 0
        while True:
            if self.sink.name != "auto" and not self.sink.dialect.has_field_types:
                return  # not InfluxDB: no field types to conflict with
            if self.sink.dialect.has_field_types:
                try:
                    found = await fetch_field_types(influx, self.sink.name)
                except TransientWriteError as exc:
                    log.log(
                        logging.INFO if attempt == 0 else logging.DEBUG,
                        "%s; until it answers, readings are checked against the types the hub "
                        "wrote",
                        exc,
                    )
                except PermanentWriteError as exc:
                    log.info("%s; readings are checked against the types the hub wrote", exc)
                    return
                else:
                    if found.shard_ns is not None:
                        self.field_catalog.set_shard_duration(found.shard_ns)
                    self.field_catalog.seed(found.types, time.time_ns())
                    log.info(
                        "InfluxDB holds %d fields of a single type; shard groups of %s s",
                        len(found.types),
                        f"{self.field_catalog.shard_ns / 1e9:g}",
                    )
                    return
            await asyncio.sleep(backoff_s(attempt, None, self._options))
            attempt += 1
