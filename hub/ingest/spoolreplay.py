"""A spool written to InfluxDB by a process that is not its hub: `hub spool replay`.

For a hub whose machine never comes back, its disk does: mount it (or copy the state
directory) anywhere, and replay each of its spools there. The replay is the hub's own
pipeline with nothing submitted to it: the same replayer, the same re-check of batches
formatted for another kind of server, the same dead letters (beside the spool, as its hub
kept them), the same backoff while InfluxDB fails. It holds the spool's lock throughout
(`hub.ingest.spoollock`), so it never replays a spool a live hub still writes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hub.ingest.deadletters import DeadLetterFile
from hub.ingest.pipeline import Pipeline
from hub.ingest.sinks import Sink
from hub.ingest.spool import Spool
from hub.options import BatchOptions
from hub.settings import Settings

PROGRESS_EVERY_S = 1.0
DEAD_LETTERS_NAME = "dead-letters.jsonl"


@dataclass(frozen=True, slots=True)
class ReplayProgress:
    """How far one spool's replay is."""

    directory: Path
    batches_total: int
    readings_total: int
    readings_written: int
    readings_dead_lettered: int
    seconds: float
    done: bool


async def replay_spool(
    directory: Path,
    settings: Settings,
    sink: Sink,
    timeout_s: float,
    progress: Callable[[ReplayProgress], None],
) -> ReplayProgress:
    """Write everything in the spool at `directory` to `sink`, calling `progress` about every
    second; the last report says whether the spool is empty (`done`) or `timeout_s` ran out
    first (what was written is gone from the spool, the rest stays). `SpoolInUse` if a live
    process holds it."""
    spool = Spool(directory, settings.spool_max_bytes)
    status = spool.status()
    dead_letters = DeadLetterFile(
        directory.parent / DEAD_LETTERS_NAME, settings.dead_letter_max_bytes
    )
    pipeline = Pipeline(sink, dead_letters, BatchOptions.of(settings), spool)
    started = time.monotonic()

    def report(done: bool) -> ReplayProgress:
        counters = pipeline.counters
        return ReplayProgress(
            directory,
            status.batches,
            status.points,
            counters.points_replayed,
            counters.dead_lettered_points,
            time.monotonic() - started,
            done,
        )

    pipeline.start()  # closes the spool (and its lock) when closed
    try:
        deadline = started + timeout_s
        while not spool.empty and time.monotonic() < deadline:
            progress(report(False))
            await asyncio.sleep(min(PROGRESS_EVERY_S, max(0.0, deadline - time.monotonic())))
    finally:
        await pipeline.close()
    final = report(spool.empty)
    progress(final)
    return final
