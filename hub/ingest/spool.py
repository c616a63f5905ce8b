"""The disk spool: batches InfluxDB could not take yet, in a segmented append-only log.

A batch is appended and fsynced before the readings in it are acked, and deleted only once
its whole segment has been written to InfluxDB. Each record is

    magic "HSP2" | payload length u32 | crc32 u32 | points u32 | written at f64 |
    dialect u8 | payload

little-endian, the CRC covering points, time, dialect and payload. The dialect is the kind
of server the payload was formatted for (`Dialect.code`), so that a batch replayed to a
server of another kind is re-checked first (`hub.reformat`). Records of older hubs, magic
"HSP1" without the dialect byte, still replay: they were formatted with the strict rules,
line feeds in string values allowed when the server was InfluxDB (`Dialect.LEGACY`).

On open every segment is scanned; a record that is cut short or fails its CRC (a torn write
at power loss) ends that segment: it is reported once with the bytes skipped, and the
segments after it replay normally.
Appends always go to a fresh segment after a restart, never after a damaged tail.

A `Spool` holds its directory's lock (`hub.ingest.spoollock`) from open to `close`: two
processes never write or replay one spool; the second gets `SpoolInUse`.

The methods do blocking file I/O; the pipeline calls them from a worker thread, one at a time
(`hub.ingest.buffer.BufferAccess`). `Spool` is the durable `hub.ingest.buffer.Buffer`.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hub.core.dialects import Dialect
from hub.ingest.spoollock import SpoolLock

log = logging.getLogger("hub.spool")

MAGIC = b"HSP2"
LEGACY_MAGIC = b"HSP1"
_HEADER = struct.Struct("<4sIIIdB")
_CHECKED = struct.Struct("<IdB")
_LEGACY_HEADER = struct.Struct("<4sIIId")
_LEGACY_CHECKED = struct.Struct("<Id")
_LEGACY_CODE = Dialect.LEGACY.code

_Record = tuple[int, int, int, float, int, int]
"""(offset, payload length, points, written_at, header size, dialect code) of a record."""
SEGMENT_SUFFIX = ".seg"


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    """One record: where it is, and what it holds."""

    segment: int
    offset: int
    body: bytes
    points: int
    written_at: float
    dialect: Dialect | None = Dialect.STRICT
    """The kind of server `body` was formatted for; None for a code this hub does not know."""


@dataclass
class _Segment:
    number: int
    path: Path
    size: int = 0
    records: list[_Record] = field(default_factory=list)
    """Each intact record."""
    replayed: int = 0
    """How many of `records`, from the start, are already in InfluxDB."""


@dataclass(frozen=True, slots=True)
class SpoolStatus:
    """What the spool holds."""

    segments: int
    bytes: int
    batches: int
    points: int
    oldest: float | None
    skipped_bytes: int


def encode_record(
    body: bytes, points: int, written_at: float, dialect: Dialect = Dialect.STRICT
) -> bytes:
    """One record, header and payload, as it is stored."""
    checked = _CHECKED.pack(points, written_at, dialect.code)
    crc = zlib.crc32(body, zlib.crc32(checked))
    return _HEADER.pack(MAGIC, len(body), crc, points, written_at, dialect.code) + body


def scan_segment(data: bytes) -> tuple[list[_Record], int]:
    """The intact records of a segment's bytes, and how many bytes after them are damaged."""
    records: list[_Record] = []
    offset = 0
    while offset + _LEGACY_HEADER.size <= len(data):
        magic = data[offset : offset + 4]
        if magic == MAGIC and offset + _HEADER.size <= len(data):
            _, length, crc, points, written_at, code = _HEADER.unpack_from(data, offset)
            checked = _CHECKED.pack(points, written_at, code)
            start = offset + _HEADER.size
        elif magic == LEGACY_MAGIC:
            _, length, crc, points, written_at = _LEGACY_HEADER.unpack_from(data, offset)
            checked, code = _LEGACY_CHECKED.pack(points, written_at), _LEGACY_CODE
            start = offset + _LEGACY_HEADER.size
        else:
            break
        body = data[start : start + length]
        if len(body) != length or zlib.crc32(body, zlib.crc32(checked)) != crc:
            break
        records.append((offset, length, points, written_at, start - offset, code))
        offset = start + length
    return records, len(data) - offset


class Spool:
    """Segments in one directory, oldest first; appends go to the newest."""

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = 16 * 2**20) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = SpoolLock(directory)  # before reading: the holder may be writing
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.skipped_bytes = 0
        self._segments: list[_Segment] = []
        self._active: _Segment | None = None
        self._fd: int | None = None
        self._last_number = 0  # the highest segment number used: see _writable
        self._load()

    def _load(self) -> None:
        for number, path, size, records, damaged in _segments_in(self.directory):
            self._last_number = max(self._last_number, number)
            if damaged:
                self.skipped_bytes += damaged
                log.error(
                    "spool segment %s: %d damaged bytes at its end (torn write?) skipped; "
                    "%d intact batches before them will be replayed",
                    path.name,
                    damaged,
                    len(records),
                )
            if records:
                self._segments.append(_Segment(number, path, size, records))
            else:
                path.unlink()

    @property
    def location(self) -> str:
        """Where batches are kept, for log lines."""
        return f"the spool at {self.directory}"

    # Appending

    def append(self, body: bytes, points: int, dialect: Dialect = Dialect.STRICT) -> bool:
        """Store a batch formatted for `dialect` durably (fsync); False, storing nothing,
        when the spool is full."""
        now = time.time()
        record = encode_record(body, points, now, dialect)
        if self.size + len(record) > self.max_bytes:
            return False
        segment = self._writable(len(record))
        assert self._fd is not None
        os.write(self._fd, record)
        os.fsync(self._fd)
        segment.records.append((segment.size, len(body), points, now, _HEADER.size, dialect.code))
        segment.size += len(record)
        return True

    def _writable(self, record_size: int) -> _Segment:
        active = self._active
        if active is None or (active.size and active.size + record_size > self.segment_bytes):
            self._close_active()
            # Numbers are never reused while the spool is open, even once every segment
            # was replayed and deleted: a batch is known by its segment and offset.
            number = self._last_number = self._last_number + 1
            path = self.directory / f"{number:012d}{SEGMENT_SUFFIX}"
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            _fsync_directory(self.directory)
            active = self._active = _Segment(number, path)
            self._segments.append(active)
        return active

    def _close_active(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._active = None

    def close(self) -> None:
        """Close the open segment and let another process take the spool."""
        self._close_active()
        self._lock.release()

    # Replaying

    def oldest(self) -> SpooledBatch | None:
        """The oldest batch not yet written to InfluxDB, if any."""
        for segment in self._segments:
            if segment.replayed < len(segment.records):
                offset, length, points, written_at, header, code = segment.records[segment.replayed]
                with segment.path.open("rb") as handle:
                    handle.seek(offset + header)
                    body = handle.read(length)
                return SpooledBatch(
                    segment.number, offset, body, points, written_at, Dialect.from_code(code)
                )
        return None

    def written(self, batch: SpooledBatch) -> None:
        """`batch` (from `oldest`) is in InfluxDB; delete its segment once all of it is."""
        segment = next(s for s in self._segments if s.number == batch.segment)
        assert segment.records[segment.replayed][0] == batch.offset, "replay out of order"
        segment.replayed += 1
        if segment.replayed == len(segment.records):
            if segment is self._active:
                self._close_active()
            segment.path.unlink()
            self._segments.remove(segment)

    # Status

    @property
    def size(self) -> int:
        """Bytes on disk."""
        return sum(s.size for s in self._segments)

    def status(self) -> SpoolStatus:
        """Segments, bytes, batches and points waiting, and when the oldest was spooled."""
        waiting = [r for s in self._segments for r in s.records[s.replayed :]]
        return _status(len(self._segments), self.size, waiting, self.skipped_bytes)

    @property
    def empty(self) -> bool:
        """Whether nothing waits for replay."""
        return all(s.replayed == len(s.records) for s in self._segments)


def read_status(directory: Path) -> SpoolStatus:
    """The status of a spool directory, read without changing anything (for the CLI, while
    the hub may be writing to it)."""
    segments = list(_segments_in(directory)) if directory.is_dir() else []
    waiting = [record for segment in segments for record in segment[3]]
    return _status(
        len(segments),
        sum(segment[2] for segment in segments),
        waiting,
        sum(segment[4] for segment in segments),
    )


def _status(segments: int, size: int, waiting: list[_Record], skipped: int) -> SpoolStatus:
    return SpoolStatus(
        segments=segments,
        bytes=size,
        batches=len(waiting),
        points=sum(record[2] for record in waiting),
        oldest=min((record[3] for record in waiting), default=None),
        skipped_bytes=skipped,
    )


def _segments_in(directory: Path) -> Iterator[tuple[int, Path, int, list[_Record], int]]:
    """(number, path, size, intact records, damaged bytes) of each segment, oldest first."""
    for path in sorted(directory.glob("*" + SEGMENT_SUFFIX)):
        try:
            number = int(path.stem)
            data = path.read_bytes()
        except (ValueError, FileNotFoundError):  # not ours, or replayed meanwhile
            continue
        records, damaged = scan_segment(data)
        yield number, path, len(data), records, damaged


def move_segments(source: Path, target: Path) -> int:
    """Move every segment of the spool at `source` into the spool at `target`, after the
    segments it holds, in their order; holding both spools' locks (`SpoolInUse` if another
    process holds either). The number of segments moved. For a spool no process will take
    again (a worker slot gone after `workers` was lowered): its batches replay in `target`."""
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    source_lock = SpoolLock(source)
    try:
        target_lock = SpoolLock(target)
        try:
            numbers = [int(p.stem) for p in target.glob("*" + SEGMENT_SUFFIX) if p.stem.isdigit()]
            number = max(numbers, default=0)
            moved = 0
            for path in sorted(source.glob("*" + SEGMENT_SUFFIX)):
                if path.stem.isdigit():
                    number += 1
                    os.rename(path, target / f"{number:012d}{SEGMENT_SUFFIX}")
                    moved += 1
            if moved:
                _fsync_directory(target)  # the new names first: a crash leaves a copy, not none
                _fsync_directory(source)
            return moved
        finally:
            target_lock.release()
    finally:
        source_lock.release()


def _fsync_directory(directory: Path) -> None:
    # A new file's name is durable only once its directory is synced.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
