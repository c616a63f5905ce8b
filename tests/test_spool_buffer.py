"""One contract for every `Buffer`: the disk spool and the in-memory buffer pass the same
tests (as Telegraf runs one buffer suite over its memory and disk buffers)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hub.core.dialects import Dialect
from hub.ingest.buffer import Buffer, MemoryBuffer
from hub.ingest.spool import Spool

pytestmark = pytest.mark.unit

MakeBuffer = Callable[[Path, int], Buffer]
BUFFERS: dict[str, MakeBuffer] = {
    "spool": lambda directory, max_bytes: Spool(directory / "spool", max_bytes),
    "memory": lambda directory, max_bytes: MemoryBuffer(max_bytes),
}


@pytest.fixture(params=sorted(BUFFERS))
def make_buffer(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[int], Buffer]]:
    made: list[Buffer] = []

    def make(max_bytes: int = 2**20) -> Buffer:
        buffer = BUFFERS[request.param](tmp_path, max_bytes)
        made.append(buffer)
        return buffer

    yield make
    for buffer in made:
        buffer.close()


def test_an_empty_buffer_has_nothing_to_replay(make_buffer: Callable[[int], Buffer]) -> None:
    buffer = make_buffer(2**20)
    assert buffer.oldest() is None
    status = buffer.status()
    assert (status.batches, status.points, status.oldest) == (0, 0, None)


def test_batches_come_back_oldest_first_with_their_dialect(
    make_buffer: Callable[[int], Buffer],
) -> None:
    buffer = make_buffer(2**20)
    assert buffer.append(b"a 1", 1, Dialect.INFLUXDB_1)
    assert buffer.append(b"b 2\nb 3", 2, Dialect.VICTORIA_METRICS)
    status = buffer.status()
    assert (status.batches, status.points) == (2, 3)
    assert status.oldest is not None
    first = buffer.oldest()
    assert first is not None
    assert (first.body, first.points, first.dialect) == (b"a 1", 1, Dialect.INFLUXDB_1)
    assert buffer.oldest() == first  # still there until written
    buffer.written(first)
    second = buffer.oldest()
    assert second is not None
    assert (second.body, second.points, second.dialect) == (
        b"b 2\nb 3",
        2,
        Dialect.VICTORIA_METRICS,
    )
    buffer.written(second)
    assert buffer.oldest() is None
    assert buffer.status().batches == 0


def test_a_batch_past_the_limit_is_refused_and_nothing_kept(
    make_buffer: Callable[[int], Buffer],
) -> None:
    buffer = make_buffer(100)
    assert buffer.max_bytes == 100
    assert not buffer.append(b"x" * 200, 1)
    assert buffer.oldest() is None
    assert buffer.status().points == 0
    assert buffer.append(b"small 1", 1)  # a refusal leaves room for what fits


def test_written_out_of_order_is_a_bug(make_buffer: Callable[[int], Buffer]) -> None:
    buffer = make_buffer(2**20)
    buffer.append(b"a 1", 1)
    buffer.append(b"b 2", 1)
    first = buffer.oldest()
    assert first is not None
    buffer.written(first)
    with pytest.raises((AssertionError, StopIteration)):
        buffer.written(first)


def test_the_buffer_says_where_it_keeps_batches(
    request: pytest.FixtureRequest, make_buffer: Callable[[int], Buffer]
) -> None:
    expected = "the spool at" if "spool" in request.node.name else "memory"
    assert make_buffer(2**20).location.startswith(expected)
