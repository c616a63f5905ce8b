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
from typing import Any, Generic, TypeVar, cast

log = logging.getLogger("hub.registry")

Owned = TypeVar("Owned")
T = TypeVar("T")

_Job = tuple[Callable[[Any], Any], "asyncio.Future[Any]"]
_STOP = object()
BATCH_JOBS = 64
"""Jobs already queued that run before their callers hear back, in one wake-up of the loop:
at ~20-75 us a query, a few ms at most."""


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
        self._finished = False

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

        def finish(owned: Owned) -> None:
            self._finished = True  # on the thread: no idle duty on what `last` closes
            last(owned)

        try:
            await self.run(finish)
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
            wait_s = None if self._finished else max(0.0, next_idle - time.monotonic())
            try:
                job = self._jobs.get(timeout=wait_s)
            except queue.Empty:
                job = None
            if job is _STOP:
                return
            if isinstance(job, tuple) and self._run_queued(job, owned):
                return  # the stop came behind the jobs just run
            if not self._finished and time.monotonic() >= next_idle:
                try:
                    self._idle(owned)
                except Exception:  # e.g. the file unreadable for a moment: next time
                    log.exception("%s: idle duty failed", self._name)
                next_idle = time.monotonic() + self._idle_s

    def _run_queued(self, first: _Job, owned: Owned) -> bool:
        """Run `first` and the jobs queued behind it (up to `BATCH_JOBS`), then settle all
        their futures in one call to the loop: a storm of 10,000 calls wakes the loop a few
        hundred times instead of 10,000 (each wake-up cost ~100 us of both threads' time).
        True if the stop came meanwhile (after the jobs before it were settled)."""
        done: list[tuple[asyncio.Future[Any], Any, Exception | None]] = []
        job: _Job | object = first
        stop = False
        while True:
            work, future = cast(_Job, job)
            try:
                done.append((future, work(owned), None))
            except Exception as exc:
                done.append((future, None, exc))
            if len(done) >= BATCH_JOBS:
                break
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                stop = True
                break
        self._settle_all(done)
        return stop

    def _settle(self, future: asyncio.Future[Any], result: Any, exc: Exception | None) -> None:
        self._settle_all([(future, result, exc)])

    def _settle_all(self, done: list[tuple[asyncio.Future[Any], Any, Exception | None]]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(_settle_all, done)

    def send(self, callback: Callable[[], None]) -> None:
        """From the thread: have the loop call `callback()` soon."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(callback)


def _settle_all(done: list[tuple[asyncio.Future[Any], Any, Exception | None]]) -> None:
    for future, result, exc in done:
        if future.cancelled():  # the caller gave up waiting; the job ran anyway
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
