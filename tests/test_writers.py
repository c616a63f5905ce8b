"""The writers against a fake sink, for the failure orders a real server cannot produce on
demand: a write that fails, hangs, succeeds after its deadline, or stores only part.

The real-server behaviour of the same paths is in tests/test_pipeline*.py; here the sink is
scripted, the buffer is a `MemoryBuffer`, and nothing leaves the process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from hub.core.dialects import Dialect
from hub.errors import PermanentWriteError, TransientWriteError
from hub.ingest.buffer import MemoryBuffer
from hub.ingest.deadletters import DeadLetterFile
from hub.ingest.pipeline import Pipeline
from hub.ingest.sinkhealth import SinkState
from hub.options import BatchOptions
from tests.support import hub_settings

pytestmark = pytest.mark.unit

WAIT_S = 10.0
Behaviour = Callable[["FakeSink", bytes], Any]


async def fail(sink: FakeSink, body: bytes) -> None:
    """Unreachable, or a 5xx: retrying can help."""
    raise TransientWriteError("503 from the fake", 503)


async def store(sink: FakeSink, body: bytes) -> None:
    """Stored at once."""
    sink.stored.extend(body.decode().split("\n"))


async def hang(sink: FakeSink, body: bytes) -> None:
    """Never answers (until cancelled)."""
    await asyncio.get_running_loop().create_future()


async def store_late(sink: FakeSink, body: bytes) -> None:
    """Stored, but the answer comes only after the hub stopped waiting for it."""
    sink.stored.extend(body.decode().split("\n"))
    await asyncio.get_running_loop().create_future()


async def refuse_bad_lines(sink: FakeSink, body: bytes) -> None:
    """Like InfluxDB: stores the good lines of a body and says how many it dropped."""
    lines = body.decode().split("\n")
    bad = [line for line in lines if "bad" in line]
    sink.stored.extend(line for line in lines if "bad" not in line)
    if bad:
        reason = f'partial write: field type conflict: input field "v" on measurement "m" is type string, already exists as type float dropped={len(bad)}'  # noqa: E501
        raise PermanentWriteError(reason, 400, dropped=len(bad))


class FakeSink:
    """A sink that answers each write with the next scripted behaviour (the last repeats)."""

    name = "fake"
    dialect = Dialect.VICTORIA_METRICS  # no field types: no question to a server at start

    def __init__(self, *script: Behaviour) -> None:
        self.script = list(script)
        self.stored: list[str] = []
        self.writes = 0
        self.bodies: list[bytes] = []

    async def write(self, body: bytes) -> None:
        """Answer as scripted."""
        behaviour = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        self.writes += 1
        self.bodies.append(body)
        await behaviour(self, body)

    def answer(self, *script: Behaviour) -> None:
        """From now on, answer with `script`."""
        self.script = list(script)

    async def detect(self) -> None:
        """Nothing to learn."""

    async def close(self) -> None:
        """Nothing to release."""


@asynccontextmanager
async def pipeline_with(
    tmp_path: Path, sink: FakeSink, buffer: MemoryBuffer | None, **overrides: Any
) -> AsyncIterator[Pipeline]:
    values: dict[str, Any] = {"max_inflight_writes": 1, "write_deadline_s": 0.2}
    values.update(overrides)
    settings = hub_settings(tmp_path, "http://fake.invalid", **values)
    dead = DeadLetterFile(tmp_path / "dead.jsonl", 2**20)
    pipeline = Pipeline(sink, dead, BatchOptions.of(settings), buffer)
    pipeline.start()
    try:
        yield pipeline
    finally:
        await pipeline.close()


async def durable(*futures: asyncio.Future[None]) -> None:
    async with asyncio.timeout(WAIT_S):
        await asyncio.gather(*futures)


async def eventually(condition: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0.005)
    assert condition(), what


def lines(count: int, prefix: str = "m v=") -> list[str]:
    return [f"{prefix}{n} {n + 1}" for n in range(count)]


async def submit_all(pipeline: Pipeline, batch: list[str]) -> asyncio.Future[None]:
    future = await pipeline.submit("\n".join(batch), len(batch))
    pipeline.flush()
    return future


async def test_a_failed_write_without_a_buffer_is_retried_until_it_succeeds(
    tmp_path: Path,
) -> None:
    sink = FakeSink(fail, fail, store)
    async with pipeline_with(tmp_path, sink, None) as pipeline:
        future = await submit_all(pipeline, lines(3))
        await durable(future)
        assert sink.stored == lines(3)
        assert pipeline.counters.retries == 2
        assert pipeline.counters.points_written == 3
        assert pipeline.write_stats.errors == {"503": 2}
        assert pipeline.healthy  # the success marked it healthy again


async def test_a_failed_write_goes_to_the_buffer_and_replays_in_order(tmp_path: Path) -> None:
    sink = FakeSink(fail)
    buffer = MemoryBuffer(2**20)
    async with pipeline_with(tmp_path, sink, buffer) as pipeline:
        first = await submit_all(pipeline, lines(2, "a v="))
        await durable(first)  # acked from the buffer while the server fails
        assert pipeline.health.state is SinkState.FAILING
        second = await submit_all(pipeline, lines(2, "b v="))
        await durable(second)
        # Straight to the buffer: only the replayer tries the server, with the oldest batch.
        assert not any(b"b v=" in body for body in sink.bodies)
        assert pipeline.counters.points_spooled == 4
        sink.answer(store)
        await eventually(lambda: buffer.status().batches == 0, "the replay")
        assert sink.stored == lines(2, "a v=") + lines(2, "b v=")  # oldest first
        assert pipeline.counters.points_replayed == 4
        assert pipeline.healthy


async def test_a_hanging_write_is_cut_at_the_deadline_and_buffered(tmp_path: Path) -> None:
    sink = FakeSink(hang)
    buffer = MemoryBuffer(2**20)
    async with pipeline_with(tmp_path, sink, buffer) as pipeline:
        await durable(await submit_all(pipeline, lines(3)))
        assert pipeline.write_stats.errors["timeout"] >= 1
        assert not pipeline.healthy
        assert buffer.status().points == 3
        assert pipeline.write_stats.write_seconds.count >= 1
        assert pipeline.write_stats.write_seconds.total >= 0.2  # waited the whole deadline


async def test_a_hanging_write_without_a_buffer_keeps_the_ack_until_an_answer(
    tmp_path: Path,
) -> None:
    sink = FakeSink(hang)
    async with pipeline_with(tmp_path, sink, None) as pipeline:
        future = await submit_all(pipeline, lines(1))
        await eventually(lambda: pipeline.write_stats.errors["timeout"] >= 2, "two deadlines")
        assert not future.done()
        assert pipeline.pending == 1
        sink.answer(store)
        await durable(future)
        assert pipeline.pending == 0


async def test_a_write_stored_after_its_deadline_counts_as_failed_and_is_acked_once(
    tmp_path: Path,
) -> None:
    """The server stored the batch but answered too late: the hub cannot know, so the batch
    goes to the buffer and is written again (the same points: InfluxDB keeps one of each)."""
    sink = FakeSink(store_late, store)
    buffer = MemoryBuffer(2**20)
    async with pipeline_with(tmp_path, sink, buffer) as pipeline:
        future = await submit_all(pipeline, lines(2))
        await durable(future)
        await eventually(lambda: buffer.status().batches == 0, "the replay")
        assert sink.stored == lines(2) + lines(2)
        assert pipeline.write_stats.errors == {"timeout": 1}
        assert pipeline.counters.points_spooled == 2
        assert pipeline.counters.points_replayed == 2
        assert pipeline.counters.batches_written == 1  # the replay; the late one never counted


async def test_a_partial_write_dead_letters_exactly_what_was_dropped(tmp_path: Path) -> None:
    sink = FakeSink(refuse_bad_lines)
    batch = ["m v=1 1", "m v=2 2", 'm v="bad" 3', "m v=4 4"]
    async with pipeline_with(tmp_path, sink, MemoryBuffer(2**20)) as pipeline:
        await durable(await submit_all(pipeline, batch))
        assert pipeline.counters.dead_lettered_points == 1
        assert pipeline.counters.points_written == 3
        assert pipeline.counters.retries == 0
        assert pipeline.healthy  # a refusal is not a failing server
    records = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert [record["lines"] for record in records] == [['m v="bad" 3']]
    assert set(sink.stored) == {"m v=1 1", "m v=2 2", "m v=4 4"}


async def test_a_full_buffer_sends_the_batch_back_to_the_server(tmp_path: Path) -> None:
    sink = FakeSink(fail)
    async with pipeline_with(tmp_path, sink, MemoryBuffer(0)) as pipeline:
        future = await submit_all(pipeline, lines(2))
        await eventually(lambda: pipeline.spool_full, "the buffer refusing")
        await eventually(lambda: pipeline.counters.retries >= 2, "two rounds")
        assert not future.done()
        sink.answer(store)
        await durable(future)
        assert sink.stored == lines(2)
        assert not pipeline.spool_full  # the server's recovery forgets the full buffer


async def test_without_a_sink_batches_wait_in_the_buffer(tmp_path: Path) -> None:
    settings = hub_settings(tmp_path, None)
    buffer = MemoryBuffer(2**20)
    pipeline = Pipeline(
        None, DeadLetterFile(tmp_path / "dead.jsonl", 2**20), BatchOptions.of(settings), buffer
    )
    pipeline.start()
    try:
        await durable(await submit_all(pipeline, lines(3)))
        assert buffer.status().points == 3
        assert pipeline.dialect is Dialect.STRICT
    finally:
        await pipeline.close()


async def test_writes_run_concurrently_up_to_max_inflight_writes(tmp_path: Path) -> None:
    """Two hanging writes hold two writers; a third batch waits for one of them."""
    sink = FakeSink(hang)
    async with pipeline_with(
        tmp_path, sink, None, max_inflight_writes=2, write_deadline_s=60.0
    ) as pipeline:
        for n in range(3):
            await submit_all(pipeline, lines(1, f"m{n} v="))
        await eventually(lambda: sink.writes == 2, "two writes in flight")
        for _ in range(20):
            await asyncio.sleep(0)
        assert sink.writes == 2


def test_the_memory_buffer_is_bounded_and_in_order() -> None:
    buffer = MemoryBuffer(10)
    assert buffer.append(b"12345", 1)
    assert buffer.append(b"678", 2, Dialect.INFLUXDB_1)
    assert not buffer.append(b"abc", 1)  # 11 bytes would pass the limit
    status = buffer.status()
    assert (status.batches, status.points, status.bytes) == (2, 3, 8)
    oldest = buffer.oldest()
    assert oldest is not None and oldest.body == b"12345"
    buffer.written(oldest)
    after = buffer.oldest()
    assert after is not None and (after.body, after.dialect) == (b"678", Dialect.INFLUXDB_1)
    buffer.written(after)
    assert buffer.oldest() is None and buffer.status().bytes == 0
    with pytest.raises(ValueError, match="at least 0"):
        MemoryBuffer(-1)
