"""Stopping never hangs on a cancellation that arrives as an awaited write completes.

Python 3.11's `asyncio.wait_for` returns the inner result and drops a cancellation that
arrives in the same loop turn as the inner completion; a pipeline task that loses its
cancellation so waits forever for work (the hang of `test_spool_only_mode_...` on a loaded
machine). The order of events is driven here, turn by turn, instead of hoped for.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hub.core.dialects import Dialect
from hub.ingest.deadletters import DeadLetterFile
from hub.ingest.pipeline import Pipeline
from hub.options import BatchOptions
from tests.support import hub_settings

pytestmark = pytest.mark.integration  # the pipeline still dials influx_url (127.0.0.1:1)


class GatedSink:
    """A sink whose writes complete when the test opens the gate."""

    name = "gated"
    dialect = Dialect.INFLUXDB_1

    def __init__(self) -> None:
        self.gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.writing = asyncio.Event()

    async def write(self, body: bytes) -> None:
        """Wait for the gate."""
        self.writing.set()
        await self.gate

    async def detect(self) -> None:
        """Nothing to learn."""

    async def close(self) -> None:
        """Nothing to release."""


@pytest.mark.parametrize("turns", [0, 1, 2, 3, 4])
async def test_close_as_a_write_completes_stops_every_task(tmp_path: Path, turns: int) -> None:
    """Closing the pipeline `turns` loop turns after a write completed stops every task."""
    settings = hub_settings(tmp_path, "http://127.0.0.1:1", max_inflight_writes=1)
    sink = GatedSink()
    pipeline = Pipeline(
        sink, DeadLetterFile(tmp_path / "dead.jsonl", 2**20), BatchOptions.of(settings)
    )
    pipeline.start()
    durable = pipeline.submit_nowait("m v=1 1", 1)
    pipeline.flush()
    async with asyncio.timeout(5):
        await sink.writing.wait()
    sink.gate.set_result(None)
    for _ in range(turns):
        await asyncio.sleep(0)
    closing = asyncio.ensure_future(pipeline.close())
    done, _ = await asyncio.wait([closing], timeout=5)
    assert closing in done, "a pipeline task lost its cancellation and never stopped"
    assert durable.done()
