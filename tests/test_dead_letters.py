"""Dead letters: only the points InfluxDB refused, counted exactly, in capped rotated files.

The split of a partial write is tested first against a fake writer (the orders a real server
cannot be made to give: a transient failure half-way, a deadline), then through the
pipeline against the real InfluxDB 1.6.7 the suite starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import aiohttp
import pytest

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer, influx_write, influxql
from hub.cli.check import describe as describe_settings
from hub.core.dialects import Dialect
from hub.errors import ConfigError, PermanentWriteError, TransientWriteError
from hub.ingest.deadletters import (
    ROTATED_FILES,
    DeadLetterFile,
    RefusedPart,
    find_refused,
)
from hub.ingest.pipeline import Pipeline
from hub.ingest.sinks import V1Sink, classify
from hub.options import BatchOptions, InfluxOptions
from hub.settings import LIVE_SETTINGS, Settings, load_settings, setting_origins
from tests.support import add_device, hub_settings, points, running_hub

WAIT_S = 10.0


class PartialWriter:
    """Answers like InfluxDB 1.x: stores every line without "bad", refuses those with it in a
    partial write saying how many it dropped; optionally fails transiently after some writes."""

    def __init__(self, transient_after: int | None = None) -> None:
        self.stored: set[str] = set()
        self.writes = 0
        self.transient_after = transient_after

    async def __call__(self, body: bytes) -> None:
        self.writes += 1
        if self.transient_after is not None and self.writes > self.transient_after:
            raise TransientWriteError("connection reset")
        lines = body.decode().split("\n")
        bad = [line for line in lines if "bad" in line]
        self.stored.update(line for line in lines if "bad" not in line)
        if bad:
            raise classify(400, f"partial write: conflict on {bad[0]!r} dropped={len(bad)}", None)


def batch(count: int, bad: set[int]) -> list[str]:
    """`count` lines, those at `bad` refused by `PartialWriter`."""
    return [f"m,device={'bad' if n in bad else 'ok'} v={n} {n}" for n in range(count)]


async def refuse(writer: PartialWriter, lines: list[str]) -> PermanentWriteError:
    """The writer's answer to the whole batch."""
    with pytest.raises(PermanentWriteError) as caught:
        await writer("\n".join(lines).encode())
    return caught.value


def refused_lines(parts: list[RefusedPart]) -> list[str]:
    """Every line of `parts`, in order."""
    return sorted(line for part in parts for line in part.lines)


# --- Finding the refused points (fake writer) -------------------------------------------------


@pytest.mark.unit
async def test_split_finds_exactly_the_refused_points() -> None:
    """Three refused points among 1,000 are found exactly, within the write budget."""
    lines = batch(1000, {3, 500, 999})
    writer = PartialWriter()
    error = await refuse(writer, lines)
    assert error.dropped == 3
    parts = await find_refused(writer, lines, error, time.monotonic() + WAIT_S)
    assert all(part.exact for part in parts)
    assert refused_lines(parts) == sorted(lines[n] for n in (3, 500, 999))
    assert writer.writes - 1 <= 64
    assert writer.stored == {line for line in lines if "bad" not in line}


@pytest.mark.unit
async def test_split_work_is_bounded_and_counts_stay_exact() -> None:
    """With refused points everywhere the budget runs out: what is left is kept whole,
    marked inexact, with the server's count, so the counts still add up to what it dropped."""
    lines = batch(1000, set(range(0, 1000, 7)))
    writer = PartialWriter()
    error = await refuse(writer, lines)
    parts = await find_refused(writer, lines, error, time.monotonic() + WAIT_S, max_writes=16)
    assert writer.writes - 1 <= 16
    assert sum(part.dropped for part in parts) == error.dropped == 143
    assert any(not part.exact for part in parts)
    assert {line for line in lines if "bad" in line} <= set(refused_lines(parts))


@pytest.mark.unit
async def test_split_stops_at_a_transient_failure() -> None:
    """A write failing half-way ends the search: nothing refused is lost from the parts."""
    lines = batch(64, {1, 40})
    writer = PartialWriter(transient_after=3)
    error = await refuse(writer, lines)
    parts = await find_refused(writer, lines, error, time.monotonic() + WAIT_S)
    assert sum(part.dropped for part in parts) == 2
    assert {lines[1], lines[40]} <= set(refused_lines(parts))


@pytest.mark.unit
async def test_split_stops_at_its_deadline() -> None:
    """Past `give_up_at` nothing more is written; the batch is kept as refused."""
    lines = batch(10, {2})
    writer = PartialWriter()
    error = await refuse(writer, lines)
    parts = await find_refused(writer, lines, error, time.monotonic())
    assert writer.writes == 1
    assert [(part.lines, part.dropped, part.exact) for part in parts] == [(lines, 1, False)]


# --- The file: cap, rotation, warning ---------------------------------------------------------


def refused(lines: list[str]) -> RefusedPart:
    """An exact refused part of `lines`."""
    return RefusedPart(lines, PermanentWriteError("field type conflict", 400), len(lines))


def files_of(path: Path) -> list[Path]:
    """The dead-letter file and its rotated copies that exist."""
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name))


@pytest.mark.unit
def test_file_rotates_within_its_cap_and_counts_what_it_deletes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Many refused points: never more than max_bytes on disk nor 1 + ROTATED_FILES files;
    the oldest go first, counted and logged; the newest are always there."""
    path = tmp_path / "dead-letters.jsonl"
    dead = DeadLetterFile(path, 64 * 1024)
    appended = 0
    with caplog.at_level(logging.WARNING, "hub.deadletters"):
        for n in range(400):
            dead.append(refused([f"m,device=d{n} v={k} {k}" for k in range(20)]))
            appended += 20
            on_disk = sum(p.stat().st_size for p in files_of(path))
            assert on_disk == dead.size <= 64 * 1024
    assert len(files_of(path)) == 1 + ROTATED_FILES
    kept = sum(
        json.loads(line)["dropped"] for p in files_of(path) for line in p.read_text().splitlines()
    )
    assert dead.discarded_points > 0
    assert kept + dead.discarded_points == appended
    assert "m,device=d399 v=19 19" in path.read_text()
    assert any("use" in r.message and "dead_letter_max_bytes" in r.message for r in caplog.records)
    assert any("deleted the oldest file" in r.message for r in caplog.records)
    assert all(p.stat().st_mode & 0o077 == 0 for p in files_of(path))


@pytest.mark.unit
def test_warning_comes_once_at_80_percent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Below 80 % no warning; crossing it, one."""
    dead = DeadLetterFile(tmp_path / "dl.jsonl", 64 * 1024, rotated=0)
    line = "x" * 1000
    with caplog.at_level(logging.WARNING, "hub.deadletters"):
        while dead.size < 0.75 * 64 * 1024:
            dead.append(refused([line]))
        assert not caplog.records
        while dead.size < 0.85 * 64 * 1024:
            dead.append(refused([line]))
    assert len(caplog.records) == 1


@pytest.mark.unit
def test_a_record_larger_than_a_file_is_cut_and_counted(tmp_path: Path) -> None:
    """A huge refused batch keeps the lines that fit; the rest is counted as discarded."""
    path = tmp_path / "dl.jsonl"
    dead = DeadLetterFile(path, 64 * 1024)
    dead.append(refused([f"m v={n} {n}" for n in range(10_000)]))
    record = json.loads(path.read_text())
    assert path.stat().st_size <= 64 * 1024 // (ROTATED_FILES + 1)
    assert record["omitted_lines"] == dead.discarded_points == 10_000 - len(record["lines"])
    assert record["lines"][0] == "m v=0 0"


@pytest.mark.unit
def test_sizes_of_files_left_from_before_count(tmp_path: Path) -> None:
    """A restarted hub counts the dead letters already on disk against the cap."""
    path = tmp_path / "dl.jsonl"
    DeadLetterFile(path, 64 * 1024).append(refused(["m v=1 1"]))
    assert DeadLetterFile(path, 64 * 1024).size == path.stat().st_size > 0


# --- The setting --------------------------------------------------------------------------


@pytest.mark.unit
def test_dead_letter_max_bytes_from_flag_environment_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like every setting: flag over HUB_ variable over config file, shown by check-config
    with its origin; restart-only; too small a value is a clear error."""
    config = tmp_path / "hub.toml"
    config.write_text("dead_letter_max_bytes = 200000\n")
    assert load_settings(config).dead_letter_max_bytes == 200_000
    monkeypatch.setenv("HUB_DEAD_LETTER_MAX_BYTES", "300000")
    assert load_settings(config).dead_letter_max_bytes == 300_000
    assert load_settings(config, dead_letter_max_bytes=400_000).dead_letter_max_bytes == 400_000
    origins = setting_origins(config)
    lines = describe_settings(load_settings(config), origins)
    assert any(
        line.startswith("dead_letter_max_bytes = 300000") and line.endswith("# environment")
        for line in lines
    )
    assert "dead_letter_max_bytes" not in LIVE_SETTINGS
    assert Settings.model_fields["dead_letter_max_bytes"].default == 64 * 2**20
    with pytest.raises(ConfigError, match="dead_letter_max_bytes: Input should be greater"):
        load_settings(config, dead_letter_max_bytes=1000)


# --- Through the pipeline: a fake sink, then the real InfluxDB --------------------------------


class FakeSink:
    """A sink answering like `PartialWriter`, for the pipeline."""

    name = "v1"
    dialect = Dialect.STRICT  # a server of no known kind: no field types checked first

    def __init__(self) -> None:
        self.writer = PartialWriter()

    async def detect(self) -> None:
        """Nothing to learn."""

    async def write(self, body: bytes) -> None:
        """As InfluxDB 1.x would."""
        await self.writer(body)

    async def close(self) -> None:
        """Nothing to release."""


def pipeline_for(settings: Settings, sink: V1Sink | FakeSink) -> Pipeline:
    """A pipeline with the settings' dead-letter file, no spool."""
    dead = DeadLetterFile(settings.dead_letter_path, settings.dead_letter_max_bytes)
    return Pipeline(sink, dead, BatchOptions.of(settings))


@pytest.mark.unit
async def test_pipeline_dead_letters_only_refused_points_and_acks_all(tmp_path: Path) -> None:
    """Fake sink: a batch of 200 with 2 refused points acks all, counts 198 written and 2
    dead-lettered, and keeps only those 2."""
    settings = hub_settings(tmp_path, "http://127.0.0.1:9", batch_size=200)
    sink = FakeSink()
    pipeline = pipeline_for(settings, sink)
    pipeline.start()
    lines = batch(200, {17, 150})
    try:
        futures = [await pipeline.submit(line, 1) for line in lines]
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*futures)
        assert pipeline.counters.dead_lettered_points == 2
        assert pipeline.counters.points_written == 198
    finally:
        await pipeline.close()
    records = [json.loads(line) for line in settings.dead_letter_path.read_text().splitlines()]
    assert sorted(line for r in records for line in r["lines"]) == sorted([lines[17], lines[150]])
    assert all(r["exact"] and r["status"] == 400 for r in records)


@pytest.mark.integration
async def test_partial_write_to_real_influxdb_dead_letters_only_the_conflict(
    influxdb: LocalServer, influx_db_name: str, tmp_path: Path
) -> None:
    """InfluxDB 1.6.7 refuses one point of a batch mixing devices: the others are stored and
    acked, only that one is in the dead letters, and the counts are InfluxDB's."""
    now = time.time_ns()
    influx_write(influxdb.url, influx_db_name, f'shared t="poison" {now - 10**9}')
    settings = hub_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name, batch_size=50)
    lines = [f"shared,device=d{n} t={n}.5 {now + n}" for n in range(49)]
    lines.insert(20, f"shared,device=victim t=21.5 {now + 100}")
    lines = [line.replace("shared,", "other,") if "victim" not in line else line for line in lines]
    pipeline = pipeline_for(settings, V1Sink(InfluxOptions.of(settings)))
    pipeline.start()
    try:
        futures = [await pipeline.submit(line, 1) for line in lines]
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*futures)
        assert pipeline.counters.dead_lettered_points == 1
        assert pipeline.counters.points_written == 49
    finally:
        await pipeline.close()
    records = [json.loads(line) for line in settings.dead_letter_path.read_text().splitlines()]
    assert [(r["lines"], r["dropped"], r["exact"]) for r in records] == [
        ([f"shared,device=victim t=21.5 {now + 100}"], 1, True)
    ]
    assert 'field type conflict: input field "t" on measurement "shared"' in records[0]["reason"]
    rows = influxql(influxdb.url, influx_db_name, 'SELECT count("t") FROM "other"')
    assert rows[0]["count"] == 49
    # Learnt from InfluxDB's answer: the next such reading is refused before its ack.
    assert pipeline.field_catalog.check("shared", {"t": 1.5}, now + 200) is not None


@pytest.mark.integration
async def test_dead_letters_are_capped_against_real_influxdb(
    influxdb: LocalServer, influx_db_name: str, tmp_path: Path
) -> None:
    """Hundreds of refused batches fill at most dead_letter_max_bytes, every refused point
    counted as dead-lettered, those deleted to make room counted too; /metrics says so."""
    now = time.time_ns()
    influx_write(influxdb.url, influx_db_name, f"m v=1i {now - 10**9}")
    settings = hub_settings(
        tmp_path,
        influxdb.url,
        influx_bucket=influx_db_name,
        batch_size=20,
        dead_letter_max_bytes=64 * 1024,
    )
    async with running_hub(settings) as service:
        pipeline = service.hub.pipeline
        futures = [
            await pipeline.submit(f"m,device=d1,pad={'p' * 40} v={n}.5 {now + n}", 1)
            for n in range(3000)
        ]
        async with asyncio.timeout(60):
            await asyncio.gather(*futures)
        assert pipeline.counters.dead_lettered_points == 3000
        assert pipeline.dead_letters.discarded_points > 0
        assert pipeline.dead_letters.size <= 64 * 1024
        async with (
            aiohttp.ClientSession() as session,
            session.get(service.health.url + "/metrics") as response,
        ):
            text = await response.text()
    on_disk = sum(p.stat().st_size for p in files_of(settings.dead_letter_path))
    assert on_disk <= 64 * 1024
    assert f"hub_dead_letter_max_bytes {64 * 1024:.1f}" in text
    assert "hub_dead_letter_points_total 3000.0" in text
    assert "hub_dead_letter_bytes " in text
    assert "hub_dead_letter_discarded_points_total 0.0" not in text


@pytest.mark.integration
async def test_poisoned_field_flood_neither_grows_dead_letters_nor_loses_others_points(
    influxdb: LocalServer, influx_db_name: str, tmp_path: Path
) -> None:
    """The attack of issue 16 item 5: a device fixes `shared t` as a string, then floods
    floats to it while another device streams. The floats are rejected in their acks, the
    dead letters stay empty, and every point of the other device is stored."""
    settings = hub_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name)
    attacker, victim = add_device(settings, "attacker"), add_device(settings, "victim")
    now_ms = time.time_ns() // 10**6
    async with (
        running_hub(settings) as service,
        DeviceClient(service.url, attacker) as bad,
        DeviceClient(service.url, victim) as good,
    ):
        poison = await bad.store([{"name": "shared", "time": now_ms, "fields": {"t": "poison"}}])
        assert poison.accepted == 1
        flood, stream = [], []
        for frame in range(45):
            flood.append(
                await bad.send_readings(
                    [
                        {"name": "shared", "time": now_ms + frame * 1000 + n, "fields": {"t": 0.5}}
                        for n in range(1, 1000)
                    ]
                )
            )
            stream.append(
                await good.send_readings(
                    [
                        {"name": "shared", "time": now_ms + frame, "fields": {"t": "21.5"}},
                        {"name": "room", "time": now_ms + frame, "fields": {"t": 21.5}},
                    ]
                )
            )
        async with asyncio.timeout(60):
            flood_acks = await asyncio.gather(*flood)
        async with asyncio.timeout(60):
            stream_acks = await asyncio.gather(*stream)
        assert service.hub.pipeline.counters.dead_lettered_points == 0
    assert all(ack.accepted == 0 and len(ack.rejected_indices()) == 999 for ack in flood_acks)
    assert flood_acks[0].rejected[0].errors == [
        "field t is a string in shared; this reading sends a float"
    ]
    assert all((ack.accepted, ack.rejected) == (2, []) for ack in stream_acks)
    assert len(points(influxdb, influx_db_name, "room")) == 45
    assert (
        len([p for p in points(influxdb, influx_db_name, "shared") if p["device"] == "victim"])
        == 45
    )
    assert not settings.dead_letter_path.exists()


@pytest.mark.integration
async def test_unforeseeable_conflict_is_dead_lettered_alone_then_refused_in_the_ack(
    influxdb: LocalServer, influx_db_name: str, tmp_path: Path
) -> None:
    """Another writer fixes a field's type after the hub asked InfluxDB: the next reading is
    acked (the hub could not know), only it is dead-lettered, its message's other reading is
    stored, and from InfluxDB's answer the hub learns to refuse the following one in its ack."""
    settings = hub_settings(tmp_path, influxdb.url, influx_bucket=influx_db_name)
    token = add_device(settings, "d1")
    async with running_hub(settings) as service:
        catalog = service.hub.pipeline.field_catalog
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while catalog.shard_ns == 3600 * 10**9:  # until the start-up question is answered
            assert loop.time() < deadline, "the hub never asked InfluxDB for its field types"
            await asyncio.sleep(0.02)
        now_ms = time.time_ns() // 10**6
        influx_write(influxdb.url, influx_db_name, f'late t="x" {(now_ms - 1000) * 10**6}')
        async with DeviceClient(service.url, token) as client:
            async with asyncio.timeout(WAIT_S):
                first = await client.store(
                    [
                        {"name": "late", "time": now_ms, "fields": {"t": 1.5}},
                        {"name": "fine", "time": now_ms, "fields": {"t": 1.5}},
                    ]
                )
            async with asyncio.timeout(WAIT_S):
                second = await client.store(
                    [{"name": "late", "time": now_ms + 1, "fields": {"t": 2.5}}]
                )
        assert service.hub.pipeline.counters.dead_lettered_points == 1
    assert (first.accepted, first.rejected) == (2, [])
    assert second.accepted == 0
    assert second.rejected[0].errors == ["field t is a string in late; this reading sends a float"]
    records = [json.loads(line) for line in settings.dead_letter_path.read_text().splitlines()]
    assert [(len(r["lines"]), r["dropped"], r["exact"]) for r in records] == [(1, 1, True)]
    assert records[0]["lines"][0].startswith("late,device=d1 t=1.5 ")
    assert len(points(influxdb, influx_db_name, "fine")) == 1
