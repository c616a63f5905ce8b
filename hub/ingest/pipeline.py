"""The write pipeline: batches points from every connection and makes them durable.

Connections `submit` the lines of one message and get a future that completes once those
lines are durable: written to InfluxDB, or appended and fsynced to the disk spool. Batches
are sealed by size or age and written by a few workers at once.

When InfluxDB fails a write (unreachable, 5xx, 429, or slower than `write_deadline_s`), the
batch goes to the spool and InfluxDB is marked unhealthy: later batches go straight to the
spool instead of waiting on it. A replayer writes the spool back in order, with backoff
(or the server's `Retry-After`), and its first success marks InfluxDB healthy again; it runs
beside the live writers, so neither a backlog nor live traffic starves the other. Points
InfluxDB refuses for good (400, 422, ...) go to the dead-letter file: of a partial write,
which stores the rest, only the refused ones (see `hub.deadletters`).

The pipeline also keeps the hub-wide `FieldTypes` that sessions check readings against, and
asks InfluxDB once (in the background, never on a session's path) which types it holds.

Each batch remembers the dialect its lines were formatted for (`hub.dialects`), in the spool
too. One written to a server of another kind (a spool replayed after the hub was pointed
elsewhere, or lines formatted before the server first answered) is re-checked first
(`hub.reformat`): each point is spelled for that server, and the points it cannot store
exactly go to the dead-letter file with the reason, never to the server as other points.

Without a spool (or while it is full) a failed batch is retried with capped exponential
backoff and jitter and stays unacknowledged. `submit` waits while the pipeline holds
`max_pending_readings`, which stops connections from reading: memory stays bounded, and
devices feel TCP backpressure instead.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

from hub.core.dialects import Dialect
from hub.core.fieldtypes import FieldTypes, parse_conflict
from hub.core.reformat import reformat_batch
from hub.errors import PermanentWriteError, TransientWriteError, WriteError
from hub.ingest.deadletters import DeadLetterFile, RefusedPart, describe, find_refused, lines_of
from hub.ingest.influx_fields import fetch_field_types
from hub.ingest.sinks import Sink
from hub.ingest.spool import Spool
from hub.ops.metrics import HubMetrics
from hub.settings import Settings

log = logging.getLogger("hub.pipeline")


@dataclass
class PipelineCounters:
    """What the pipeline has done since start."""

    points_written: int = 0
    batches_written: int = 0
    points_spooled: int = 0
    points_replayed: int = 0
    retries: int = 0
    dead_lettered_points: int = 0
    """Points InfluxDB refused for good: exactly what it said it dropped."""


@dataclass(eq=False)
class _Batch:
    dialect: Dialect = Dialect.STRICT
    chunks: list[str] = field(default_factory=list)
    count: int = 0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


_Lines = tuple[bytes, int, Dialect | None]
"""A batch's body, its points, and the dialect it is formatted for (None: not known here)."""


class Pipeline:
    """Batching, concurrent writes, spooling, retries and backpressure in front of a sink."""

    def __init__(
        self,
        sink: Sink | None,
        dead_letters: DeadLetterFile,
        settings: Settings,
        spool: Spool | None = None,
        metrics: HubMetrics | None = None,
    ) -> None:
        self.sink = sink
        self.spool = spool
        self.settings = settings
        self.counters = PipelineCounters()
        self.metrics = metrics or HubMetrics()
        self.spool_full = False
        """Whether the spool refused the last batch offered to it since InfluxDB failed."""
        self.dead_letters = dead_letters
        self.field_catalog = FieldTypes()
        """Field types InfluxDB holds or will, per shard group: see `field_types`."""
        self._dead_letter_lock = asyncio.Lock()
        self._current: _Batch | None = None
        self._sealed: asyncio.Queue[_Batch] = asyncio.Queue()
        self._pending = 0
        self._room = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._healthy = sink is not None
        self._spool_lock = asyncio.Lock()
        self._spooled = asyncio.Event()

    @property
    def pending(self) -> int:
        """Readings submitted and not yet durable."""
        return self._pending

    @property
    def healthy(self) -> bool:
        """Whether the last write to InfluxDB succeeded."""
        return self._healthy

    @property
    def dialect(self) -> Dialect:
        """The dialect to format lines in: the server's, STRICT while it is not known."""
        return self.sink.dialect if self.sink is not None else Dialect.STRICT

    @property
    def field_types(self) -> FieldTypes | None:
        """The field types to check readings against, while the server is known to be
        InfluxDB (the only one of the servers the hub writes to that has field types)."""
        return self.field_catalog if self.dialect.has_field_types else None

    def start(self) -> None:
        """Start the write workers, the replayer when there is a spool and a sink, and the
        question to InfluxDB about its field types."""
        self._tasks = [
            asyncio.create_task(self._work(), name=f"writer-{n}")
            for n in range(self.settings.max_inflight_writes)
        ]
        if self.spool is not None and self.sink is not None:
            self._tasks.append(asyncio.create_task(self._replay(), name="replayer"))
        if self.sink is not None:
            self._tasks.append(asyncio.create_task(self._ask_field_types(), name="field-types"))

    def has_room(self, count: int) -> bool:
        """Whether `submit` of `count` points would go through now, without waiting."""
        return self._pending == 0 or self._pending + count <= self.settings.max_pending_readings

    async def submit(
        self, lines: str, count: int, dialect: Dialect | None = None
    ) -> asyncio.Future[None]:
        """Queue `count` points (newline-separated `lines`, formatted for `dialect`, by
        default `self.dialect`); the future completes when durable.

        Waits while the pipeline is full. One message larger than the whole limit is let in
        alone rather than never.
        """
        if dialect is None:  # the dialect the lines were formatted with, before any wait
            dialect = self.dialect
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
        dialect = dialect or self.dialect
        if batch is not None and not dialect.reads_as(batch.dialect):  # one dialect a batch
            self._seal_if_current(batch)
            batch = None
        if batch is None:
            batch = self._current = _Batch(dialect)
            loop.call_later(self.settings.flush_interval_s, self._seal_if_current, batch)
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
        """Stop writing (unwritten batches stay unacknowledged), close the sink and spool."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.sink is not None:
            await self.sink.close()
        if self.spool is not None:
            async with self._spool_lock:
                self.spool.close()

    def _seal_if_current(self, batch: _Batch) -> None:
        if self._current is batch:
            self._current = None
            self._sealed.put_nowait(batch)

    async def _work(self) -> None:
        while True:
            batch = await self._sealed.get()
            try:
                await self._make_durable(batch)
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

    async def _make_durable(self, batch: _Batch) -> None:
        lines: _Lines = ("\n".join(batch.chunks).encode("utf-8"), batch.count, batch.dialect)
        attempt = 0
        spool_refused = False
        while True:
            retry_after = None
            # With a spool, an unhealthy InfluxDB is left to the replayer to probe, unless the
            # spool cannot take this batch either: then nobody else would try InfluxDB.
            if self.sink is not None and (self._healthy or self.spool is None or spool_refused):
                try:
                    lines = await self._for_server(lines)
                    if lines[1]:
                        await self._write(lines[0], lines[1])
                    return
                except TransientWriteError as exc:
                    retry_after = exc.retry_after
                    self._unhealthy(exc)
                except PermanentWriteError as exc:
                    await self._refused(lines[0], exc)
                    return
            if self.spool is not None:
                if await self._to_spool(*lines):
                    return
                spool_refused = True
            self.counters.retries += 1
            await asyncio.sleep(self._backoff(attempt, retry_after))
            attempt += 1

    async def _write(self, body: bytes, count: int) -> None:
        """Write to InfluxDB within the deadline; a late answer counts as a transient failure."""
        assert self.sink is not None
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.write_deadline_s):
                await self.sink.write(body)
        except TimeoutError:
            self.metrics.influx_error("timeout")
            raise TransientWriteError(
                f"no answer within {self.settings.write_deadline_s:g} s"
            ) from None
        except WriteError as exc:
            self.metrics.influx_error(exc.status)
            raise
        finally:
            self.metrics.write_seconds.observe(time.monotonic() - started)
        self.metrics.batch_points.observe(count)
        self.counters.points_written += count
        self.counters.batches_written += 1
        self._healthy_again()
        log.debug("wrote %d points in %.1f ms", count, (time.monotonic() - started) * 1000)

    async def _to_spool(self, body: bytes, count: int, dialect: Dialect | None) -> bool:
        assert self.spool is not None
        try:
            async with self._spool_lock:
                stored = await asyncio.to_thread(
                    self.spool.append, body, count, dialect or Dialect.STRICT
                )
        except OSError as exc:  # a full or failing disk: keep the batch, acks wait
            log.error("cannot write to the spool at %s: %s", self.spool.directory, exc)
            stored = False
        self.spool_full = not stored
        if stored:
            self.counters.points_spooled += count
            self._spooled.set()
        elif self.counters.retries % 100 == 0:
            log.warning("the spool is full (%d bytes): acks wait", self.spool.max_bytes)
        return stored

    async def _replay(self) -> None:
        assert self.spool is not None
        attempt = 0
        checked: tuple[tuple[int, int], _Lines] | None = None  # re-checked once, not per retry
        while True:
            self._spooled.clear()
            try:
                async with self._spool_lock:
                    batch = await asyncio.to_thread(self.spool.oldest)
            except OSError as exc:
                log.error("cannot read the spool at %s: %s", self.spool.directory, exc)
                await asyncio.sleep(self._backoff(attempt, None))
                attempt += 1
                continue
            if batch is None:
                await self._spooled.wait()
                continue
            try:
                if checked is None or checked[0] != (batch.segment, batch.offset):
                    lines = (batch.body, batch.points, batch.dialect)
                    checked = ((batch.segment, batch.offset), await self._for_server(lines))
                body, points, _ = checked[1]
                if points:
                    await self._write(body, points)
            except TransientWriteError as exc:
                self._unhealthy(exc)
                await asyncio.sleep(self._backoff(attempt, exc.retry_after))
                attempt += 1
                continue
            except PermanentWriteError as exc:
                stored = await self._refused(body, exc)
                self.counters.points_replayed += stored
            else:
                self.counters.points_replayed += points
            attempt = 0
            try:
                async with self._spool_lock:
                    await asyncio.to_thread(self.spool.written, batch)
            except OSError as exc:  # the batch is in InfluxDB; only its file lingers
                log.error("cannot delete a replayed spool segment: %s", exc)

    # --- Points refused for good ---------------------------------------------------------

    async def _refused(self, body: bytes, exc: PermanentWriteError) -> int:
        """Dead-letter what InfluxDB refused of `body`; returns how many points it stored."""
        lines = lines_of(body)
        parts = [RefusedPart(lines, exc, len(lines) if exc.dropped is None else exc.dropped)]
        if 0 < parts[0].dropped < len(lines):  # a partial write: the rest is stored
            give_up_at = time.monotonic() + self.settings.write_deadline_s
            parts = await find_refused(self._write_again, lines, exc, give_up_at)
        parts = [part for part in parts if part.dropped]
        refused = min(len(lines), sum(part.dropped for part in parts))
        self._learn_conflicts(parts)
        await self._keep(parts, refused)
        self.counters.points_written += len(lines) - refused
        log.error(
            "InfluxDB refused %d of %d points for good (%s); kept in %s",
            refused,
            len(lines),
            describe(parts),
            self.dead_letters.path,
        )
        return len(lines) - refused

    async def _dead_letter(self, lines: list[str], reason: str) -> None:
        """Keep `lines`, never written, in the dead letters with `reason`."""
        await self._keep([RefusedPart(lines, PermanentWriteError(reason), len(lines))], len(lines))
        log.error(
            "%d points not written (%s); kept in %s", len(lines), reason, self.dead_letters.path
        )

    async def _keep(self, parts: list[RefusedPart], refused: int) -> None:
        async with self._dead_letter_lock:
            try:
                for part in parts:
                    await asyncio.to_thread(self.dead_letters.append, part)
            except OSError as exc:  # a full disk must not hold acks: counted and logged
                self.dead_letters.discarded_points += refused
                log.error("cannot write dead letters to %s: %s", self.dead_letters.path, exc)
        self.counters.dead_lettered_points += refused

    async def _for_server(self, lines: _Lines) -> _Lines:
        """The batch as the server must get it: re-checked if formatted for another kind of
        server (see the module docstring); what it cannot store goes to the dead letters."""
        assert self.sink is not None
        try:
            await self.sink.detect()  # learns the kind of server on first contact
        except WriteError as exc:  # counted as the write it stands for would have been
            self.metrics.influx_error(exc.status)
            raise
        body, _, source = lines
        target = self.sink.dialect
        if source is not None and source.reads_as(target):
            return lines
        if source is None:
            reason = "formatted for a kind of server this hub does not know; not re-checked"
            await self._dead_letter(lines_of(body), reason)
            return b"", 0, target
        # Rare (a change of server) but up to batch_size points: off the event loop.
        result = await asyncio.to_thread(reformat_batch, body, source, target)
        by_reason: dict[str, list[str]] = {}
        for line, reason in result.refused:
            by_reason.setdefault(reason, []).append(line)
        for reason, refused in by_reason.items():
            await self._dead_letter(refused, f"not written: {reason}")
        return result.body, result.points, target

    async def _write_again(self, body: bytes) -> None:
        """One write of part of a refused batch, to find what InfluxDB refuses."""
        assert self.sink is not None
        async with asyncio.timeout(self.settings.write_deadline_s):
            await self.sink.write(body)

    def _learn_conflicts(self, parts: list[RefusedPart]) -> None:
        # A refusal names one conflict: exact where the part is one refused point.
        for part in parts:
            conflict = parse_conflict(part.error.reason)
            if conflict is not None and part.exact and len(part.lines) == 1:
                measurement, name, kind = conflict
                with_time = part.lines[0].rpartition(" ")[2]
                if with_time.isdigit():
                    self.field_catalog.learn(measurement, name, kind, int(with_time))

    async def _ask_field_types(self) -> None:
        """Learn InfluxDB's field types and shard group duration once it answers."""
        assert self.sink is not None
        attempt = 0
        while True:
            if self.sink.name != "auto" and not self.sink.dialect.has_field_types:
                return  # not InfluxDB: no field types to conflict with
            if self.sink.dialect.has_field_types:
                try:
                    found = await fetch_field_types(self.settings, self.sink.name)
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
            await asyncio.sleep(self._backoff(attempt, None))
            attempt += 1

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.settings.retry_max_s * 6)
        cap = min(self.settings.retry_max_s, self.settings.retry_initial_s * 2**attempt)
        return random.uniform(self.settings.retry_initial_s / 2, cap)  # noqa: S311

    def _unhealthy(self, exc: TransientWriteError) -> None:
        if self._healthy:
            self._healthy = False
            where = "the spool" if self.spool is not None else "memory; acks wait"
            log.warning(
                "InfluxDB write failed (%s); batches go to %s until it recovers", exc, where
            )
        else:
            log.debug("InfluxDB write failed again (%s)", exc)

    def _healthy_again(self) -> None:
        if not self._healthy:
            self._healthy = True
            self.spool_full = False
            log.info("InfluxDB writes succeed again")
