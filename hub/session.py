"""One device connection: read frames, submit readings, ack in order, push config.

Everything done with a frame's contents is pure code from `hub.protocol` and
`hub.readings`; a session only moves bytes and waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from hub.errors import HubError, Overloaded, ProtocolError, RateLimited, UnsupportedData
from hub.handshake import Handshake
from hub.logs import device_extra
from hub.metrics import error_label
from hub.protocol import (
    DeviceEvent,
    ReadingsFrame,
    TelegrafFrame,
    decode_frame,
    encode,
    encode_ack,
)
from hub.ratelimit import TokenBucket
from hub.readings import PreparedReadings, TimeLimits, prepare_readings
from hub.settings import Settings
from schemas.codes import CloseCode
from schemas.messages import Config, ConfigAck, ErrorMessage, Rejection

if TYPE_CHECKING:
    from hub.server import Hub

log = logging.getLogger("hub.session")

_PendingAck = tuple[int, int, list[Rejection], "asyncio.Future[None] | None"]
"""A message's seq, accepted count, rejections, and what to wait for before its ack."""

ACK_GRACE_S = 10.0
"""How long acks of earlier messages may take before a protocol-error close."""


class DeviceSession:
    """One device connection, from the upgrade to the close."""

    def __init__(self, hub: Hub, connection: ServerConnection, handshake: Handshake) -> None:
        self.hub = hub
        self.connection = connection
        self.device_id = handshake.device_id
        self.ns_per_unit = handshake.ns_per_unit
        self.config_sent = 0
        settings = hub.settings
        burst = settings.device_burst_s
        self._message_rate = TokenBucket(
            settings.device_messages_per_s, settings.device_messages_per_s * burst
        )
        self._reading_rate = TokenBucket(
            settings.device_readings_per_s, settings.device_readings_per_s * burst
        )
        # Made on the first readings message: an idle connection then costs neither.
        self._acks: asyncio.Queue[_PendingAck] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._config_lock = asyncio.Lock()
        self._log = device_extra(self.device_id)

    def apply_limits(self, settings: Settings) -> None:
        """Use reloaded per-device rate limits from now on."""
        for bucket, rate in (
            (self._message_rate, settings.device_messages_per_s),
            (self._reading_rate, settings.device_readings_per_s),
        ):
            bucket.rate = rate
            bucket.burst = rate * settings.device_burst_s
            bucket.tokens = min(bucket.tokens, bucket.burst)

    async def run(self) -> None:
        """Serve the connection until it closes."""
        try:
            await self.push_config()
            await self._receive()
            # The hub is draining: ack what was received, then say goodbye with 1001.
            await self.acks_sent()
            await self._close(CloseCode.GOING_AWAY, "hub shutting down")
        except ProtocolError as exc:
            # Messages before the bad frame were fine: ack them before saying goodbye.
            with contextlib.suppress(TimeoutError):
                if exc.acks_first:
                    await asyncio.wait_for(self.acks_sent(), ACK_GRACE_S)
            await self._refuse(exc)
        except ConnectionClosed:
            pass
        finally:
            if self._sender is not None:
                self._sender.cancel()

    async def push_config(self) -> None:
        """Send the desired config if the device has not answered its latest version."""
        async with self._config_lock:
            state = self.hub.registry.config_state(self.device_id)
            if not state.pending or state.version <= self.config_sent:
                return
            self.config_sent = state.version
            await self.connection.send(encode(Config(version=state.version, config=state.config)))
            self.hub.metrics.config_pushes.inc()
            log.info(
                "device %s: sent config version %d", self.device_id, state.version, extra=self._log
            )

    async def acks_sent(self) -> None:
        """Wait until every message received so far has been answered."""
        if self._acks is not None:
            await self._acks.join()

    async def revoke(self) -> None:
        """Close the connection because the device's token was revoked."""
        log.warning(
            "device %s: token revoked, closing the connection", self.device_id, extra=self._log
        )
        await self.connection.close(CloseCode.REVOKED, "token revoked")

    async def _receive(self) -> None:
        async for frame in self.connection:
            if self.hub.draining:
                return  # not processed, so not acked: the device sends it again later
            # A method of its own so that the decoded frame is freed as soon as it is handled,
            # while its memory is still in the CPU's cache: freed at the next frame instead,
            # after every other connection's turn, it cost a tenth of the hub's time.
            await self._handle(frame)

    async def _handle(self, frame: str | bytes) -> None:
        if isinstance(frame, str):
            raise UnsupportedData("text frames are not part of the protocol; send binary msgpack")
        arrival_ns = time.time_ns()
        # Looked up per frame so that a SIGHUP reload applies to open connections too.
        settings = self.hub.settings
        event = decode_frame(frame, settings.max_readings_per_message, settings.max_nesting_depth)
        self._check_rate(event, time.monotonic())
        if isinstance(event, ReadingsFrame):
            await self._readings(event, arrival_ns)
        elif isinstance(event, TelegrafFrame):
            await self._telegraf(event, arrival_ns)
        elif isinstance(event, ConfigAck):
            self._config_answered(event)

    async def _readings(self, event: ReadingsFrame, arrival_ns: int) -> None:
        prepared = self._prepare(event.readings, arrival_ns)
        self.hub.metrics.traffic.readings_received += len(event.readings)
        if prepared.rejected:
            self.hub.metrics.count_rejections(prepared.rejected)
        durable = None
        if prepared.accepted:
            durable = await self._submit(prepared.lines, prepared.accepted)
        if self._acks is None:
            self._acks = asyncio.Queue(self.hub.settings.max_unacked_messages)
            self._sender = asyncio.create_task(self._send_acks(self._acks))
        await self._acks.put((event.seq, prepared.accepted, prepared.rejected, durable))

    async def _telegraf(self, event: TelegrafFrame, arrival_ns: int) -> None:
        prepared = self._prepare(event.metrics, arrival_ns)
        self.hub.metrics.traffic.readings_received += len(event.metrics) + event.undecodable
        if prepared.rejected or event.undecodable:
            self.hub.metrics.count_rejections(prepared.rejected, event.undecodable)
        if prepared.accepted:
            stored = await self._submit(prepared.lines, prepared.accepted)
            stored.add_done_callback(functools.partial(self._count_stored, prepared.accepted))
        invalid = len(prepared.rejected) + event.undecodable
        if invalid:
            first = prepared.rejected[0].errors[0] if prepared.rejected else "truncated metric"
            log.warning(
                "device %s: %d invalid Telegraf metric(s) not stored, first: %s",
                self.device_id,
                invalid,
                first[:200],
                extra=self._log,
            )

    def _count_stored(self, readings: int, stored: asyncio.Future[None]) -> None:
        if not stored.cancelled() and stored.exception() is None:
            self.hub.metrics.traffic.readings_stored += readings
            self.hub.presence.stored(self.device_id, readings)

    def _config_answered(self, answer: ConfigAck) -> None:
        recorded = self.hub.registry.record_config_ack(
            self.device_id, answer.version, answer.ok, answer.error
        )
        result = "ignored" if not recorded else "applied" if answer.ok else "refused"
        self.hub.metrics.config_acks.labels(result).inc()
        if not recorded:
            log.info(
                "device %s: ignored config_ack for version %d (stale or repeated)",
                self.device_id,
                answer.version,
                extra=self._log,
            )
        elif answer.ok:
            log.info(
                "device %s applied config version %d",
                self.device_id,
                answer.version,
                extra=self._log,
            )
        else:
            log.warning(
                "device %s refused config version %d: %s",
                self.device_id,
                answer.version,
                (answer.error or "")[:200],
                extra=self._log,
            )

    def _check_rate(self, event: DeviceEvent, now: float) -> None:
        if not self._message_rate.take(1, now):
            raise RateLimited(
                f"more than {self.hub.settings.device_messages_per_s:g} messages a second"
            )
        if isinstance(event, ReadingsFrame | TelegrafFrame):
            count = len(event.readings if isinstance(event, ReadingsFrame) else event.metrics)
            if not self._reading_rate.take(count, now):
                raise RateLimited(
                    f"more than {self.hub.settings.device_readings_per_s:g} readings a second"
                )

    async def _submit(self, lines: str, count: int) -> asyncio.Future[None]:
        # The pipeline makes devices wait while it is full (backpressure). One that is still
        # sending after overload_close_s is told to come back later rather than held.
        pipeline = self.hub.pipeline
        if pipeline.has_room(count):
            # Goes straight through: no timeout, whose task and timer cost more than the
            # submit itself (a sixth of the hub's time with one reading a message).
            return pipeline.submit_nowait(lines, count)
        limit = self.hub.settings.overload_close_s
        try:
            # The dialect the lines were just formatted in, taken now: the task starts later.
            submitted = pipeline.submit(lines, count, pipeline.dialect)
            return await asyncio.wait_for(submitted, limit)
        except TimeoutError:
            raise Overloaded(f"the hub is overloaded (waited {limit:g} s); retry later") from None

    def _prepare(self, readings: list[Any], arrival_ns: int) -> PreparedReadings:
        return prepare_readings(
            readings,
            # Looked up per message so that a SIGHUP reload applies to open connections too.
            self.hub.validator(self.ns_per_unit),
            self.device_id,
            self.ns_per_unit,
            arrival_ns,
            self.hub.pipeline.dialect,
            self.hub.settings.max_nesting_depth,
            TimeLimits.of(self.hub.settings),
        )

    async def _send_acks(self, acks: asyncio.Queue[_PendingAck]) -> None:
        traffic = self.hub.metrics.traffic
        while True:
            seq, accepted, rejected, durable = await acks.get()
            try:
                if durable is not None:
                    await durable
                traffic.readings_stored += accepted
                await self.connection.send(encode_ack(seq, accepted, rejected))
                traffic.acks += 1
                self.hub.presence.stored(self.device_id, accepted)
            except (ConnectionClosed, HubError, RuntimeError):
                # The device is gone or the hub is stopping: what is unacked, it resends.
                return
            finally:
                acks.task_done()

    async def _close(self, code: int, reason: str) -> None:
        # Frames the device sent meanwhile must still be read and thrown away: otherwise
        # flow control stops reading the socket and the device's close frame is never seen.
        discard = asyncio.create_task(self._discard_frames())
        try:
            await self.connection.close(code, reason)
        finally:
            discard.cancel()

    async def _discard_frames(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self.connection.recv()

    async def _refuse(self, exc: ProtocolError) -> None:
        self.hub.metrics.protocol_errors.labels(error_label(exc)).inc()
        log.warning(
            "device %s: %s; closing with %d",
            self.device_id,
            exc.message,
            exc.close_code,
            extra=self._log,
        )
        try:
            if not isinstance(exc, UnsupportedData):
                await self.connection.send(
                    encode(ErrorMessage(code=exc.error_code, message=exc.message))
                )
            await self._close(exc.close_code, exc.message[:120])
        except ConnectionClosed:
            pass
