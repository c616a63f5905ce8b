"""One thread that owns an object and runs every job on it, in order, for an event loop.

What `ThreadPoolExecutor(max_workers=1)` gives, plus an idle duty: between jobs (and at
least every `idle_s` while jobs keep coming) the thread calls `idle(owned)`. The SQLite
registry uses that to look at `PRAGMA data_version` on its own thread, so that watching for
operator changes does not wake the event loop a hundred times a second: the loop hears
from the thread only when something changed (measured: an idle hub's CPU went from 15 to
36 ms a second when each poll was a round trip through an executor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

log = logging.getLogger("hub.registry")

Owned = TypeVar("Owned")
T = TypeVar("T")

_Job = tuple[Callable[[Any], Any], "asyncio.Future[Any]"]
_STOP = object()


class OwningThread(Generic[Owned]):
    """A thread that creates an object with `create()`, then runs each job on it in the
    order asked, and `idle(owned)` every `idle_s`. Only this thread touches the object."""

    def __init__(
        self,
        name: str,
        create: Callable[[], Owned],
        idle: Callable[[Owned], None],
        idle_s: float,
    ) -> None:
        """Not started yet: `await start()`."""
        self._name = name
        self._create = create
        self._idle = idle
        self._idle_s = idle_s
        self._jobs: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        """Set by the last job (`stop`): from then on only _STOP is waited for."""

    async def start(self) -> None:
        """Start the thread and create the object on it; raises what `create` raised."""
        loop = self._loop = asyncio.get_running_loop()
        created: asyncio.Future[None] = loop.create_future()
        # A daemon: a thread left waiting must never keep the process from exiting (SQLite's
        # transactions survive that).
        thread = threading.Thread(target=self._main, args=(created,), name=self._name, daemon=True)
        thread.start()
        await created

    async def run(self, job: Callable[[Owned], T]) -> T:
        """`job(owned)`, run on the thread after the jobs asked for before it."""
        assert self._loop is not None, "start() first"
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((job, future))
        return await future

    async def stop(self, last: Callable[[Owned], None]) -> None:
        """Run `last(owned)` once the jobs asked for are done, then end the thread."""

        def closing(owned: Owned) -> None:
            self._closing = True  # no idle duty after this: `last` closes what it uses
            last(owned)

        try:
            await self.run(closing)
        finally:
            self._jobs.put(_STOP)

    def _main(self, created: asyncio.Future[None]) -> None:
        try:
            owned = self._create()
        except Exception as exc:
            self._settle(created, None, exc)
            return
        self._settle(created, None, None)
        next_idle = time.monotonic() + self._idle_s
        while True:
            wait_s = None if self._closing else max(0.0, next_idle - time.monotonic())
            try:
                job = self._jobs.get(timeout=wait_s)
            except queue.Empty:
                job = None
            if job is _STOP:
                return
            if isinstance(job, tuple):
                work, future = job
                try:
                    result = work(owned)
                except Exception as exc:
                    self._settle(future, None, exc)
                else:
                    self._settle(future, result, None)
            if time.monotonic() >= next_idle and not self._closing:
                try:
                    self._idle(owned)
                except Exception:  # e.g. the file unreadable for a moment: next time
                    log.exception("%s: idle duty failed", self._name)
                next_idle = time.monotonic() + self._idle_s

    def _settle(self, future: asyncio.Future[Any], result: Any, exc: Exception | None) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(_settle, future, result, exc)

    def send(self, callback: Callable[[], None]) -> None:
        """From the thread: have the loop call `callback()` soon."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(callback)


def _settle(future: asyncio.Future[Any], result: Any, exc: Exception | None) -> None:
    if future.cancelled():  # the caller gave up waiting; the job ran anyway
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
