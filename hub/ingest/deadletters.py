"""Dead letters: the points InfluxDB refused for good, and finding them in a refused batch.

InfluxDB 1.x answers a batch holding a point it cannot take (a field type conflict, a time
outside the retention policy) with a "partial write": it stores every other point and says
how many it dropped (`dropped=N`), but not which. `find_refused` finds them by writing the
batch again in halves: InfluxDB keeps one point per series and time, so writing a stored
point again changes nothing. The work is bounded (`MAX_SPLIT_WRITES`, a deadline); what is
left unresolved is kept as a part with its count, marked inexact.

`DeadLetterFile` keeps them, one JSON object a line, in a file that rotates
(`dead-letters.jsonl` -> `.1` ... `.ROTATED_FILES`) within `max_bytes` for all files
together. The oldest file is deleted to make room, and its points counted as discarded and
logged: ingest never waits for room here. It warns once the files pass `WARN_FRACTION`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hub.errors import PermanentWriteError, WriteError

log = logging.getLogger("hub.deadletters")

ROTATED_FILES = 4
"""Rotated files kept beside the current one; each file gets a fifth of `max_bytes`."""
WARN_FRACTION = 0.8
MAX_SPLIT_WRITES = 64
"""Writes one refused batch may cost to find its refused points (two per split)."""


@dataclass(frozen=True, slots=True)
class RefusedPart:
    """Lines of a batch and how many of them the server refused, with its answer."""

    lines: list[str]
    error: PermanentWriteError
    dropped: int

    @property
    def exact(self) -> bool:
        """Whether every line here was refused (else some of them are stored)."""
        return self.dropped >= len(self.lines)


def refused_count(error: PermanentWriteError, lines: int) -> int:
    """Points of a batch of `lines` the server refused: its `dropped=N`, else all."""
    return lines if error.dropped is None else min(error.dropped, lines)


async def find_refused(
    write: Callable[[bytes], Awaitable[None]],
    lines: list[str],
    error: PermanentWriteError,
    give_up_at: float,
    max_writes: int = MAX_SPLIT_WRITES,
) -> list[RefusedPart]:
    """The parts of `lines` that hold what `write` refused with `error`, split as far as
    `max_writes` writes and the monotonic time `give_up_at` allow.

    Each half of a part still refused is written again (both at once); a half that is
    stored drops out. A transient failure stops the search: the parts not resolved yet are
    returned as they are, with the counts the server gave for them.
    """
    pending = [RefusedPart(lines, error, refused_count(error, len(lines)))]
    found: list[RefusedPart] = []
    writes = 0
    while pending:
        part = pending.pop()
        if (
            part.exact
            or part.dropped == 0
            or writes + 2 > max_writes
            or time.monotonic() >= give_up_at
        ):
            if part.dropped:
                found.append(part)
            continue
        middle = len(part.lines) // 2
        halves = (part.lines[:middle], part.lines[middle:])
        writes += 2
        answers = await asyncio.gather(
            *(write("\n".join(half).encode("utf-8")) for half in halves), return_exceptions=True
        )
        if any(not isinstance(a, PermanentWriteError | None) for a in answers):
            failed = next(a for a in answers if not isinstance(a, PermanentWriteError | None))
            if not isinstance(failed, WriteError | TimeoutError):
                raise failed
            found.append(part)  # nothing learned about this part; the rest is unresolved too
            found.extend(p for p in pending if p.dropped)
            break
        for half, answer in zip(halves, answers, strict=True):
            if isinstance(answer, PermanentWriteError):
                pending.append(RefusedPart(half, answer, refused_count(answer, len(half))))
    return found


@dataclass(frozen=True, slots=True)
class DeadLetterStatus:
    """The dead-letter files on disk."""

    size: int
    max_bytes: int
    files: int


class DeadLetterFile:
    """Refused points with the server's reason, one JSON object a line, rotated and capped.

    Not safe for concurrent use: the pipeline calls `append` from one thread at a time.
    """

    def __init__(self, path: Path, max_bytes: int, rotated: int = ROTATED_FILES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.discarded_points = 0
        """Refused points deleted with an old file or cut from a record too big to keep."""
        self._rotated = rotated
        self._file_max = max(1, max_bytes // (rotated + 1))
        self._sizes = [_size(p) for p in self._paths()]
        self._warned = False
        self._warn_if_filling()

    @property
    def size(self) -> int:
        """Bytes in every dead-letter file together."""
        return sum(self._sizes)

    def status(self) -> DeadLetterStatus:
        """Size, limit and number of files, for metrics."""
        return DeadLetterStatus(self.size, self.max_bytes, sum(1 for s in self._sizes if s))

    def append(self, part: RefusedPart) -> None:
        """Append and fsync one refused part, rotating first when the file is full."""
        record: dict[str, object] = {
            "time": time.time(),
            "status": part.error.status,
            "reason": part.error.reason,
            "dropped": part.dropped,
            "exact": part.exact,
            "lines": part.lines,
        }
        data = _encode(record)
        if len(data) > self._file_max:
            data = self._cut(record, part)
        if self._sizes[0] and self._sizes[0] + len(data) > self._file_max:
            self._rotate()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._sizes[0] += len(data)
        self._warn_if_filling()

    def _warn_if_filling(self) -> None:
        # Once: past this point the files stay about this full, rotating.
        if not self._warned and self.size >= WARN_FRACTION * self.max_bytes:
            self._warned = True
            log.warning(
                "dead letters at %s use %d of %d bytes (dead_letter_max_bytes); past that the "
                "oldest are deleted",
                self.path,
                self.size,
                self.max_bytes,
            )

    def _paths(self) -> list[Path]:
        return [
            self.path,
            *(self.path.with_name(f"{self.path.name}.{n}") for n in range(1, self._rotated + 1)),
        ]

    def _rotate(self) -> None:
        paths = self._paths()
        oldest = paths[-1]
        if self._sizes[-1]:
            lost = _points_in(oldest)
            self.discarded_points += lost
            log.warning(
                "dead letters full (%d bytes): deleted the oldest file, %s, with %d refused points",
                self.max_bytes,
                oldest,
                lost,
            )
        for older, newer in zip(reversed(paths[1:]), reversed(paths[:-1]), strict=True):
            if newer.exists():
                os.replace(newer, older)
            else:
                older.unlink(missing_ok=True)
        self._sizes = [0, *self._sizes[:-1]]
        _fsync_directory(self.path.parent)

    def _cut(self, record: dict[str, object], part: RefusedPart) -> bytes:
        # One record bigger than a file: keep the lines that fit, say how many are left out.
        budget = self._file_max - len(_encode({**record, "lines": [], "omitted_lines": 0})) - 32
        kept: list[str] = []
        for line in part.lines:
            budget -= len(json.dumps(line, ensure_ascii=False).encode("utf-8")) + 2
            if budget < 0:
                break
            kept.append(line)
        omitted = len(part.lines) - len(kept)
        # Inexact parts hold stored points too: count no more than the server refused.
        self.discarded_points += min(omitted, part.dropped)
        log.warning(
            "a refused part of %d lines is larger than a dead-letter file (%d bytes): "
            "kept %d lines, left out %d",
            len(part.lines),
            self._file_max,
            len(kept),
            omitted,
        )
        return _encode({**record, "lines": kept, "omitted_lines": omitted})


def _encode(record: dict[str, object]) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _points_in(path: Path) -> int:
    """Refused points recorded in one dead-letter file (damaged lines count as none)."""
    total = 0
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                record = json.loads(line)
                total += int(record.get("dropped", len(record.get("lines", []))))
            except (ValueError, TypeError, AttributeError):
                continue
    return total


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lines_of(body: bytes) -> list[str]:
    """A batch body's points, one line each."""
    return body.decode("utf-8").split("\n")


def describe(parts: Sequence[RefusedPart]) -> str:
    """The first refusal reason of `parts`, for a log line."""
    return parts[0].error.reason if parts else "nothing refused on a second try"
