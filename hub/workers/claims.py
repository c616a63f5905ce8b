"""What the supervisor does about the device claims of its workers, so presence stays honest.

Each worker is a node of its own in the registry (`NODE_ID/K`, which it tells the supervisor
with its READY=1, `NODE_ID_KEY`) and claims the devices it serves. A worker that dies
(SIGKILL, a crash, the OOM killer) cannot release them: its devices would show online until
its slot's next process opens the registry, which with the restart backoff may be many
seconds. So when the supervisor reaps a worker it releases that node id's claims at once
(`hub.registry.backends.release_host_claims`: on SQLite, a short write on a thread; on
PostgreSQL nothing, the owner's lease covers it), and the slot's next process starts only
once that release is done: a release that ran late would free the claims the new process
has just made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

log = logging.getLogger("hub.workers")

NODE_ID_KEY = "HUB_NODE_ID"
"""Sent with a worker's READY=1: the node id it claims devices as."""
MAX_NODE_ID_CHARS = 1000
"""A node id the supervisor keeps from a notification (a datagram of at most 4 KiB)."""

Release = Callable[[Sequence[str] | None], None]
"""Release the claims of these node ids (None: every claim of this host); blocking."""


class SlotClaims:
    """The node id of each slot's worker, and the releases of those that died."""

    def __init__(self, release: Release) -> None:
        """`release` runs on a thread of its own (a SQLite write may wait for a lock)."""
        self._release = release
        self._node_ids: dict[int, str] = {}
        self._pending: dict[int, asyncio.Task[None]] = {}

    def release_all(self) -> None:
        """At the supervisor's start, before any worker: every claim left by an earlier run
        (blocking: nothing else runs yet)."""
        self._release(None)

    def learned(self, number: int, node_id: str) -> None:
        """Slot `number`'s worker said it is node `node_id` (slots keep their ids across
        restarts, so the last one told stays right for a worker that dies before telling)."""
        if node_id and len(node_id) <= MAX_NODE_ID_CHARS:
            self._node_ids[number] = node_id

    def reaped(self, number: int) -> None:
        """Slot `number`'s process is gone: release its claims now, in the background."""
        node_id = self._node_ids.get(number)
        if node_id is None or number in self._pending:
            return
        self._pending[number] = asyncio.create_task(
            self._released(number, node_id), name=f"release-worker-{number}"
        )

    async def settled(self, number: int) -> None:
        """Wait for the release of slot `number`'s last process, if one is under way."""
        pending = self._pending.get(number)
        if pending is not None:
            await asyncio.shield(pending)

    async def close(self) -> None:
        """Wait for every release under way."""
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._pending.values())

    async def _released(self, number: int, node_id: str) -> None:
        try:
            await asyncio.to_thread(self._release, [node_id])
        except Exception as exc:  # its next process releases them when it opens the registry
            log.warning("releasing the devices of worker %d (%s) failed: %s", number, node_id, exc)
        else:
            log.info("worker %d (%s) gone: its devices released", number, node_id)
        finally:
            self._pending.pop(number, None)
