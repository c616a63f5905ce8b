"""`StreamingClient`: stream readings to the hub, keep them until acked, reconnect, resend.

The asyncio counterpart of the MicroPython client, with the same behaviour: a bounded
readings buffer (the oldest pending reading is dropped when full), messages resent after a
reconnect until acked, the reconnect policy of `sensorhub_client.policy` (4001 stops,
429/503 wait out `Retry-After`, 1007 drops the refused message, 1009 halves the messages),
and pushed config applied through a callback and acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from schemas.messages import Ack, Config, Reading
from sensorhub_client.connection import DeviceClient
from sensorhub_client.policy import (
    Action,
    after_close,
    after_refusal,
    reconnect_delay,
    retry_after_seconds,
)

log = logging.getLogger("sensorhub_client")

EARLIEST_NS = 1_420_070_400 * 10**9
"""2015-01-01: a clock before this is not set (the hub refuses such times by default)."""

ConfigCallback = Callable[[dict[str, Any], int], "str | Awaitable[str | None] | None"]
"""Applies a pushed config (the whole of it) at a version: None when applied, else why not."""


@dataclass(eq=False)
class _Message:
    readings: list[Reading]
    sent: bool = False  # on the current connection
    resends: int = 0


@dataclass
class StreamStats:
    """What a `StreamingClient` did so far."""

    sent: int = 0  # readings sent in new messages
    resent: int = 0  # readings sent again after a reconnect
    acked: int = 0  # readings the hub stored
    rejected: int = 0  # readings the hub refused (final: not resent)
    dropped: int = 0  # readings dropped: buffer full, or in a message refused with 1007
    connects: int = 0
    failed_connects: int = 0
    close_codes: list[int] = field(default_factory=list)
    refusals: list[int] = field(default_factory=list)  # HTTP statuses of refused handshakes


class StreamingClient:
    """One device streaming readings: `add()` them, `run()` the connection, `flush()`."""

    def __init__(
        self,
        url: str,
        token: str,
        on_config: ConfigCallback | None = None,
        *,
        max_readings: int = 100_000,
        max_batch: int = 500,
        window: int = 8,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 300.0,
        stable_after_s: float = 30.0,
        open_timeout_s: float = 10.0,
        rng: random.Random | None = None,
        wall_clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if max_readings < 1 or max_batch < 1 or window < 1:
            raise ValueError("max_readings, max_batch and window must be positive")
        self.url, self._token = url, token
        self.on_config = on_config
        self.max_readings, self.max_batch, self.window = max_readings, max_batch, window
        self.backoff_base_s, self.backoff_cap_s = backoff_base_s, backoff_cap_s
        self.stable_after_s, self.open_timeout_s = stable_after_s, open_timeout_s
        self.stats = StreamStats()
        self.stopped: str | None = None
        """Why the client gave up for good: `revoked`, `unauthorized` or `refused`."""
        self.config_version = -1
        self._config_answer: str | None = None
        self._wall_clock_ns = wall_clock_ns  # replaceable: a board that boots in 1970
        self._rng = rng or random.Random()  # noqa: S311  (backoff jitter, not a secret)
        # pending: (reading, wall-clock ns or None when the clock was not set, monotonic ns)
        self._pending: deque[tuple[dict[str, Any], int | None, int]] = deque()
        self._unacked: list[_Message] = []
        self._wake = asyncio.Event()  # something to send, an ack, a close, stop()
        self._progress = asyncio.Event()  # an ack, or run() ended: for flush()
        self._stopping = False
        self.client: DeviceClient | None = None

    # The script's side

    def add(
        self,
        name: str,
        fields: Mapping[str, float | int | bool | str],
        tags: Mapping[str, str] | None = None,
        time_ns: int | None = None,
    ) -> bool:
        """Hold a reading; False when the full buffer dropped the oldest pending one for it.

        Without `time_ns` it is stamped now (or, while the system clock reads before 2015,
        once the clock is set, from the monotonic time at sampling).
        """
        if not isinstance(name, str) or not name:
            raise ValueError("a reading's name must be a non-empty string")
        if not fields:
            raise ValueError("a reading needs at least one field")
        reading: dict[str, Any] = {"name": name, "fields": dict(fields)}
        if tags:
            reading["tags"] = dict(tags)
        wall = self._wall_clock_ns() if time_ns is None else time_ns
        kept = True
        if self.held() >= self.max_readings:
            self.stats.dropped += 1
            if not self._pending:
                return False
            self._pending.popleft()
            kept = False
        self._pending.append((reading, wall if wall >= EARLIEST_NS else None, time.monotonic_ns()))
        self._wake.set()
        return kept

    def held(self) -> int:
        """Readings not acked yet (pending and in messages)."""
        return len(self._pending) + sum(len(m.readings) for m in self._unacked)

    def stop(self) -> None:
        """Make `run()` close the connection and return."""
        self._stopping = True
        self._wake.set()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every held reading is acked (True), or `timeout_s` (False)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self.held() and self.stopped is None:
                    self._progress.clear()
                    await self._progress.wait()
        return not self.held()

    async def run(self) -> str | None:
        """Connect, stream and reconnect until `stop()` (None) or the hub's refusal for good
        (the reason, also in `stopped`)."""
        try:
            return await self._run()
        finally:
            self._progress.set()

    async def _run(self) -> str | None:
        attempt = 0
        while not self._stopping:
            floor: float | None = None
            try:
                client = await self._connect()
            except InvalidStatus as exc:
                status = exc.response.status_code
                self.stats.failed_connects += 1
                self.stats.refusals.append(status)
                action, floor = after_refusal(
                    status, retry_after_seconds(exc.response.headers.get("Retry-After"))
                )
                if action is Action.STOP:
                    self.stopped = "unauthorized" if status == 401 else "refused"
                    return self.stopped
            # ConnectionClosed: a balancer closed the connection before the request went
            # out (its backend had just died); a connect failure like the others.
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                self.stats.failed_connects += 1
                log.info("cannot connect: %s", exc)
            else:
                opened = time.monotonic()
                code, acked = await self._stream(client)
                if code is None:
                    return None  # stopped
                self.stats.close_codes.append(code)
                if acked or time.monotonic() - opened >= self.stable_after_s:
                    attempt = 0
                action, floor = after_close(code)
                if action is Action.STOP:
                    self.stopped = "revoked"
                    return self.stopped
                if action is Action.DROP_OLDEST and self._unacked:
                    self.stats.dropped += len(self._unacked.pop(0).readings)
                elif action is Action.SPLIT:
                    self._split()
            delay = reconnect_delay(
                attempt, self._rng, self.backoff_base_s, self.backoff_cap_s, floor
            )
            attempt += 1
            self.next_attempt_in_s = delay
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    while not self._stopping:
                        await self._wake.wait()
                        self._wake.clear()
        return None

    next_attempt_in_s = 0.0
    """The last reconnect delay chosen, in seconds."""

    # Connection

    async def _connect(self) -> DeviceClient:
        client = DeviceClient(self.url, self._token, precision="ns", on_config=self._apply)
        await client.connect(open_timeout=self.open_timeout_s)
        self.stats.connects += 1
        self.client = client
        client.on_closed(self._wake.set)
        for message in self._unacked:
            if message.sent:
                message.resends += 1
            message.sent = False
        return client

    async def _stream(self, client: DeviceClient) -> tuple[int | None, bool]:
        """Send until the connection ends (its close code) or `stop()` (None)."""
        acked = [False]
        try:
            while not self._stopping:
                self._wake.clear()
                if client.close_code is not None:
                    break
                message = self._next_to_send()
                if message is None:
                    await self._wake.wait()
                    continue
                message.sent = True
                if message.resends:
                    self.stats.resent += len(message.readings)
                future = await client.send_readings(message.readings)
                future.add_done_callback(functools.partial(self._acked, message, acked))
        except (ConnectionError, ConnectionClosed):
            pass
        if self._stopping:
            with contextlib.suppress(ConnectionError, ConnectionClosed, OSError):
                await client.close()
            return None, acked[0]
        await client.close()
        code = client.close_code
        return (1006 if code is None else code), acked[0]

    def _next_to_send(self) -> _Message | None:
        in_flight = 0
        for message in self._unacked:
            if message.sent:
                in_flight += 1
            elif in_flight < self.window:
                return message
        if in_flight >= self.window or not self._pending:
            return None
        readings: list[Reading] = []
        now_wall, now_mono = self._wall_clock_ns(), time.monotonic_ns()
        while self._pending and len(readings) < self.max_batch:
            reading, wall, mono = self._pending.popleft()
            if wall is None and now_wall >= EARLIEST_NS:
                wall = now_wall - (now_mono - mono)  # sampled before the clock was set
            if wall is not None:
                reading["time"] = wall
            readings.append(reading)  # type: ignore[arg-type]
        message = _Message(readings)
        self._unacked.append(message)
        self.stats.sent += len(readings)
        return message

    def _acked(self, message: _Message, acked: list[bool], done: asyncio.Future[Ack]) -> None:
        self._wake.set()
        self._progress.set()
        if done.cancelled() or done.exception() is not None:
            return  # unacked: resent after the reconnect
        ack = done.result()
        if message in self._unacked:
            self._unacked.remove(message)
        acked[0] = True
        self.stats.acked += ack.accepted
        # Count from `accepted`, not from the entries: a hub may collapse long lists.
        self.stats.rejected += len(message.readings) - ack.accepted
        if ack.rejected:
            log.warning(
                "hub rejected %d readings, first: %s",
                len(message.readings) - ack.accepted,
                ack.rejected[0].errors,
            )

    def _split(self) -> None:
        halves = []
        for message in self._unacked:
            middle = max(1, len(message.readings) // 2)
            for part in (message.readings[:middle], message.readings[middle:]):
                if part:
                    halves.append(_Message(part))
        self._unacked = halves
        self.max_batch = max(1, self.max_batch // 2)

    async def _apply(self, config: Config) -> str | None:
        if config.version < self.config_version:
            return None  # versions only grow; answered, not applied
        if config.version == self.config_version:
            return self._config_answer  # the same version again: answer as before
        answer: str | None = None
        if self.on_config is not None:
            try:
                result = self.on_config(dict(config.config), config.version)
                if inspect.isawaitable(result):
                    result = await result
                answer = None if result is None else str(result)
            except Exception as exc:  # the script's own code: report it, do not crash
                answer = f"{type(exc).__name__}: {exc}"
        self.config_version, self._config_answer = config.version, answer
        return answer
