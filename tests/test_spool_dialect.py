"""Spooled batches remember their dialect; replayed to a server of another kind they are
re-checked, and what that server cannot store exactly is dead-lettered with the reason.

The file-format tests need no server; the replays go to the real InfluxDB 1.6.7 and
VictoriaMetrics the suite starts.
"""

from __future__ import annotations

import json
import struct
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest

from device_sim.local_servers import LocalServer, influxql_series, vm_export
from hub.core.dialects import Dialect
from hub.core.lineprotocol import format_point
from hub.ingest.deadletters import DeadLetterFile
from hub.ingest.pipeline import Pipeline
from hub.ingest.sinks import V1Sink, V2Sink
from hub.ingest.spool import SEGMENT_SUFFIX, Spool, read_status
from hub.options import BatchOptions, InfluxOptions
from tests.support import hub_settings
from tests.test_pipeline import all_durable, eventually
from tests.test_pipeline_spool import spooling_pipeline

# --- the file format ------------------------------------------------------------------------


def legacy_record(body: bytes, points: int, written_at: float) -> bytes:
    """A record as hubs before dialects wrote it: magic HSP1, no dialect byte."""
    checked = struct.pack("<Id", points, written_at)
    crc = zlib.crc32(body, zlib.crc32(checked))
    return struct.pack("<4sIIId", b"HSP1", len(body), crc, points, written_at) + body


def write_segment(directory: Path, number: int, data: bytes) -> None:
    """A spool segment file holding `data`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{number:012d}{SEGMENT_SUFFIX}").write_bytes(data)


@pytest.mark.unit
def test_a_batch_comes_back_with_its_dialect(tmp_path: Path) -> None:
    """The dialect a batch was appended with is read back, also after reopening."""
    spool = Spool(tmp_path, max_bytes=2**20)
    for dialect in Dialect:
        assert spool.append(f"m f=1 {dialect.code}".encode(), 1, dialect)
    spool.close()
    reopened = Spool(tmp_path, max_bytes=2**20)
    replayed = []
    while (batch := reopened.oldest()) is not None:
        replayed.append((batch.body, batch.dialect))
        reopened.written(batch)
    assert replayed == [(f"m f=1 {d.code}".encode(), d) for d in Dialect]


@pytest.mark.unit
def test_old_spool_files_without_a_dialect_still_replay(tmp_path: Path) -> None:
    """HSP1 records (no dialect byte) replay as legacy (strict rules, line feeds in strings),
    beside new records in one segment."""
    old = legacy_record(b"m f=1 1", 1, 100.0) + legacy_record(b"m f=2 2\nm f=3 3", 2, 101.0)
    write_segment(tmp_path, 1, old)
    status = read_status(tmp_path)
    assert (status.batches, status.points, status.oldest, status.skipped_bytes) == (
        2,
        3,
        100.0,
        0,
    )
    spool = Spool(tmp_path, max_bytes=2**20)
    spool.append(b"m f=4 4", 1, Dialect.INFLUXDB_1)
    batches = []
    while (batch := spool.oldest()) is not None:
        batches.append((batch.body, batch.points, batch.dialect))
        spool.written(batch)
    assert batches == [
        (b"m f=1 1", 1, Dialect.LEGACY),
        (b"m f=2 2\nm f=3 3", 2, Dialect.LEGACY),
        (b"m f=4 4", 1, Dialect.INFLUXDB_1),
    ]


@pytest.mark.unit
def test_a_damaged_old_record_is_a_torn_tail_like_a_new_one(tmp_path: Path) -> None:
    """A legacy record with a bad checksum ends its segment, as new records do."""
    record = bytearray(legacy_record(b"m f=1 1", 1, 100.0))
    record[-1] ^= 0xFF
    write_segment(tmp_path, 1, legacy_record(b"m f=0 0", 1, 99.0) + bytes(record))
    status = read_status(tmp_path)
    assert (status.batches, status.skipped_bytes) == (1, len(record))


@pytest.mark.unit
def test_the_dialect_byte_is_covered_by_the_checksum(tmp_path: Path) -> None:
    """A flipped dialect byte is damage, not another dialect."""
    spool = Spool(tmp_path, max_bytes=2**20)
    spool.append(b"m f=1 1", 1, Dialect.VICTORIA_METRICS)
    spool.close()
    segment = next(tmp_path.glob("*" + SEGMENT_SUFFIX))
    data = bytearray(segment.read_bytes())
    data[24] = Dialect.INFLUXDB_1.code  # the byte after magic, sizes, CRC, points and time
    segment.write_bytes(bytes(data))
    assert read_status(tmp_path).skipped_bytes == len(data)


@pytest.mark.unit
def test_an_unknown_dialect_code_is_kept_as_unknown(tmp_path: Path) -> None:
    """A record from a newer hub, with a dialect this one does not know, is not guessed at."""
    body, points, now = b"m f=1 1", 1, 100.0
    checked = struct.pack("<IdB", points, now, 99)
    crc = zlib.crc32(body, zlib.crc32(checked))
    write_segment(
        tmp_path, 1, struct.pack("<4sIIIdB", b"HSP2", len(body), crc, points, now, 99) + body
    )
    batch = Spool(tmp_path, max_bytes=2**20).oldest()
    assert batch is not None and batch.dialect is None and batch.body == body


# --- replays to real servers ----------------------------------------------------------------


def dead_letters(path: Path) -> list[dict[str, Any]]:
    """The dead-letter file's records."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def influx_tags(server: LocalServer, db: str, measurement: str) -> list[dict[str, Any]]:
    """Every point of `measurement` as its non-null columns."""
    rows = []
    for series in influxql_series(server.url, db, f'SELECT * FROM "{measurement}"'):
        for values in series["values"]:
            row = dict(zip(series["columns"], values, strict=True))
            rows.append({k: v for k, v in row.items() if v is not None})
    return rows


@pytest.mark.integration
async def test_victoria_metrics_batches_replayed_to_influxdb_are_rechecked(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A backlog formatted for VictoriaMetrics replays to InfluxDB 1.6.7 respelled, exactly;
    the point InfluxDB cannot store exactly is dead-lettered with the reason."""
    now = time.time_ns()
    vm = Dialect.VICTORIA_METRICS
    exact = format_point("p", {"path": "C:\\ dir\\,x\\=y"}, {"v": 1.0}, now, vm)
    trailing = format_point("p", {"path": "C:\\"}, {"v": 2.0}, now + 1, vm)
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    spool = Spool(settings.spool_dir, settings.spool_max_bytes)
    assert spool.append(f"{exact}\n{trailing}".encode(), 2, vm)
    spool.close()
    async with spooling_pipeline(settings) as pipeline:
        await eventually(lambda: read_status(settings.spool_dir).batches == 0, "the replay")
        assert pipeline.counters.points_replayed == 1
        assert pipeline.counters.dead_lettered_points == 1
    assert influx_tags(influxdb, influx_db_name, "p") == [
        {"time": now, "path": "C:\\ dir\\,x\\=y", "v": 1.0}
    ]
    (record,) = dead_letters(settings.dead_letter_path)
    assert record["lines"] == [trailing]
    assert "ends with a backslash" in record["reason"] and "influxdb1" in record["reason"]


@pytest.mark.integration
async def test_old_spool_replays_to_influxdb_with_line_feeds_in_strings(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """An HSP1 spool of an older hub (which let InfluxDB have line feeds in strings) replays
    to InfluxDB 1.6.7 exactly, line feed included."""
    now = time.time_ns()
    line = format_point("old", {"t": "a b"}, {"s": "one\ntwo"}, now, Dialect.INFLUXDB_1)
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    write_segment(settings.spool_dir, 1, legacy_record(line.encode(), 1, time.time()))
    async with spooling_pipeline(settings):
        await eventually(lambda: read_status(settings.spool_dir).batches == 0, "the replay")
    assert influx_tags(influxdb, influx_db_name, "old") == [
        {"time": now, "t": "a b", "s": "one\ntwo"}
    ]
    assert dead_letters(settings.dead_letter_path) == []


@pytest.mark.integration
async def test_old_spool_replayed_to_victoria_metrics_keeps_line_feeds_out(
    tmp_path: Path, victoria_metrics: LocalServer
) -> None:
    """The same old spool replayed to VictoriaMetrics: the point with a line feed (which it
    would split into another point) is dead-lettered, the others are written."""
    now_ms = time.time_ns() // 10**6
    measurement = f"old_{uuid.uuid4().hex[:8]}"
    good = format_point(measurement, {"t": "x"}, {"v": 1.0}, now_ms * 10**6)
    split = format_point(
        measurement, {}, {"s": f"a\n{measurement},t=evil v=9 1"}, now_ms * 10**6 + 1,
        Dialect.INFLUXDB_1,
    )  # fmt: skip
    settings = hub_settings(tmp_path / "state", victoria_metrics.url)
    write_segment(settings.spool_dir, 1, legacy_record(f"{good}\n{split}".encode(), 2, time.time()))
    sink = V2Sink(InfluxOptions.of(settings), Dialect.VICTORIA_METRICS)
    spool = Spool(settings.spool_dir, settings.spool_max_bytes)
    dead = DeadLetterFile(settings.dead_letter_path, settings.dead_letter_max_bytes)
    pipeline = Pipeline(sink, dead, BatchOptions.of(settings), spool)
    pipeline.start()
    try:
        await eventually(lambda: read_status(settings.spool_dir).batches == 0, "the replay")
    finally:
        await pipeline.close()
    series = vm_export(victoria_metrics.url, f'{{__name__=~"{measurement}_.*"}}')
    assert [(s["metric"]["__name__"], s["metric"].get("t"), s["values"]) for s in series] == [
        (f"{measurement}_v", "x", [1.0])
    ]
    (record,) = dead_letters(settings.dead_letter_path)
    assert record["lines"] == [split]  # one entry a point, its line feed kept inside
    assert "line feed" in record["reason"]


@pytest.mark.integration
async def test_a_batch_of_an_unknown_dialect_is_dead_lettered(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Text formatted for a dialect this hub does not know is kept aside, never written."""
    body, now = f"m f=1 {time.time_ns()}".encode(), 100.0
    checked = struct.pack("<IdB", 1, now, 99)
    crc = zlib.crc32(body, zlib.crc32(checked))
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    write_segment(
        settings.spool_dir, 1, struct.pack("<4sIIIdB", b"HSP2", len(body), crc, 1, now, 99) + body
    )
    async with spooling_pipeline(settings):
        await eventually(lambda: read_status(settings.spool_dir).batches == 0, "the replay")
    (record,) = dead_letters(settings.dead_letter_path)
    assert "does not know" in record["reason"]
    assert influx_tags(influxdb, influx_db_name, "m") == []


@pytest.mark.integration
async def test_live_lines_of_another_dialect_are_respelled_for_the_server(
    tmp_path: Path, victoria_metrics: LocalServer
) -> None:
    """Lines submitted as formatted for InfluxDB 1.x reach VictoriaMetrics in its spelling:
    `C:\\ dir` reads back as it was sent."""
    now_ms = time.time_ns() // 10**6
    measurement = f"live_{uuid.uuid4().hex[:8]}"
    line = format_point(
        measurement, {"path": "C:\\ dir"}, {"v": 1.0}, now_ms * 10**6, Dialect.INFLUXDB_1
    )
    settings = hub_settings(tmp_path / "state", victoria_metrics.url)
    pipeline = Pipeline(
        V2Sink(InfluxOptions.of(settings), Dialect.VICTORIA_METRICS),
        DeadLetterFile(settings.dead_letter_path, settings.dead_letter_max_bytes),
        BatchOptions.of(settings),
    )
    pipeline.start()
    try:
        await all_durable([await pipeline.submit(line, 1, Dialect.INFLUXDB_1)])
    finally:
        await pipeline.close()
    series = vm_export(victoria_metrics.url, f'{{__name__=~"{measurement}_.*"}}')
    assert [s["metric"]["path"] for s in series] == ["C:\\ dir"]


@pytest.mark.unit
def test_v1_sink_is_influxdb_1(tmp_path: Path) -> None:
    """The v1 API is only InfluxDB 1.x's: its sink's dialect says so without asking."""
    assert (
        V1Sink(InfluxOptions.of(hub_settings(tmp_path, "http://127.0.0.1:1"))).dialect
        is Dialect.INFLUXDB_1
    )
