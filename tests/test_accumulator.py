"""The accumulator alone: sealing by size, age and dialect; futures; backpressure."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from hub.core.dialects import Dialect
from hub.ingest.accumulator import Accumulator, Batch
from hub.options import BatchOptions
from hub.settings import Settings
from tests.support import hub_settings

pytestmark = pytest.mark.unit

WAIT_S = 5.0


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"batch_size": 3, "flush_interval_s": 60.0}
    values.update(overrides)
    return hub_settings(tmp_path, None, **values)


def accumulator(settings: Settings, dialect: Dialect = Dialect.INFLUXDB_1) -> Accumulator:
    return Accumulator(BatchOptions.of(settings), lambda: dialect)


async def sealed(acc: Accumulator) -> Batch:
    async with asyncio.timeout(WAIT_S):
        return await acc.next_sealed()


async def let_others_run(rounds: int = 5) -> None:
    """Yield to the event loop a few times: enough for any ready callback to have run."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def test_a_batch_is_sealed_at_batch_size(tmp_path: Path) -> None:
    acc = accumulator(settings_for(tmp_path))
    futures = [acc.submit_nowait(f"m v={n}i {n}", 1) for n in range(4)]
    batch = await sealed(acc)  # well before the 60 s age
    assert batch.count == 3
    assert batch.body() == b"m v=0i 0\nm v=1i 1\nm v=2i 2"
    assert batch.waiters == futures[:3]
    assert batch.dialect is Dialect.INFLUXDB_1  # the default dialect
    assert acc.pending == 4


async def test_a_batch_is_sealed_by_age(tmp_path: Path) -> None:
    acc = accumulator(settings_for(tmp_path, batch_size=1000, flush_interval_s=0.01))
    acc.submit_nowait("m v=1i 1", 1)
    batch = await sealed(acc)
    assert batch.count == 1


async def test_flush_seals_the_open_batch_now(tmp_path: Path) -> None:
    acc = accumulator(settings_for(tmp_path, batch_size=1000))
    acc.submit_nowait("a", 1)
    acc.submit_nowait("b", 2)
    acc.flush()
    batch = await sealed(acc)
    assert (batch.chunks, batch.count) == (["a", "b"], 3)
    acc.flush()  # nothing open: nothing more sealed
    acc.submit_nowait("c", 1)
    acc.flush()
    assert (await sealed(acc)).chunks == ["c"]


async def test_lines_of_another_dialect_start_a_new_batch(tmp_path: Path) -> None:
    acc = accumulator(settings_for(tmp_path, batch_size=1000))
    acc.submit_nowait("a", 1, Dialect.INFLUXDB_1)
    acc.submit_nowait("b", 1, Dialect.VICTORIA_METRICS)
    acc.flush()
    first, second = await sealed(acc), await sealed(acc)
    assert (first.dialect, first.chunks) == (Dialect.INFLUXDB_1, ["a"])
    assert (second.dialect, second.chunks) == (Dialect.VICTORIA_METRICS, ["b"])


async def test_complete_settles_the_futures_and_makes_room(tmp_path: Path) -> None:
    acc = accumulator(settings_for(tmp_path))
    futures = [acc.submit_nowait("m", 1) for _ in range(3)]
    batch = await sealed(acc)
    assert not any(f.done() for f in futures)
    await acc.complete(batch)
    assert all(f.done() and f.exception() is None for f in futures)
    assert acc.pending == 0


async def test_a_failed_batch_fails_its_futures(tmp_path: Path) -> None:
    acc = accumulator(settings_for(tmp_path))
    futures = [acc.submit_nowait("m", 1) for _ in range(3)]
    await acc.complete(await sealed(acc), OSError("disk gone"))
    assert all(isinstance(f.exception(), OSError) for f in futures)
    assert acc.pending == 0


async def test_a_cancelled_writer_fails_the_futures_without_cancelling_them(
    tmp_path: Path,
) -> None:
    """A session awaiting a future must see an error, never a CancelledError of its own."""
    acc = accumulator(settings_for(tmp_path))
    futures = [acc.submit_nowait("m", 1) for _ in range(3)]
    await acc.complete(await sealed(acc), asyncio.CancelledError())
    assert all(not f.cancelled() for f in futures)
    assert all(isinstance(f.exception(), RuntimeError) for f in futures)


async def test_submit_waits_while_full_and_goes_on_once_there_is_room(tmp_path: Path) -> None:
    acc = accumulator(settings_for(tmp_path, max_pending_readings=5, batch_size=3))
    acc.submit_nowait("a", 3)  # sealed at once: batch_size
    assert acc.has_room(2) and not acc.has_room(3)
    waiting = asyncio.create_task(acc.submit("b", 3))
    await let_others_run()
    assert not waiting.done()
    assert acc.pending == 3
    await acc.complete(await sealed(acc))
    async with asyncio.timeout(WAIT_S):
        future = await waiting
    assert acc.pending == 3
    assert not future.done()


async def test_one_message_over_the_whole_limit_is_let_in_alone(tmp_path: Path) -> None:
    acc = accumulator(settings_for(tmp_path, max_pending_readings=5))
    assert acc.has_room(50)
    acc.submit_nowait("huge", 50)
    assert not acc.has_room(1)


async def test_submit_keeps_the_dialect_it_was_formatted_in_across_the_wait(
    tmp_path: Path,
) -> None:
    """Lines formatted before a wait keep their dialect, even if the default changes."""
    current = [Dialect.INFLUXDB_1]
    settings = settings_for(tmp_path, max_pending_readings=2, batch_size=2)
    acc = Accumulator(BatchOptions.of(settings), lambda: current[0])
    acc.submit_nowait("a", 2)
    waiting = asyncio.create_task(acc.submit("b", 2))
    await let_others_run()
    current[0] = Dialect.VICTORIA_METRICS
    await acc.complete(await sealed(acc))
    async with asyncio.timeout(WAIT_S):
        await waiting
    assert (await sealed(acc)).dialect is Dialect.INFLUXDB_1


async def test_drain_waits_until_everything_is_durable(tmp_path: Path) -> None:
    acc = accumulator(settings_for(tmp_path, batch_size=1000))
    acc.submit_nowait("a", 1)
    draining = asyncio.create_task(acc.drain())
    batch = await sealed(acc)  # drain flushed the open batch
    await let_others_run()
    assert not draining.done()
    await acc.complete(batch)
    async with asyncio.timeout(WAIT_S):
        await draining


async def test_new_settings_apply_to_the_next_batch(tmp_path: Path) -> None:
    acc = accumulator(settings_for(tmp_path, batch_size=1000))
    acc.options = BatchOptions.of(settings_for(tmp_path, batch_size=2))
    acc.submit_nowait("a", 1)
    acc.submit_nowait("b", 1)
    assert (await sealed(acc)).count == 2
