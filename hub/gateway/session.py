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
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from hub.core.frames import (
    FrameEvent,
    FrameLimits,
    ItemSpans,
    SlicedReadings,
    SlicedTelegraf,
    decode_device_frame,
    event_items,
)
from hub.core.handshake import Handshake
from hub.core.measurements import ReadingsValidator
from hub.core.protocol import ReadingsFrame, TelegrafFrame, encode, encode_ack
from hub.core.ratelimit import TokenBucket
from hub.core.readings import PreparedReadings, TimeLimits, bounded_reasons, prepare_readings
from hub.core.slices import SLICE_ITEMS, prepare_in_slices, prepare_list_in_slices
from hub.errors import HubError, Overloaded, ProtocolError, RateLimited, UnsupportedData
from hub.gateway.presence import PresenceTracker
from hub.ingest.pipeline import Pipeline
from hub.ops.logs import device_extra
from hub.ops.metrics import HubMetrics, error_label
from hub.registry.ports import ConfigStore
from hub.settings import Settings
from schemas.codes import CloseCode
from schemas.messages import Config, ConfigAck, ErrorMessage

log = logging.getLogger("hub.session")

_PendingAck = tuple[int, int, dict[int, list[str]], "asyncio.Future[None] | None"]
"""A message's seq, accepted count, rejection reasons, and what to wait for before its ack."""

ACK_GRACE_S = 10.0
"""How long acks of earlier messages may take before a protocol-error close."""


class SessionHost(Protocol):
    """What a session uses of the hub that runs it (`hub.server.Hub`), named here so that
    this module does not import the server."""

    settings: Settings
    metrics: HubMetrics
    pipeline: Pipeline
    presence: PresenceTracker
    draining: bool

    @property
    def registry(self) -> ConfigStore:
        """Desired configs, and where the device's answers go."""
        ...

    def validator(self, ns_per_unit: int) -> ReadingsValidator:
        """The readings validator for one precision."""
        ...


def _byte_burst(settings: Settings) -> float:
    """The byte bucket's size: `device_burst_s` of traffic, and never less than one frame of
    `max_message_bytes`, which could otherwise never pass."""
    return max(settings.device_bytes_per_s * settings.device_burst_s, settings.max_message_bytes)


class DeviceSession:
    """One device connection, from the upgrade to the close."""

    def __init__(
        self, hub: SessionHost, connection: ServerConnection, handshake: Handshake
    ) -> None:
        self.hub = hub
        self.connection = connection
        self.device_id = handshake.device_id
        self.token_hash = handshake.token_hash
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
        self._byte_rate = TokenBucket(settings.device_bytes_per_s, _byte_burst(settings))
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
        self._byte_rate.rate = settings.device_bytes_per_s
        self._byte_rate.burst = _byte_burst(settings)
        self._byte_rate.tokens = min(self._byte_rate.tokens, self._byte_rate.burst)

    async def run(self) -> None:
        """Serve the connection until it closes."""
        try:
            await self.push_config()
            if not await self._receive():
                return  # the device closed: what it did not see acked, it resends
            # The hub is draining: ack what was received, then say goodbye with 1001.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.hub.settings.shutdown_timeout_s):
                    await self.acks_sent()
            await self._close(CloseCode.GOING_AWAY, "hub shutting down")
        except ProtocolError as exc:
            # Messages before the bad frame were fine: ack them before saying goodbye.
            with contextlib.suppress(TimeoutError):
                if exc.acks_first:
                    async with asyncio.timeout(ACK_GRACE_S):
                        await self.acks_sent()
            await self._refuse(exc)
        except ConnectionClosed:
            pass
        finally:
            if self._sender is not None:
                self._sender.cancel()

    async def push_config(self) -> None:
        """Send the desired config if the device has not answered its latest version."""
        async with self._config_lock:
            state = await self.hub.registry.config_state(self.device_id)
            if not state.pending or state.version <= self.config_sent:
                return
            self.config_sent = state.version
            await self.connection.send(encode(Config(version=state.version, config=state.config)))
            self.hub.metrics.config_pushes.inc()
            log.info(
                "device %s: sent config version %d", self.device_id, state.version, extra=self._log
            )

    async def acks_sent(self) -> None:
        """Wait until every message received so far has been answered, or can no longer be
        (the connection is gone and the ack sender has stopped)."""
        if self._acks is None or self._sender is None or self._sender.done():
            return
        joined = asyncio.ensure_future(self._acks.join())
        try:
            await asyncio.wait((joined, self._sender), return_when=asyncio.FIRST_COMPLETED)
        finally:
            joined.cancel()

    async def revoke(self, reason: str = "token revoked") -> None:
        """Close the connection with 4001: the device's token was revoked or rotated out."""
        log.warning(
            "device %s: %s, closing the connection", self.device_id, reason, extra=self._log
        )
        await self.connection.close(CloseCode.REVOKED, reason)

    async def _receive(self) -> bool:
        """Handle frames until the connection closes (False) or the hub drains (True)."""
        async for frame in self.connection:
            if self.hub.draining:
                return True  # not processed, so not acked: the device sends it again later
            # A method of its own so that the decoded frame is freed as soon as it is handled,
            # while its memory is still in the CPU's cache: freed at the next frame instead,
            # after every other connection's turn, it cost a tenth of the hub's time.
            await self._handle(frame)
        return False

    async def _handle(self, frame: str | bytes) -> None:
        if isinstance(frame, str):
            raise UnsupportedData("text frames are not part of the protocol; send binary msgpack")
        arrival_ns = time.time_ns()
        # Looked up per frame so that a SIGHUP reload applies to open connections too.
        settings = self.hub.settings
        limits = FrameLimits.of(settings)
        # A small frame is decoded here; a large one only scanned (hub.frames): its
        # readings are decoded in _prepare, a slice at a time (hub.slices).
        event = decode_device_frame(frame, limits)
        self._check_rate(event, len(frame), time.monotonic())
        if isinstance(event, ReadingsFrame | SlicedReadings):
            await self._readings(event, arrival_ns, limits)
        elif isinstance(event, TelegrafFrame | SlicedTelegraf):
            await self._telegraf(event, arrival_ns, limits)
        elif isinstance(event, ConfigAck):
            await self._config_answered(event)

    async def _readings(
        self, event: ReadingsFrame | SlicedReadings, arrival_ns: int, limits: FrameLimits
    ) -> None:
        prepared = await self._prepare(event.readings, arrival_ns, limits)
        self.hub.metrics.traffic.readings_received += len(event.readings)
        durable = None
        if prepared.accepted:
            durable = await self._submit(prepared.lines, prepared.accepted)
            self.hub.metrics.time_ack(durable, arrival_ns)
        if self._acks is None:
            self._acks = asyncio.Queue(self.hub.settings.max_unacked_messages)
            self._sender = asyncio.create_task(self._send_acks(self._acks))
        elif self._sender is not None and self._sender.done():
            # Nothing would ever ack it (the connection is going, or the hub stopping).
            raise Overloaded("the hub cannot acknowledge readings now; retry later")
        reasons = bounded_reasons(prepared.reasons) if prepared.reasons else {}
        await self._acks.put((event.seq, prepared.accepted, reasons, durable))

    async def _telegraf(
        self, event: TelegrafFrame | SlicedTelegraf, arrival_ns: int, limits: FrameLimits
    ) -> None:
        prepared = await self._prepare(event.metrics, arrival_ns, limits, stream=True)
        # A large stream finds an undecodable metric only while preparing (hub.slices).
        undecodable = event.undecodable or prepared.undecodable
        received = prepared.accepted + len(prepared.reasons) + undecodable  # up to the break
        self.hub.metrics.traffic.readings_received += received
        if undecodable:
            self.hub.metrics.count_rejections((), undecodable)
        if prepared.accepted:
            stored = await self._submit(prepared.lines, prepared.accepted)
            stored.add_done_callback(functools.partial(self._count_stored, prepared.accepted))
        invalid = len(prepared.reasons) + undecodable
        if invalid:
            reasons = prepared.reasons
            first = reasons[min(reasons)][0] if reasons else "truncated metric"
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

    async def _config_answered(self, answer: ConfigAck) -> None:
        recorded = await self.hub.registry.record_config_ack(
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

    def _check_rate(self, event: FrameEvent, size: int, now: float) -> None:
        settings = self.hub.settings
        if not self._message_rate.take(1, now):
            raise RateLimited(f"more than {settings.device_messages_per_s:g} messages a second")
        if not self._byte_rate.take(size, now):
            raise RateLimited(f"more than {settings.device_bytes_per_s:g} bytes a second")
        count = event_items(event)
        if count and not self._reading_rate.take(count, now):
            raise RateLimited(f"more than {settings.device_readings_per_s:g} readings a second")

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
            async with asyncio.timeout(limit):
                return await submitted
        except TimeoutError:
            raise Overloaded(f"the hub is overloaded (waited {limit:g} s); retry later") from None

    async def _prepare(
        self,
        readings: list[Any] | ItemSpans,
        arrival_ns: int,
        limits: FrameLimits,
        stream: bool = False,
    ) -> PreparedReadings:
        # Looked up per message so that a SIGHUP reload applies to open connections too.
        validator = self.hub.validator(self.ns_per_unit)
        dialect = self.hub.pipeline.dialect
        time_limits = TimeLimits.of(self.hub.settings)
        metrics = self.hub.metrics
        field_types = self.hub.pipeline.field_types

        def prepare(part: list[Any], first_index: int) -> PreparedReadings:
            prepared = prepare_readings(
                part,
                validator,
                self.device_id,
                self.ns_per_unit,
                arrival_ns + first_index,  # time-less readings: arrival + index in the message
                dialect,
                limits.max_depth,
                time_limits,
                field_types,
            )
            if prepared.reasons:  # counted slice by slice: 5000 at once is a stall
                metrics.count_rejections(prepared.reasons.values())
            return prepared

        if isinstance(readings, list) and len(readings) <= SLICE_ITEMS:
            return prepare(readings, 0)  # the usual message, in one go
        # Many readings, or a large frame: a slice at a time, every other connection having
        # its turn in between.
        if isinstance(readings, list):
            steps = prepare_list_in_slices(readings, prepare)
        else:
            steps = prepare_in_slices(readings, prepare, limits, stream=stream)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                result: PreparedReadings = done.value
                return result
            await asyncio.sleep(0)

    async def _send_acks(self, acks: asyncio.Queue[_PendingAck]) -> None:
        traffic = self.hub.metrics.traffic
        while True:
            seq, accepted, reasons, durable = await acks.get()
            try:
                if durable is not None:
                    await durable
                traffic.readings_stored += accepted
                await self.connection.send(encode_ack(seq, accepted, reasons))
                traffic.acks += 1
                self.hub.presence.stored(self.device_id, accepted)
            except (ConnectionClosed, HubError, RuntimeError):
                # The device is gone or the hub is stopping: what is unacked, it resends.
                # Nothing queued will be answered: empty the queue, so that a reader
                # waiting for room or for `join` is not held forever.
                while not acks.empty():
                    acks.get_nowait()
                    acks.task_done()
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
