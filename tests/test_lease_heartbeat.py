"""The registry heartbeat keeps renewing whatever one renewal does: hang or fail oddly.

Found by `device-sim chaos`: after PostgreSQL was SIGKILLed, one worker's heartbeat never
renewed its lease again (no failure logged, every other registry call of that worker fine),
so the registry showed its 18 connected devices offline until the worker was killed. asyncpg
can wait without bound to hand back a connection whose cancelled query the dead server never
acknowledged (MagicStack/asyncpg#1356), and an error outside the connection errors ended the
heartbeat's task silently. A real server cannot be made to do either on cue, so the pool here
is a fake that does them in order.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from hub.registry.postgres.lease import NodeLease

pytestmark = pytest.mark.unit


class ScriptedPool:
    """A pool whose `fetchrow` hangs, then raises an error asyncpg may raise, then answers."""

    def __init__(self) -> None:
        self.calls = 0
        self.answered = asyncio.Event()

    async def fetchrow(self, query: str, *args: Any) -> dict[str, Any] | None:
        self.calls += 1
        if self.calls == 1:
            await asyncio.Event().wait()  # never answers
        if self.calls == 2:
            raise RuntimeError("PoolConnectionHolder.release() called on a free holder")
        self.answered.set()
        return {"lease_expires_at": None}

    async def execute(self, query: str, *args: Any) -> str:
        return "DELETE 0"


async def test_a_hung_then_failing_renewal_does_not_stop_the_heartbeat(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A renewal that never returns is given up after the lease; an unexpected error is
    logged; the third renewal goes through and says so."""
    pool = ScriptedPool()
    lease = NodeLease(pool, "hub-x", "127.0.0.1:1", lambda: 3, heartbeat_s=0.01, lease_s=0.2)
    caplog.set_level(logging.INFO, logger="hub.registry")
    lease.start()
    try:
        await asyncio.wait_for(pool.answered.wait(), 10)
    finally:
        await lease.close()
    assert pool.calls >= 3
    messages = [record.getMessage() for record in caplog.records]
    assert any("heartbeat of node hub-x failed (TimeoutError)" in m for m in messages), messages
    assert any("heartbeat of node hub-x works again" in m for m in messages), messages
