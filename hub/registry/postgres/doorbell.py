"""The hub's doorbell: LISTEN on its node's channel, and catch-up by change sequence.

Operator changes ring the channels of the nodes holding the changed devices
(`queries.node_channel`, payload `change:SEQ`). A notification only says "read the change
log": the tables are the truth. It can be lost (the listener's connection drops, or the
device's ownership was not recorded yet when the change committed), so the doorbell also
reads the newest change sequence itself, on its own connection: right after every
(re)connection, once LISTEN is in place, and every `catch_up_s` after that. Whenever that
sequence is past the highest one the feed has handed out or rung for, it rings. So a lost
notification costs at most `catch_up_s`, never a change; and the periodic read also finds a
connection that stopped answering (a frozen server), which is then dropped and opened again.

Takeovers (`takeover:EPOCH:DEVICE_ID`, rung by another node's claim of a device this one
held) arrive on the same channel and go straight to the takeover listener: they are not
changes of the feed, and closing the old connection must not wait for a read.

Nothing on the ingest path notifies, and this connection runs nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from hub.errors import RegistryUnavailable
from hub.registry.postgres import queries as q
from hub.registry.postgres.connect import APPLICATION_NAME, CONNECTION_ERRORS, connect
from hub.registry.url import display_url

log = logging.getLogger("hub.registry")

CATCH_UP_S = 1.0
"""How often the doorbell reads the change sequence itself: the bound on a lost doorbell."""
READ_TIMEOUT_S = 5.0
"""A catch-up read unanswered this long means a server that stopped answering: reconnect."""
LISTENER_NAME = f"{APPLICATION_NAME} doorbell"
RECONNECT_S = 0.5
"""The pause before the listener's connection is opened again after it was lost."""


class Doorbell:
    """Rings (`wait` returns True) when an operator change past `seen` may have committed."""

    def __init__(self, url: str, node_id: str, seen: int, catch_up_s: float = CATCH_UP_S) -> None:
        """Listen for node `node_id` once `start`ed; changes up to sequence `seen` are known."""
        self._url = url
        self._channel = q.node_channel(node_id)
        self._highest = seen
        self._catch_up_s = catch_up_s
        self._rung = asyncio.Event()
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_takeover: Callable[[str, int], None] | None = None
        self._on_relisten: Callable[[], None] | None = None

    def on_takeover(self, listener: Callable[[str, int], None], missed: Callable[[], None]) -> None:
        """Call `listener(device_id, epoch)` for every takeover heard from now on, and
        `missed()` each time LISTEN is in place again after the connection was lost
        (takeovers rung meanwhile went unheard)."""
        self._on_takeover = listener
        self._on_relisten = missed

    def start(self) -> None:
        """Begin listening, in a task of its own, until `close`."""
        self._task = asyncio.create_task(self._run(), name="registry-doorbell")

    async def listening(self) -> None:
        """Wait until LISTEN is in place on a live connection, and caught up after it."""
        await self._listening.wait()

    def saw(self, seq: int) -> None:
        """The feed handed out every change up to `seq`: nothing to ring for below it."""
        self._highest = max(self._highest, seq)

    def ring(self) -> None:
        """Ring now: something for the feed to read that no change sequence announces."""
        self._rung.set()

    async def wait(self, timeout_s: float) -> bool:
        """True once it rang (the ring is then taken), False after `timeout_s` without."""
        if not self._rung.is_set():
            try:
                async with asyncio.timeout(timeout_s):
                    await self._rung.wait()
            except TimeoutError:
                return False
        self._rung.clear()
        return True

    async def close(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _ring_for(self, seq: int) -> None:
        if seq > self._highest:
            self._highest = seq
            self._rung.set()

    def _heard(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if not payload.startswith(q.CHANGE_PAYLOAD_PREFIX):
            takeover = q.parse_takeover(payload)
            if takeover is not None and self._on_takeover is not None:
                self._on_takeover(*takeover)
            return  # not a change of the feed
        try:
            self._ring_for(int(payload.removeprefix(q.CHANGE_PAYLOAD_PREFIX)))
        except ValueError:
            self._rung.set()  # unreadable: read the log anyway

    async def _run(self) -> None:
        lost_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn = await connect(self._url, migrate_schema=False, name=LISTENER_NAME)
            except RegistryUnavailable as exc:
                lost_since = self._lost(lost_since, loop.time(), exc)
                await asyncio.sleep(RECONNECT_S)
                continue
            try:
                await self._listen(conn)
                if self._on_relisten is not None:
                    self._on_relisten()
                if lost_since is not None:
                    log.info(
                        "registry listener connected again after %.1f s; catching up",
                        loop.time() - lost_since,
                    )
                    lost_since = None
                await self._catch_up(conn)
            except CONNECTION_ERRORS as exc:
                lost_since = self._lost(lost_since, loop.time(), exc)
            except Exception:  # never end for good: the hub would hear of no change again
                log.exception("registry listener failed; starting it again")
            finally:
                self._listening.clear()
                conn.terminate()
            await asyncio.sleep(RECONNECT_S)

    async def _listen(self, conn: asyncpg.Connection) -> None:
        await conn.add_listener(self._channel, self._heard)

    async def _catch_up(self, conn: asyncpg.Connection) -> None:
        """Read the change sequence now and every `catch_up_s`, until the connection is
        closed (by the server, or by a read that fails)."""
        closed = asyncio.Event()
        conn.add_termination_listener(lambda _conn: closed.set())
        while not conn.is_closed():
            async with asyncio.timeout(READ_TIMEOUT_S):
                self._ring_for(int(await conn.fetchval(q.CHANGE_SEQ)))
            self._listening.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._catch_up_s):
                    await closed.wait()
        raise ConnectionResetError("the listener's connection was closed")

    def _lost(self, since: float | None, now: float, exc: BaseException) -> float:
        if since is None:  # logged once per outage, not once per attempt
            log.warning(
                "registry listener lost its connection to %s (%s); reconnecting, and "
                "reading the change log when back",
                display_url(self._url),
                str(exc).strip() or type(exc).__name__,
            )
            return now
        return since
