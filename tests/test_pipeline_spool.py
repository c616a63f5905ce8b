"""The pipeline with its disk spool, against a real InfluxDB that goes away and comes back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from device_sim.local_servers import LocalServer, create_database, start_influxdb
from hub.ingest.deadletters import DeadLetterFile
from hub.ingest.pipeline import Pipeline
from hub.ingest.sinks import V1Sink
from hub.ingest.spool import Spool, read_status
from hub.options import BatchOptions, InfluxOptions
from hub.settings import Settings
from tests.support import hub_settings
from tests.test_pipeline import all_durable, count_points, eventually, reading_lines

pytestmark = pytest.mark.integration

DB = "spooled"


@asynccontextmanager
async def spooling_pipeline(settings: Settings, with_sink: bool = True) -> AsyncIterator[Pipeline]:
    """A started pipeline with a spool in the state dir, closed on exit."""
    sink = V1Sink(InfluxOptions.of(settings)) if with_sink else None
    spool = Spool(settings.spool_dir, settings.spool_max_bytes)
    pipeline = Pipeline(
        sink,
        DeadLetterFile(settings.dead_letter_path, settings.dead_letter_max_bytes),
        BatchOptions.of(settings),
        spool,
    )
    pipeline.start()
    try:
        yield pipeline
    finally:
        await pipeline.close()


async def test_unreachable_influxdb_spools_then_replays(tmp_path: Path) -> None:
    """With InfluxDB down, submits become durable in the spool and reach InfluxDB later."""
    influx = start_influxdb(tmp_path / "influx")
    try:
        create_database(influx.url, DB)
        influx.kill()
        settings = hub_settings(tmp_path / "state", influx.url, influx_bucket=DB)
        async with spooling_pipeline(settings) as pipeline:
            await all_durable([await pipeline.submit(line, 1) for line in reading_lines(50)])
            assert read_status(settings.spool_dir).points == 50
            assert not pipeline.healthy
            influx.restart()
            await eventually(lambda: count_points(influx, DB) == 50, "the replay")
            await eventually(lambda: read_status(settings.spool_dir).points == 0, "cleanup")
            assert pipeline.healthy
    finally:
        influx.stop()


async def test_a_second_outage_replays_its_own_batches_not_the_first_ones(
    tmp_path: Path,
) -> None:
    """Found by `device-sim chaos` (10 acked readings missing): after the spool emptied, the
    next outage's first batch lay where the last one had, segment 1 at offset 0, and the
    replayer took it for the batch it had checked before and wrote that one again."""
    influx = start_influxdb(tmp_path / "influx")
    try:
        create_database(influx.url, DB)
        settings = hub_settings(tmp_path / "state", influx.url, influx_bucket=DB)
        async with spooling_pipeline(settings) as pipeline:
            for outage in (1, 2):
                influx.kill()
                lines = reading_lines(20, measurement=f"outage{outage}")
                await all_durable([await pipeline.submit("\n".join(lines), 20)])
                assert read_status(settings.spool_dir).points == 20
                influx.restart()
                await eventually(lambda: read_status(settings.spool_dir).points == 0, "replay")
                await eventually(
                    lambda m=f"outage{outage}": count_points(influx, DB, m) == 20,  # type: ignore[misc]
                    f"outage {outage}'s readings in InfluxDB",
                )
    finally:
        influx.stop()


async def test_batch_too_big_for_the_spool_is_written_when_influxdb_returns(
    tmp_path: Path,
) -> None:
    """A batch the spool cannot hold waits unacked and goes to InfluxDB once it is back."""
    influx = start_influxdb(tmp_path / "influx")
    try:
        create_database(influx.url, DB)
        influx.kill()
        settings = hub_settings(
            tmp_path / "state", influx.url, influx_bucket=DB, spool_max_bytes=10
        )
        async with spooling_pipeline(settings) as pipeline:
            durable = await pipeline.submit("\n".join(reading_lines(20)), 20)
            await asyncio.sleep(0.5)
            assert not durable.done()
            influx.restart()
            await all_durable([durable])
            assert count_points(influx, DB) == 20
    finally:
        influx.stop()


async def test_a_broken_spool_directory_keeps_batches_and_writers(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A spool that cannot be written (disk error) keeps the batch unacked, not lost, and
    the writers go on once InfluxDB takes writes."""
    dead = f"http://127.0.0.1:{1}"
    settings = hub_settings(tmp_path / "state", dead, influx_bucket=influx_db_name)
    async with spooling_pipeline(settings) as pipeline:
        assert pipeline.spool is not None
        for segment in settings.spool_dir.iterdir():
            segment.unlink()
        settings.spool_dir.rmdir()
        settings.spool_dir.write_text("not a directory")  # every append now fails
        durable = await pipeline.submit(reading_lines(1)[0], 1)
        await asyncio.sleep(0.5)
        assert not durable.done()
        assert pipeline.sink is not None
        pipeline.sink = V1Sink(
            InfluxOptions.of(
                hub_settings(tmp_path / "s2", influxdb.url, influx_bucket=influx_db_name)
            )
        )
        await all_durable([durable])
        assert count_points(influxdb, influx_db_name) == 1


async def test_spool_only_mode_keeps_everything_for_a_later_influxdb(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Without any InfluxDB, submits are durable in the spool; a later hub with one replays."""
    settings = hub_settings(tmp_path / "state", None, influx_bucket=influx_db_name)
    async with spooling_pipeline(settings, with_sink=False) as pipeline:
        await all_durable([await pipeline.submit(line, 1) for line in reading_lines(30)])
    assert read_status(settings.spool_dir).points == 30
    configured = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    async with spooling_pipeline(configured):
        await eventually(lambda: count_points(influxdb, influx_db_name) == 30, "the replay")


async def test_live_batches_and_a_long_backlog_both_progress(tmp_path: Path) -> None:
    """Once InfluxDB is back, live batches are written while the backlog still replays, and
    the backlog drains while live traffic goes on."""
    influx = start_influxdb(tmp_path / "influx")
    try:
        create_database(influx.url, DB)
        influx.kill()
        settings = hub_settings(tmp_path / "state", influx.url, influx_bucket=DB, batch_size=500)
        async with spooling_pipeline(settings) as pipeline:
            backlog = [
                await pipeline.submit("\n".join(reading_lines(500, f"backlog{n}")), 500)
                for n in range(60)
            ]
            await all_durable(backlog)
            influx.restart()
            await eventually(lambda: pipeline.healthy, "InfluxDB to be seen healthy again")
            live = await pipeline.submit("\n".join(reading_lines(10, "live")), 10)
            await all_durable([live])
            assert count_points(influx, DB, "live") == 10
            assert read_status(settings.spool_dir).batches > 0, "live waited for the backlog"
            more_live = [
                await pipeline.submit("\n".join(reading_lines(10, "live2")), 10) for _ in range(5)
            ]
            await eventually(
                lambda: read_status(settings.spool_dir).batches == 0, "the backlog to drain"
            )
            await all_durable(more_live)
    finally:
        influx.stop()
