"""Points the server refuses for good, kept in the dead-letter file (`hub.ingest.deadletters`).

Of a partial write, which stored the rest, only the refused points are kept: exactly what the
server said it dropped, found by writing parts of the batch again (`find_refused`). A
refusal that names a field-type conflict of one point teaches the hub-wide field types.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from hub.core.fieldtypes import FieldTypes, parse_conflict
from hub.errors import PermanentWriteError
from hub.ingest.deadletters import DeadLetterFile, RefusedPart, describe, find_refused, lines_of
from hub.ingest.stats import PipelineCounters

log = logging.getLogger("hub.pipeline")


class Refusals:
    """Keeps refused points in `dead_letters`, counting them in `counters`."""

    def __init__(
        self,
        dead_letters: DeadLetterFile,
        counters: PipelineCounters,
        field_catalog: FieldTypes,
        write_again: Callable[[bytes], Awaitable[None]],
        deadline_s: Callable[[], float],
    ) -> None:
        self.dead_letters = dead_letters
        self._counters = counters
        self._field_catalog = field_catalog
        self._write_again = write_again
        """One write of part of a refused batch, within the write deadline."""
        self._deadline_s = deadline_s
        self._lock = asyncio.Lock()

    async def refused(self, body: bytes, exc: PermanentWriteError) -> int:
        """Dead-letter what the server refused of `body`; returns how many points it stored."""
        lines = lines_of(body)
        parts = [RefusedPart(lines, exc, len(lines) if exc.dropped is None else exc.dropped)]
        if 0 < parts[0].dropped < len(lines):  # a partial write: the rest is stored
            give_up_at = time.monotonic() + self._deadline_s()
            parts = await find_refused(self._write_again, lines, exc, give_up_at)
        parts = [part for part in parts if part.dropped]
        refused = min(len(lines), sum(part.dropped for part in parts))
        self._learn_conflicts(parts)
        await self._keep(parts, refused)
        self._counters.points_written += len(lines) - refused
        log.error(
            "InfluxDB refused %d of %d points for good (%s); kept in %s",
            refused,
            len(lines),
            describe(parts),
            self.dead_letters.path,
        )
        return len(lines) - refused

    async def not_written(self, lines: list[str], reason: str) -> None:
        """Keep `lines`, never sent to the server, in the dead letters with `reason`."""
        await self._keep([RefusedPart(lines, PermanentWriteError(reason), len(lines))], len(lines))
        log.error(
            "%d points not written (%s); kept in %s", len(lines), reason, self.dead_letters.path
        )

    async def _keep(self, parts: list[RefusedPart], refused: int) -> None:
        async with self._lock:
            try:
                for part in parts:
                    await asyncio.to_thread(self.dead_letters.append, part)
            except OSError as exc:  # a full disk must not hold acks: counted and logged
                self.dead_letters.discarded_points += refused
                log.error("cannot write dead letters to %s: %s", self.dead_letters.path, exc)
        self._counters.dead_lettered_points += refused

    def _learn_conflicts(self, parts: list[RefusedPart]) -> None:
        # A refusal names one conflict: exact where the part is one refused point.
        for part in parts:
            conflict = parse_conflict(part.error.reason)
            if conflict is not None and part.exact and len(part.lines) == 1:
                measurement, name, kind = conflict
                with_time = part.lines[0].rpartition(" ")[2]
                if with_time.isdigit():
                    self._field_catalog.learn(measurement, name, kind, int(with_time))
