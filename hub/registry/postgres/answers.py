"""Devices' answers to config pushes, recorded together: one statement per loop turn.

A fleet-wide push makes every device of a hub answer within moments; recorded one statement
each, 3,333 answers queue behind the hub's few pooled connections and the push's tail waits
for them (`device-sim bench --only cluster_push`). `ConfigAnswers` gathers the answers given
in one turn of the event loop and records them in one `RECORD_CONFIG_ACKS`, each caller
still told whether its own answer counted (False for a stale epoch, a version not current, a
repeat). A device answering twice before a flush waits for the next one: one row per device
per statement.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from hub.registry.postgres import queries as q

MAX_ANSWERS_PER_STATEMENT = 1000
"""Answers recorded by one statement; more wait for the next, right after."""


@dataclass(frozen=True, slots=True)
class _Answer:
    device_id: str
    epoch: int
    version: int
    ok: bool
    error: str | None
    recorded: asyncio.Future[bool]


class ConfigAnswers:
    """Config answers of node `node_id`'s sessions, recorded in batches on `pool`."""

    def __init__(self, pool: asyncpg.Pool, node_id: str) -> None:
        self._pool = pool
        self._node_id = node_id
        self._waiting: list[_Answer] = []
        self._flushing: asyncio.Task[None] | None = None

    async def record(
        self, device_id: str, epoch: int, version: int, ok: bool, error: str | None
    ) -> bool:
        """Record one answer with the others of this loop turn; whether it counted. Raises
        what the statement raised (the registry unreachable, ...) to every answer in it."""
        recorded: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Answer(device_id, epoch, version, ok, error, recorded))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(), name="config-answers")
        return await recorded

    async def close(self, timeout_s: float) -> None:
        """Let the answers already given be recorded, for up to `timeout_s` (then they fail
        with the cancellation, and their devices answer again on their next connection)."""
        flushing = self._flushing
        if flushing is None or flushing.done():
            return
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(flushing)
        except TimeoutError:
            flushing.cancel()
            await asyncio.gather(flushing, return_exceptions=True)

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # the answers of this turn of the loop join
        while self._waiting:
            batch = self._take_batch()
            try:
                rows = await self._pool.fetch(
                    q.RECORD_CONFIG_ACKS,
                    self._node_id,
                    [a.device_id for a in batch],
                    [a.epoch for a in batch],
                    [a.version for a in batch],
                    [a.ok for a in batch],
                    [a.error for a in batch],
                )
            except BaseException as exc:
                for answer in batch:
                    if not answer.recorded.done():
                        answer.recorded.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            counted = {row["device_id"] for row in rows}
            for answer in batch:
                if not answer.recorded.done():  # its caller may have given up (a timeout)
                    answer.recorded.set_result(answer.device_id in counted)

    def _take_batch(self) -> list[_Answer]:
        """Up to MAX_ANSWERS_PER_STATEMENT waiting answers, one per device; the rest wait."""
        batch: list[_Answer] = []
        devices: set[str] = set()
        later: list[_Answer] = []
        for answer in self._waiting:
            if answer.device_id in devices or len(batch) >= MAX_ANSWERS_PER_STATEMENT:
                later.append(answer)
            else:
                devices.add(answer.device_id)
                batch.append(answer)
        self._waiting = later
        return batch
