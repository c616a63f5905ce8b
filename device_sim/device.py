"""One simulated device that behaves like good firmware.

It samples its sensors `rate` times a second into messages of `batch` readings, each with an
explicit timestamp that is unique and increasing for the device, so a resend can never
create a duplicate in InfluxDB and a test can check every acked reading exactly. It keeps
every message until its ack and sends the unacked ones again after a reconnect. It
reconnects with exponential backoff and full jitter, waits out a 503's `Retry-After`, stops
for good on 4001 (revoked) and on 400/401/404, reconnects late after 4000 (replaced), drops
the offending message after 1007 and splits messages after 1009. It applies pushed config
(`interval_s` sets its message interval, `batch` its readings per message) and acks it.

After its deadline (or the fleet's stop event) it sends nothing new and waits, still
reconnecting and resending, at most `final_wait_s` for the acks of what it sent; then it
gives up and reports exactly which readings were acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from array import array
from dataclasses import dataclass, field
from enum import StrEnum
from http import HTTPStatus
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from device_sim.sensors import SensorProfile, readings_frame
from device_sim.stats import FleetStats
from schemas.codes import QUERY_PRECISIONS, CloseCode
from schemas.messages import Ack, Config
from sensorhub_client.connection import DeviceClient, Precision

# Re-exported: the simulator's devices use the public client's reconnect policy.
from sensorhub_client.policy import reconnect_delay as reconnect_delay
from sensorhub_client.policy import retry_after_seconds


@dataclass(frozen=True)
class Credentials:
    """A device id and its token."""

    device_id: str
    token: str


@dataclass(frozen=True)
class DeviceOptions:
    """How every device of a fleet behaves."""

    rate: float = 1.0
    """Messages a second; 0 connects and stays idle (until a config gives an interval)."""
    batch: int = 10
    """Readings a message."""
    window: int = 16
    """Messages sent and not yet acked, at most."""
    invalid_ratio: float = 0.0
    """Share of readings with an out-of-range value (see `device_sim.sensors`)."""
    precision: Precision = "us"
    """Unit of the integer `time` of every reading."""
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    stable_after_s: float = 5.0
    """A connection up this long, or acked once, resets the backoff."""
    open_timeout_s: float = 10.0
    final_wait_s: float = 10.0
    """After the deadline: how long to keep waiting (and resending) for outstanding acks."""
    start_spread_s: float | None = None
    """Devices start at random within this many seconds; None: one message interval (<= 1 s)."""
    messages: int | None = None
    """Stop sending new messages after this many (a bounded run for the benchmark)."""
    record_times: bool = True
    """Keep every acked timestamp (8 bytes a reading) for `DeviceReport.acked_times`."""


class DeviceState(StrEnum):
    """How a device's run ended."""

    DONE = "done"  # its deadline or the stop event came
    REVOKED = "revoked"  # closed with 4001
    UNAUTHORIZED = "unauthorized"  # handshake answered 401
    REFUSED = "refused"  # handshake answered 400 or 404: a configuration bug


@dataclass
class DeviceReport:
    """What one device did; `acked_times` are in units of `precision`, sorted."""

    device_id: str
    state: DeviceState
    precision: Precision
    sent: int
    resent: int
    acked: int
    rejected: int
    unacked: int
    dropped: int
    connects: int
    failed_connects: int
    connect_errors: dict[str, int]
    """Failed connection attempts by cause: `HTTP 503`, `TimeoutError`, ..."""
    configs_applied: list[int]
    close_codes: list[int]
    acked_times: list[int]
    rejected_times: list[int]
    first_connected_at: float | None
    """Wall-clock time (time.time()) of the first open connection."""
    first_ack_at: float | None

    @property
    def reconnects(self) -> int:
        """Connections opened after the first one."""
        return max(0, self.connects - 1)

    def acked_times_ns(self) -> list[int]:
        """`acked_times` in nanoseconds, as InfluxDB stores them."""
        unit = QUERY_PRECISIONS[self.precision]
        return [t * unit for t in self.acked_times]

    def to_json(self, with_times: bool = False) -> dict[str, Any]:
        """The report as JSON-friendly data; timestamps only when asked."""
        data = {
            "device_id": self.device_id,
            "state": str(self.state),
            "sent": self.sent,
            "resent": self.resent,
            "acked": self.acked,
            "rejected": self.rejected,
            "unacked": self.unacked,
            "dropped": self.dropped,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "failed_connects": self.failed_connects,
            "connect_errors": self.connect_errors,
            "configs_applied": self.configs_applied,
            "close_codes": self.close_codes,
            "first_connected_at": self.first_connected_at,
            "first_ack_at": self.first_ack_at,
        }
        if with_times:
            data["precision"] = self.precision
            data["acked_times"] = self.acked_times
            data["rejected_times"] = self.rejected_times
        return data


@dataclass(eq=False, slots=True)
class _Message:
    readings: list[bytes]
    """Each reading packed (`SensorProfile.packed_reading`)."""
    times: list[int]


@dataclass
class _Connection:
    client: DeviceClient
    opened_at: float
    acked: bool = False
    closed: bool = False
    seq: int = 0
    """The last `seq` sent on this connection."""


_STOP_ON_STATUS = {
    HTTPStatus.UNAUTHORIZED: DeviceState.UNAUTHORIZED,
    HTTPStatus.BAD_REQUEST: DeviceState.REFUSED,
    HTTPStatus.NOT_FOUND: DeviceState.REFUSED,
}


@dataclass(eq=False)
class SimulatedDevice:
    """One device: connect, stream, keep what is unacked, reconnect, apply config."""

    url: str
    credentials: Credentials
    options: DeviceOptions
    stats: FleetStats = field(default_factory=FleetStats)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.credentials.device_id)
        room = f"room-{self._rng.randrange(1, 40)}"
        self._sensor = SensorProfile(self._rng, room, self.options.invalid_ratio)
        self._loop = asyncio.get_running_loop()
        self.interval_s = 1 / self.options.rate if self.options.rate > 0 else None
        self.batch = self.options.batch
        self._unacked: dict[int, _Message] = {}  # insertion order is send order
        self._next_number = 0
        self._in_flight = 0
        self._last_time = 0
        self._unit_per_s = 10**9 // QUERY_PRECISIONS[self.options.precision]
        self._acked_times = array("q")
        self._rejected_times = array("q")
        self._waker: asyncio.Future[None] | None = None
        self._connection: _Connection | None = None
        self._stopping = False
        self._give_up_at: float | None = None
        self._next_send = 0.0
        self._new_messages = 0
        self.state = DeviceState.DONE
        self.sent = self.resent = self.acked = self.rejected = self.dropped = 0
        self.connects = self.failed_connects = 0
        self.connect_errors: dict[str, int] = {}
        self.configs_applied: list[int] = []
        self.close_codes: list[int] = []
        self.first_connected_at: float | None = None
        self.first_ack_at: float | None = None

    # Control from the fleet

    def stop(self) -> None:
        """Send nothing new; finish with the bounded final wait."""
        self._stopping = True
        self.wake()

    def wake(self) -> None:
        """Interrupt the device's current wait (an ack, a close, a config, a stop)."""
        waker = self._waker
        if waker is not None and not waker.done():
            waker.set_result(None)

    # The run

    async def run(self, deadline: float) -> DeviceReport:
        """Stream until `deadline` (loop time) or `stop()`, then wait for acks (bounded)."""
        options = self.options
        spread = options.start_spread_s
        if spread is None:
            spread = min(1.0, self.interval_s or 0.0)
        await self._nap(self._loop.time() + self._rng.uniform(0, spread))
        attempt = 0
        while True:
            now = self._loop.time()
            if self._give_up_at is None and (self._stopping or now >= deadline):
                self._finish_sending(now)
            give_up_at = self._give_up_at
            if give_up_at is not None and (not self._unacked or now >= give_up_at):
                break
            retry_after = None
            try:
                connection = await self._connect()
            except InvalidStatus as exc:
                self._connect_failed(f"HTTP {exc.response.status_code}")
                status = exc.response.status_code
                if status in _STOP_ON_STATUS:
                    self.state = _STOP_ON_STATUS[HTTPStatus(status)]
                    break
                retry_after = retry_after_seconds(exc.response.headers.get("Retry-After"))
            # ConnectionClosed: a balancer closed the connection before the request went
            # out (its backend had just died); a connect failure like the others.
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                self._connect_failed(type(exc).__name__)
            else:
                code = await self._stream(connection, deadline)
                if code is None:
                    break  # finished: everything acked, or the final wait is over
                self.close_codes.append(code)
                if code == CloseCode.REVOKED:
                    self.state = DeviceState.REVOKED
                    break
                up_s = self._loop.time() - connection.opened_at
                if connection.acked or up_s >= options.stable_after_s:
                    attempt = 0
                self._after_close(code)
                if code == CloseCode.REPLACED:
                    retry_after = options.backoff_cap_s  # someone else has our token
            delay = reconnect_delay(
                attempt, self._rng, options.backoff_base_s, options.backoff_cap_s, retry_after
            )
            attempt += 1
            limit = self._give_up_at or deadline + options.final_wait_s
            await self._nap(min(self._loop.time() + delay, limit))
        return self.report()

    async def _connect(self) -> _Connection:
        client = DeviceClient(
            self.url,
            self.credentials.token,
            precision=self.options.precision,
            on_config=self._apply_config,
        )
        await client.connect(open_timeout=self.options.open_timeout_s)
        self.connects += 1
        self.stats.connected += 1
        if self.connects > 1:
            self.stats.reconnects += 1
        if self.first_connected_at is None:
            self.first_connected_at = time.time()
        connection = _Connection(client, self._loop.time())
        self._connection = connection
        client.on_closed(lambda: self._closed(connection))
        return connection

    def _connect_failed(self, why: str) -> None:
        self.failed_connects += 1
        self.stats.failed_connects += 1
        self.connect_errors[why] = self.connect_errors.get(why, 0) + 1

    def _closed(self, connection: _Connection) -> None:
        connection.closed = True
        self.stats.connected -= 1
        self.wake()

    async def _stream(self, connection: _Connection, deadline: float) -> int | None:
        """Resend, then send at the rate; the close code when the hub closed, else None."""
        try:
            for number, message in list(self._unacked.items()):
                room = await self._wait_for_room(connection, self._give_up_at or deadline)
                if connection.closed:
                    return self._close_code(connection)
                if not room:
                    break
                if number in self._unacked:
                    self.resent += len(message.readings)
                    self.stats.resent += len(message.readings)
                    await self._send(connection, number, message)
            self._next_send = self._loop.time()
            while self._give_up_at is None:
                now = self._loop.time()
                if self._stopping or now >= deadline or self._sent_enough():
                    self._finish_sending(now)
                    break
                if self.interval_s is not None and now >= self._next_send:
                    if not await self._wait_for_room(connection, deadline):
                        if connection.closed:
                            return self._close_code(connection)
                        continue
                    self._next_send = max(self._next_send + self.interval_s, now)
                    await self._send_new(connection)
                    continue
                wake_at = deadline if self.interval_s is None else min(self._next_send, deadline)
                await self._nap(wake_at)
                if connection.closed:
                    return self._close_code(connection)
            # Nothing new from now on: wait (bounded) for the acks of what is out.
            give_up_at = self._give_up_at
            assert give_up_at is not None
            while self._unacked and self._loop.time() < give_up_at:
                await self._nap(give_up_at)
                if connection.closed:
                    return self._close_code(connection)
        except (ConnectionError, ConnectionClosed):
            return self._close_code(connection)
        with contextlib.suppress(ConnectionError, ConnectionClosed, OSError):
            await connection.client.close()
        return None

    def _finish_sending(self, now: float) -> None:
        self._give_up_at = now + self.options.final_wait_s

    def _sent_enough(self) -> bool:
        limit = self.options.messages
        return limit is not None and self._new_messages >= limit

    def _close_code(self, connection: _Connection) -> int:
        code = connection.client.close_code
        return 1006 if code is None else code

    async def _wait_for_room(self, connection: _Connection, until: float) -> bool:
        """Wait until fewer than `window` messages are in flight: False if closed or late."""
        while self._in_flight >= self.options.window:
            if connection.closed or self._stopping or self._loop.time() >= until:
                return False
            await self._nap(until)
        return not connection.closed

    async def _send_new(self, connection: _Connection) -> None:
        batch = self.batch
        now = time.time_ns() // (10**9 // self._unit_per_s)
        # Sampled evenly over the interval that ends now, each later than the last.
        spacing = int((self.interval_s or 0) * self._unit_per_s) // batch
        times = []
        last = self._last_time
        for index in range(batch):
            last = max(now - (batch - 1 - index) * spacing, last + 1)
            times.append(last)
        self._last_time = last
        message = _Message([self._sensor.packed_reading(t) for t in times], times)
        number = self._next_number
        self._next_number += 1
        self._unacked[number] = message
        self._new_messages += 1
        self.sent += batch
        self.stats.sent += batch
        await self._send(connection, number, message)

    async def _send(self, connection: _Connection, number: int, message: _Message) -> None:
        count = len(message.readings)
        sent_at = self._loop.time()
        self._in_flight += 1
        self.stats.in_flight += count
        try:
            connection.seq += 1
            frame = readings_frame(connection.seq, message.readings)
            future = await connection.client.send_raw(frame, connection.seq)
        except BaseException:
            self._in_flight -= 1
            self.stats.in_flight -= count
            raise
        future.add_done_callback(
            lambda done: self._acked(connection, number, message, sent_at, done)
        )

    def _acked(
        self,
        connection: _Connection,
        number: int,
        message: _Message,
        sent_at: float,
        done: asyncio.Future[Ack],
    ) -> None:
        self._in_flight -= 1
        count = len(message.readings)
        if done.cancelled() or done.exception() is not None:
            self.stats.in_flight -= count
            return  # still unacked: sent again after the reconnect
        ack = done.result()
        connection.acked = True
        if self._unacked.pop(number, None) is None:
            self.stats.in_flight -= count
            return
        rejected = ack.rejected_indices()
        if self.options.record_times:
            for index, stamp in enumerate(message.times):
                (self._rejected_times if index in rejected else self._acked_times).append(stamp)
        self.acked += ack.accepted
        self.rejected += len(rejected)
        if self.first_ack_at is None:
            self.first_ack_at = time.time()
        self.stats.ack(ack.accepted, len(rejected), (self._loop.time() - sent_at) * 1000)
        self.wake()

    def _after_close(self, code: int) -> None:
        """What a close code asks of the messages still unacked."""
        if code == CloseCode.INVALID_PAYLOAD and self._unacked:
            # The oldest unacked message is the one the hub refused: never resend it as is.
            number = next(iter(self._unacked))
            self.dropped += len(self._unacked.pop(number).readings)
        elif code == CloseCode.MESSAGE_TOO_BIG:
            self._split_unacked()

    def _split_unacked(self) -> None:
        halves: dict[int, _Message] = {}
        for message in self._unacked.values():
            middle = max(1, len(message.readings) // 2)
            for part in (slice(0, middle), slice(middle, None)):
                if message.readings[part]:
                    halves[self._next_number] = _Message(
                        message.readings[part], message.times[part]
                    )
                    self._next_number += 1
        self._unacked = halves
        self.batch = max(1, self.batch // 2)

    async def _apply_config(self, config: Config) -> str | None:
        """Apply a pushed config; None when applied, else why it was refused."""
        settings = config.config
        interval = settings.get("interval_s", 1 / self.options.rate if self.options.rate else None)
        batch = settings.get("batch", self.options.batch)
        if interval is not None and (
            not isinstance(interval, int | float) or isinstance(interval, bool) or interval <= 0
        ):
            return f"interval_s must be a positive number, got {interval!r}"
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            return f"batch must be a positive integer, got {batch!r}"
        self.interval_s = None if interval is None else float(interval)
        self.batch = batch
        if self.interval_s is not None:
            self._next_send = min(self._next_send, self._loop.time() + self.interval_s)
        self.configs_applied.append(config.version)
        self.stats.config_acks += 1
        self.wake()
        return None

    async def _nap(self, until: float) -> None:
        """Sleep until loop time `until`, or until `wake()`."""
        delay = until - self._loop.time()
        if delay <= 0:
            await asyncio.sleep(0)
            return
        waker: asyncio.Future[None] = self._loop.create_future()
        self._waker = waker
        handle = self._loop.call_later(delay, _resolve, waker)
        try:
            await waker
        finally:
            handle.cancel()
            self._waker = None

    def report(self) -> DeviceReport:
        """What the device did so far."""
        unacked = sum(len(m.readings) for m in self._unacked.values())
        return DeviceReport(
            device_id=self.credentials.device_id,
            state=self.state,
            precision=self.options.precision,
            sent=self.sent,
            resent=self.resent,
            acked=self.acked,
            rejected=self.rejected,
            unacked=unacked,
            dropped=self.dropped,
            connects=self.connects,
            failed_connects=self.failed_connects,
            connect_errors=dict(self.connect_errors),
            configs_applied=list(self.configs_applied),
            close_codes=list(self.close_codes),
            acked_times=sorted(self._acked_times),
            rejected_times=sorted(self._rejected_times),
            first_connected_at=self.first_connected_at,
            first_ack_at=self.first_ack_at,
        )


def _resolve(waker: asyncio.Future[None]) -> None:
    if not waker.done():
        waker.set_result(None)
