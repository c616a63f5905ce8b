"""The disk spool's file format, without servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.ingest.spool import SEGMENT_SUFFIX, Spool, encode_record, read_status, scan_segment

pytestmark = pytest.mark.unit


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def drain(spool: Spool) -> list[bytes]:
    """Replay everything, oldest first, marking each batch written."""
    bodies = []
    while (batch := spool.oldest()) is not None:
        bodies.append(batch.body)
        spool.written(batch)
    return bodies


def test_batches_replay_in_order(directory: Path) -> None:
    """Batches come back oldest first, with their point counts."""
    spool = Spool(directory, max_bytes=2**20)
    for n in range(5):
        assert spool.append(f"m f={n} {n}".encode(), 1)
    assert spool.status().points == 5
    assert drain(spool) == [f"m f={n} {n}".encode() for n in range(5)]
    assert spool.empty


def test_batches_survive_reopening(directory: Path) -> None:
    """What was appended is replayed by a spool opened later on the same directory."""
    spool = Spool(directory, max_bytes=2**20)
    spool.append(b"m f=1 1", 1)
    spool.append(b"m f=2 2", 1)
    spool.close()
    assert drain(Spool(directory, max_bytes=2**20)) == [b"m f=1 1", b"m f=2 2"]


def test_segment_is_deleted_only_when_fully_written(directory: Path) -> None:
    """A segment file stays until its last batch is written, then disappears."""
    spool = Spool(directory, max_bytes=2**20, segment_bytes=100)
    for n in range(4):
        spool.append(b"x" * 60 + str(n).encode(), 1)
    files = sorted(directory.glob("*" + SEGMENT_SUFFIX))
    assert len(files) == 4
    first = spool.oldest()
    assert first is not None
    spool.written(first)
    assert not files[0].exists() and files[1].exists()


def test_a_batch_after_the_spool_emptied_is_not_where_the_last_one_was(directory: Path) -> None:
    """Segment numbers are not reused while the spool is open: the replayer knows a batch by
    its segment and offset, and took a new batch at a reused (1, 0) for the one before."""
    spool = Spool(directory, max_bytes=2**20)
    spool.append(b"m f=1 1", 1)
    first = spool.oldest()
    assert first is not None
    spool.written(first)
    assert spool.empty and not list(directory.glob("*" + SEGMENT_SUFFIX))
    spool.append(b"m f=2 2", 1)
    second = spool.oldest()
    assert second is not None and second.body == b"m f=2 2"
    assert (second.segment, second.offset) != (first.segment, first.offset)
    spool.close()
    reopened = Spool(directory, max_bytes=2**20)
    reopened.append(b"m f=3 3", 1)
    assert [b.segment for b in (reopened.oldest(),) if b] == [second.segment]
    assert drain(reopened) == [b"m f=2 2", b"m f=3 3"]


def test_partially_replayed_segment_replays_again_after_restart(directory: Path) -> None:
    """A crash mid-segment replays that whole segment: nothing acked is skipped."""
    spool = Spool(directory, max_bytes=2**20)
    spool.append(b"a 1", 1)
    spool.append(b"b 2", 1)
    first = spool.oldest()
    assert first is not None
    spool.written(first)
    spool.close()
    assert drain(Spool(directory, max_bytes=2**20)) == [b"a 1", b"b 2"]


def test_full_spool_refuses_and_stores_nothing(directory: Path) -> None:
    """Past max_bytes an append returns False and the spool is unchanged."""
    record = len(encode_record(b"x" * 100, 1, 0.0))
    spool = Spool(directory, max_bytes=record * 2)
    assert spool.append(b"x" * 100, 1) and spool.append(b"x" * 100, 1)
    assert not spool.append(b"x" * 100, 1)
    assert spool.status().batches == 2


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_tail_is_skipped_and_later_segments_replay(
    directory: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A torn or corrupt tail is reported once with its size; the rest replays."""
    spool = Spool(directory, max_bytes=2**20, segment_bytes=60)
    for body in (b"first 1", b"second 2", b"third 3"):
        spool.append(body, 1)
    spool.close()
    first, second, _ = sorted(directory.glob("*" + SEGMENT_SUFFIX))
    # Damage the first segment's only record, and add a torn record to the second.
    data = bytearray(first.read_bytes())
    if damage == "truncate":
        first.write_bytes(bytes(data[:-3]))
    else:
        data[-1] ^= 0xFF
        first.write_bytes(bytes(data))
    second.write_bytes(second.read_bytes() + encode_record(b"torn 4", 1, 0.0)[:10])
    reopened = Spool(directory, max_bytes=2**20)
    assert drain(reopened) == [b"second 2", b"third 3"]
    reports = [r.getMessage() for r in caplog.records if "damaged bytes" in r.getMessage()]
    assert len(reports) == 2
    assert reopened.status().skipped_bytes == len(data) - (3 if damage == "truncate" else 0) + 10


def test_scan_stops_at_a_bad_magic() -> None:
    """Bytes that are not a record end the scan, counted as damaged."""
    good = encode_record(b"a", 1, 1.0)
    records, damaged = scan_segment(good + b"garbage!" * 5)
    assert len(records) == 1 and damaged == 40


def test_appends_after_restart_go_to_a_new_segment(directory: Path) -> None:
    """A reopened spool never appends after an old (possibly damaged) tail."""
    spool = Spool(directory, max_bytes=2**20)
    spool.append(b"a 1", 1)
    spool.close()
    reopened = Spool(directory, max_bytes=2**20)
    reopened.append(b"b 2", 1)
    assert len(list(directory.glob("*" + SEGMENT_SUFFIX))) == 2


def test_status_reports_oldest_time(directory: Path) -> None:
    """Status counts segments, bytes, batches and points, and dates the oldest batch."""
    spool = Spool(directory, max_bytes=2**20)
    spool.append(b"m f=1 1\nm f=2 2", 2)
    status = spool.status()
    assert (status.segments, status.batches, status.points) == (1, 1, 2)
    assert status.bytes > 0 and status.oldest is not None


def test_read_status_changes_nothing(directory: Path) -> None:
    """The CLI's read-only status sees the batches and leaves even empty segments alone."""
    spool = Spool(directory, max_bytes=2**20)
    spool.append(b"m f=1 1", 1)
    empty = directory / f"{99:012d}{SEGMENT_SUFFIX}"
    empty.touch()
    status = read_status(directory)
    assert (status.batches, status.points) == (1, 1)
    assert empty.exists()
