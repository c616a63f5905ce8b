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

from hub.errors import HubError, ProtocolError, RateLimited, UnsupportedData
from hub.handshake import Handshake
from hub.protocol import DeviceEvent, ReadingsFrame, TelegrafFrame, decode_frame, encode
from hub.ratelimit import TokenBucket
from hub.readings import PreparedReadings, prepare_readings
from schemas.codes import CloseCode
from schemas.messages import Ack, Config, ConfigAck, ErrorMessage

if TYPE_CHECKING:
    from hub.server import Hub

log = logging.getLogger("hub.session")

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
        self._acks: asyncio.Queue[tuple[Ack, asyncio.Future[None] | None]] = asyncio.Queue(
            settings.max_unacked_messages
        )
        self._config_lock = asyncio.Lock()

    async def run(self) -> None:
        """Serve the connection until it closes."""
        sender = asyncio.create_task(self._send_acks())
        try:
            await self.push_config()
            await self._receive()
            # The hub is draining: ack what was received, then say goodbye with 1001.
            await self.acks_sent()
            await self.connection.close(CloseCode.GOING_AWAY, "hub shutting down")
        except ProtocolError as exc:
            # Messages before the bad frame were fine: ack them before saying goodbye.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acks.join(), ACK_GRACE_S)
            await self._refuse(exc)
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()

    async def push_config(self) -> None:
        """Send the desired config if the device has not answered its latest version."""
        async with self._config_lock:
            state = self.hub.registry.config_state(self.device_id)
            if not state.pending or state.version <= self.config_sent:
                return
            self.config_sent = state.version
            await self.connection.send(encode(Config(version=state.version, config=state.config)))
            log.info("device %s: sent config version %d", self.device_id, state.version)

    async def acks_sent(self) -> None:
        """Wait until every message received so far has been answered."""
        await self._acks.join()

    async def revoke(self) -> None:
        """Close the connection because the device's token was revoked."""
        log.warning("device %s: token revoked, closing the connection", self.device_id)
        await self.connection.close(CloseCode.REVOKED, "token revoked")

    async def _receive(self) -> None:
        max_readings = self.hub.settings.max_readings_per_message
        async for frame in self.connection:
            if self.hub.draining:
                return  # not processed, so not acked: the device sends it again later
            if isinstance(frame, str):
                raise UnsupportedData(
                    "text frames are not part of the protocol; send binary msgpack"
                )
            arrival_ns = time.time_ns()
            event = decode_frame(frame, max_readings)
            self._check_rate(event, time.monotonic())
            if isinstance(event, ReadingsFrame):
                await self._readings(event, arrival_ns)
            elif isinstance(event, TelegrafFrame):
                await self._telegraf(event, arrival_ns)
            elif isinstance(event, ConfigAck):
                self._config_answered(event)

    async def _readings(self, event: ReadingsFrame, arrival_ns: int) -> None:
        prepared = self._prepare(event.readings, arrival_ns)
        durable = None
        if prepared.accepted:
            durable = await self.hub.pipeline.submit(prepared.lines, prepared.accepted)
        ack = Ack(seq=event.seq, accepted=prepared.accepted, rejected=prepared.rejected)
        await self._acks.put((ack, durable))

    async def _telegraf(self, event: TelegrafFrame, arrival_ns: int) -> None:
        prepared = self._prepare(event.metrics, arrival_ns)
        if prepared.accepted:
            stored = await self.hub.pipeline.submit(prepared.lines, prepared.accepted)
            stored.add_done_callback(functools.partial(self._count_stored, prepared.accepted))
        invalid = len(prepared.rejected) + event.undecodable
        if invalid:
            first = prepared.rejected[0].errors[0] if prepared.rejected else "truncated metric"
            log.warning(
                "device %s: %d invalid Telegraf metric(s) not stored, first: %s",
                self.device_id,
                invalid,
                first[:200],
            )

    def _count_stored(self, readings: int, stored: asyncio.Future[None]) -> None:
        if not stored.cancelled() and stored.exception() is None:
            self.hub.presence.stored(self.device_id, readings)

    def _config_answered(self, answer: ConfigAck) -> None:
        recorded = self.hub.registry.record_config_ack(
            self.device_id, answer.version, answer.ok, answer.error
        )
        if not recorded:
            log.info(
                "device %s: ignored config_ack for version %d (stale or repeated)",
                self.device_id,
                answer.version,
            )
        elif answer.ok:
            log.info("device %s applied config version %d", self.device_id, answer.version)
        else:
            log.warning(
                "device %s refused config version %d: %s",
                self.device_id,
                answer.version,
                (answer.error or "")[:200],
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

    def _prepare(self, readings: list[Any], arrival_ns: int) -> PreparedReadings:
        return prepare_readings(
            readings,
            # Looked up per message so that a SIGHUP reload applies to open connections too.
            self.hub.schemas.validator(self.ns_per_unit),
            self.device_id,
            self.ns_per_unit,
            arrival_ns,
            self.hub.pipeline.multiline_strings,
        )

    async def _send_acks(self) -> None:
        while True:
            ack, durable = await self._acks.get()
            try:
                if durable is not None:
                    await durable
                await self.connection.send(encode(ack))
                self.hub.presence.stored(self.device_id, ack.accepted)
            except (ConnectionClosed, HubError, RuntimeError):
                # The device is gone or the hub is stopping: what is unacked, it resends.
                return
            finally:
                self._acks.task_done()

    async def _refuse(self, exc: ProtocolError) -> None:
        log.warning("device %s: %s; closing with %d", self.device_id, exc.message, exc.close_code)
        try:
            if not isinstance(exc, UnsupportedData):
                await self.connection.send(
                    encode(ErrorMessage(code=exc.error_code, message=exc.message))
                )
            await self.connection.close(exc.close_code, exc.message[:120])
        except ConnectionClosed:
            pass
