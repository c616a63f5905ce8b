"""The write pipeline: batching, concurrent writes, backpressure, retries and dead letters.

Writes go through `V1Sink` to the real InfluxDB 1.6.7 wherever a real server can give the
answer under test. A fake `/write` (aiohttp on 127.0.0.1, port 0) stands in only for what a
real server cannot be made to do on demand: hang, answer 503, or answer 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from device_sim.local_servers import (
    LocalServer,
    create_database,
    free_port,
    influx_write,
    influxql,
    start_influxdb,
)
from hub.ingest.deadletters import DeadLetterFile
from hub.ingest.pipeline import Pipeline
from hub.ingest.sinks import V1Sink
from hub.options import BatchOptions, InfluxOptions
from hub.settings import Settings
from tests.support import hub_settings

WAIT_S = 10.0


def reading_lines(count: int, measurement: str = "m") -> list[str]:
    """`count` distinct points of one series, one line each, with ns timestamps."""
    base = time.time_ns()
    return [f"{measurement},device=d1 v={n}i {base + n}" for n in range(count)]


async def eventually(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Wait until `condition()` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


async def all_durable(futures: Sequence[asyncio.Future[None]]) -> None:
    """Wait (bounded) until every future has completed successfully."""
    async with asyncio.timeout(WAIT_S):
        await asyncio.gather(*futures)


def count_points(influx: LocalServer, db: str, measurement: str = "m") -> int:
    """How many points the measurement holds in InfluxDB."""
    rows = influxql(influx.url, db, f'SELECT count("v") FROM "{measurement}"')
    return int(rows[0]["count"]) if rows else 0


@asynccontextmanager
async def running_pipeline(settings: Settings) -> AsyncIterator[Pipeline]:
    """A started pipeline writing through V1Sink, closed on exit."""
    pipeline = Pipeline(
        V1Sink(InfluxOptions.of(settings)),
        DeadLetterFile(settings.dead_letter_path, settings.dead_letter_max_bytes),
        BatchOptions.of(settings),
    )
    pipeline.start()
    try:
        yield pipeline
    finally:
        await pipeline.close()


async def submit_each(pipeline: Pipeline, lines: Sequence[str]) -> list[asyncio.Future[None]]:
    """Submit every line as its own one-reading message."""
    return [await pipeline.submit(line, 1) for line in lines]


# --- A fake InfluxDB /write for answers a real server cannot be made to give ---------------


@dataclass(frozen=True)
class SeenWrite:
    """One request the fake server received."""

    at: float
    body: bytes
    status: int
    observed: object


class FakeInflux:
    """Answers POST /write with scripted statuses (then 204), optionally holding responses."""

    def __init__(
        self,
        answers: Sequence[tuple[int, Mapping[str, str]]] = (),
        *,
        hold: bool = False,
        observe: Callable[[], object] = lambda: None,
    ) -> None:
        self._answers = list(answers)
        self._observe = observe
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.seen: list[SeenWrite] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.url = ""

    async def _write(self, request: web.Request) -> web.Response:
        body = await request.read()
        status, headers = self._answers.pop(0) if self._answers else (204, {})
        self.seen.append(SeenWrite(time.monotonic(), body, status, self._observe()))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        if status == 204:
            return web.Response(status=204)
        return web.json_response({"error": f"fake {status}"}, status=status, headers=headers)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FakeInflux]:
        """Serve on a free loopback port until exit."""
        app = web.Application()
        app.router.add_post("/write", self._write)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        address: Any = runner.addresses[0]
        self.url = f"http://127.0.0.1:{address[1]}"
        try:
            yield self
        finally:
            self.release.set()
            await runner.cleanup()


def fake_settings(tmp_path: Path, fake: FakeInflux, **overrides: Any) -> Settings:
    """Hub settings writing to the fake server."""
    return hub_settings(tmp_path, fake.url, influx_api="v1", influx_bucket="db", **overrides)


# --- Batching ---------------------------------------------------------------------------------


@pytest.mark.integration
async def test_batch_is_sealed_when_it_reaches_batch_size(
    influxdb: LocalServer, influx_db_name: str, tmp_path: Path
) -> None:
    """A batch is written as soon as it holds batch_size readings, without waiting for age."""
    settings = hub_settings(
        tmp_path, influxdb.url, influx_bucket=influx_db_name, batch_size=10, flush_interval_s=60
    )
    async with running_pipeline(settings) as pipeline:
        futures = await submit_each(pipeline, reading_lines(25))
        await all_durable(futures[:20])
        assert pipeline.counters.batches_written == 2
        assert pipeline.counters.points_written == 20
        assert not any(f.done() for f in futures[20:])
        assert count_points(influxdb, influx_db_name) == 20


@pytest.mark.integration
async def test_batch_is_sealed_by_age(
    influxdb: LocalServer, influx_db_name: str, tmp_path: Path
) -> None:
    """An undersized batch is written, as one batch, once flush_interval_s has passed."""
    settings = hub_settings(
        tmp_path, influxdb.url, influx_bucket=influx_db_name, batch_size=1000, flush_interval_s=0.1
    )
    async with running_pipeline(settings) as pipeline:
        futures = await submit_each(pipeline, reading_lines(3))
        assert pipeline.counters.batches_written == 0
        await all_durable(futures)
        assert pipeline.counters.batches_written == 1
        assert pipeline.counters.points_written == 3
        assert count_points(influxdb, influx_db_name) == 3


@pytest.mark.integration
async def test_oversized_message_is_let_in_alone(
    influxdb: LocalServer, influx_db_name: str, tmp_path: Path
) -> None:
    """One message larger than max_pending_readings is admitted and written, not stuck."""
    settings = hub_settings(
        tmp_path, influxdb.url, influx_bucket=influx_db_name, max_pending_readings=10
    )
    async with running_pipeline(settings) as pipeline:
        async with asyncio.timeout(WAIT_S):
            done = await pipeline.submit("\n".join(reading_lines(25)), 25)
        await all_durable([done])
        assert count_points(influxdb, influx_db_name) == 25


# --- Concurrency and backpressure ---------------------------------------------------------------


@pytest.mark.integration
async def test_several_writes_are_in_flight_at_once(tmp_path: Path) -> None:
    """Up to max_inflight_writes batches are written concurrently, and no more."""
    async with FakeInflux(hold=True).running() as fake:
        settings = fake_settings(tmp_path, fake, batch_size=1, max_inflight_writes=3)
        async with running_pipeline(settings) as pipeline:
            futures = await submit_each(pipeline, reading_lines(5))
            await eventually(lambda: fake.in_flight == 3, "three writes in flight")
            await asyncio.sleep(0.2)  # room for a fourth write to start if the cap were broken
            assert len(fake.seen) == 3
            assert not any(f.done() for f in futures)
            fake.release.set()
            await all_durable(futures)
            assert fake.max_in_flight == 3
            assert pipeline.counters.batches_written == 5


@pytest.mark.integration
async def test_submit_waits_while_max_pending_readings_are_held(tmp_path: Path) -> None:
    """At max_pending_readings, submit blocks (pending stays bounded) until writes complete."""
    async with FakeInflux(hold=True).running() as fake:
        settings = fake_settings(
            tmp_path, fake, batch_size=5, max_inflight_writes=2, max_pending_readings=10
        )
        async with running_pipeline(settings) as pipeline:
            admitted = await submit_each(pipeline, reading_lines(10))
            await eventually(lambda: fake.in_flight == 2, "both batches in flight")
            blocked = [
                asyncio.create_task(pipeline.submit(line, 1)) for line in reading_lines(3, "n")
            ]
            await asyncio.sleep(0.2)  # room for a submit to slip through if nothing held it
            assert not any(task.done() for task in blocked)
            assert pipeline.pending == 10
            fake.release.set()
            async with asyncio.timeout(WAIT_S):
                later = await asyncio.gather(*blocked)
            await all_durable([*admitted, *later])
            assert pipeline.pending == 0
            assert pipeline.counters.points_written == 13


# --- Retries ------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_transient_errors_are_retried_and_acked_only_after_success(tmp_path: Path) -> None:
    """503s are retried with the same batch; the futures complete only after the 204."""
    futures: list[asyncio.Future[None]] = []
    fake = FakeInflux([(503, {}), (503, {})], observe=lambda: any(f.done() for f in futures))
    async with fake.running():
        settings = fake_settings(tmp_path, fake, batch_size=3)
        async with running_pipeline(settings) as pipeline:
            futures.extend(await submit_each(pipeline, reading_lines(3)))
            await all_durable(futures)
            assert [w.status for w in fake.seen] == [503, 503, 204]
            assert [w.observed for w in fake.seen] == [False, False, False]
            assert len({w.body for w in fake.seen}) == 1
            assert pipeline.counters.retries == 2
            assert pipeline.counters.points_written == 3


@pytest.mark.integration
async def test_retry_after_of_429_is_honoured(tmp_path: Path) -> None:
    """After a 429 with Retry-After: 1 the retry waits about 1 s, longer than any backoff."""
    async with FakeInflux([(429, {"Retry-After": "1"})]).running() as fake:
        # Without the header, the backoff would never exceed retry_max_s = 0.2 s.
        settings = fake_settings(tmp_path, fake, batch_size=1, retry_max_s=0.2)
        async with running_pipeline(settings) as pipeline:
            futures = await submit_each(pipeline, reading_lines(1))
            await all_durable(futures)
            assert [w.status for w in fake.seen] == [429, 204]
            assert fake.seen[1].at - fake.seen[0].at >= 0.9


# --- Permanent errors -------------------------------------------------------------------------


@pytest.mark.integration
async def test_refused_batch_goes_to_the_dead_letter_file(
    influxdb: LocalServer, influx_db_name: str, tmp_path: Path
) -> None:
    """A real 400 (field type conflict) dead-letters the batch with the reason and acks it."""
    # Field types are fixed per shard: the conflicting point must fall in the same one.
    influx_write(influxdb.url, influx_db_name, f"m v=1i {time.time_ns() - 10**9}")
    settings = hub_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name, batch_size=2)
    lines = [f"m,device=d1 v={n}.5 {time.time_ns() + n}" for n in range(2)]
    async with running_pipeline(settings) as pipeline:
        futures = await submit_each(pipeline, lines)
        await all_durable(futures)
        assert pipeline.counters.dead_lettered_points == 2
        assert pipeline.counters.retries == 0
        assert pipeline.counters.points_written == 0
    records = [json.loads(line) for line in settings.dead_letter_path.read_text().splitlines()]
    assert len(records) == 1
    assert records[0]["status"] == 400
    assert 'field type conflict: input field "v"' in records[0]["reason"]
    assert records[0]["lines"] == lines


# --- InfluxDB away --------------------------------------------------------------------------


@pytest.mark.integration
async def test_acks_are_withheld_while_influx_is_unreachable(tmp_path: Path) -> None:
    """With nothing listening, writes are retried, futures stay pending and nothing is dropped."""
    settings = hub_settings(tmp_path, f"http://127.0.0.1:{free_port()}", batch_size=3)
    async with running_pipeline(settings) as pipeline:
        futures = await submit_each(pipeline, reading_lines(3))
        await eventually(lambda: pipeline.counters.retries >= 3, "three retries")
        assert not any(f.done() for f in futures)
        assert pipeline.pending == 3
        assert pipeline.counters.dead_lettered_points == 0
    assert not settings.dead_letter_path.exists()
    for future in futures:  # failed by close(); retrieve so asyncio does not complain
        if future.done():
            future.exception()


@pytest.mark.integration
async def test_writes_resume_when_influx_comes_back(tmp_path: Path) -> None:
    """Readings submitted while InfluxDB is down are written and acked once it is back."""
    with start_influxdb(tmp_path / "servers") as server:
        create_database(server.url, "db")
        server.kill()
        settings = hub_settings(tmp_path / "state", server.url, influx_bucket="db", batch_size=3)
        settings.state_dir.mkdir()
        async with running_pipeline(settings) as pipeline:
            futures = await submit_each(pipeline, reading_lines(3))
            await eventually(lambda: pipeline.counters.retries >= 2, "two retries")
            assert not any(f.done() for f in futures)
            await asyncio.to_thread(server.restart)
            await all_durable(futures)
            assert count_points(server, "db") == 3


@pytest.mark.integration
async def test_has_room_says_whether_submit_would_wait(tmp_path: Path) -> None:
    """`has_room` is true up to max_pending_readings, and for any message into an empty one."""
    async with FakeInflux(hold=True).running() as fake:
        settings = fake_settings(tmp_path, fake, batch_size=5, max_pending_readings=10)
        async with running_pipeline(settings) as pipeline:
            assert pipeline.has_room(50)  # alone, even larger than the limit
            await submit_each(pipeline, reading_lines(8))
            assert pipeline.has_room(2)
            assert not pipeline.has_room(3)
            fake.release.set()
