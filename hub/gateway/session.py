"""One device connection: read frames, submit readings, ack in order, push config.

The protocol's decisions (rate checks, ack order, close codes, config versions, draining)
are `hub.core.session.SessionMachine`'s, and everything done with a frame's contents is pure
code from `hub.core`; this driver only moves bytes and waits. It gets `SessionPorts`, the
narrow parts of the hub it uses, never the hub itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from hub.core.frames import (
    ItemSpans,
    SlicedReadings,
    SlicedTelegraf,
    decode_device_frame,
    event_items,
)
from hub.core.handshake import Handshake
from hub.core.protocol import ReadingsFrame, TelegrafFrame, encode, encode_ack
from hub.core.readings import PreparedReadings, bounded_reasons, prepare_readings
from hub.core.session import Close, SessionLimits, SessionMachine, config_result
from hub.core.slices import SLICE_ITEMS, prepare_in_slices, prepare_list_in_slices
from hub.errors import Overloaded, ProtocolError, RegistryUnavailable, UnsupportedData
from hub.gateway.session_ports import SessionPorts
from hub.ops.logs import device_extra
from hub.ops.metrics import error_label
from hub.registry.records import ConfigState
from schemas.codes import CloseCode
from schemas.messages import Config, ConfigAck

log = logging.getLogger("hub.session")

ACK_WRITE_BYTES = 64 * 1024
"""Acks written at once at most (the socket's buffer then drains before more are written)."""


class _AckSender:
    """The ack sender task of a session and what it waits on.

    It awaits each message's durability in the order the messages were read (no task, timer
    or callback per message) and tells the machine; `ready` wakes it when nothing was owed;
    `progress` wakes whoever waits for acks to go (flow control, a close, the shutdown)."""

    __slots__ = ("durables", "progress", "ready", "task")

    task: asyncio.Task[None]

    def __init__(self) -> None:
        self.durables: dict[int, asyncio.Future[None]] = {}  # by ticket, while owed
        self.ready = asyncio.Event()
        self.progress = asyncio.Event()


class DeviceSession:
    """One device connection, from the upgrade to the close: drives a `SessionMachine`."""

    # Slots: thousands of idle connections each hold one.
    __slots__ = (
        "_acks",
        "_config_lock",
        "_log",
        "_ports",
        "connection",
        "device_id",
        "machine",
        "ns_per_unit",
        "token_hash",
    )

    def __init__(
        self,
        connection: ServerConnection,
        handshake: Handshake,
        ports: SessionPorts,
        limits: SessionLimits,
    ) -> None:
        self.connection = connection
        self.device_id = handshake.device_id
        self.token_hash = handshake.token_hash
        self.ns_per_unit = handshake.ns_per_unit
        self.machine = SessionMachine(limits)
        self._ports = ports
        # Made on the first readings message: an idle connection then costs neither the
        # task nor its events.
        self._acks: _AckSender | None = None
        self._config_lock = asyncio.Lock()
        self._log = device_extra(self.device_id)

    @property
    def config_sent(self) -> int:
        """The newest config version sent on this connection (0: none)."""
        return self.machine.config_sent

    def apply_limits(self, limits: SessionLimits) -> None:
        """Use reloaded per-device limits from now on."""
        self.machine.apply_limits(limits)

    async def run(self) -> None:
        """Serve the connection until it closes."""
        try:
            with contextlib.suppress(RegistryUnavailable):  # said once; pushed on a change
                await self.push_config()
            close = await self._receive()
            if close is None:
                return  # the device closed: what it did not see acked, it resends
            await self._close_after_acks(close)  # the hub drains: 1001 after the acks
        except ProtocolError as exc:
            self._ports.metrics.protocol_errors.labels(error_label(exc)).inc()
            log.warning(
                "device %s: %s; closing with %d",
                self.device_id,
                exc.message,
                exc.close_code,
                extra=self._log,
            )
            await self._close_after_acks(self.machine.refuse(exc))
        except ConnectionClosed:
            pass
        finally:
            if self._acks is not None:
                self._acks.task.cancel()

    async def push_config(self, state: ConfigState | None = None) -> None:
        """Send the desired config if the device has not answered its latest version: from
        `state` when the caller read it (the fleet watcher reads a whole change's at once),
        else as the config store has it now."""
        async with self._config_lock:
            if state is None:
                state = await self._ports.configs.config_state(self.device_id)
            send = self.machine.config_to_send(state.version, state.pending, state.config)
            if send is None:
                return
            await self.connection.send(encode(Config(version=send.version, config=send.config)))
            self._ports.metrics.config_pushes.inc()
            # DEBUG: at INFO a push to 10,000 devices logged 20,000 lines (sent, applied),
            # past journald's rate limit (10,000 in 30 s). Counted in /metrics; the watcher
            # logs each push's size.
            log.debug(
                "device %s: sent config version %d", self.device_id, send.version, extra=self._log
            )

    async def acks_sent(self) -> None:
        """Wait until every message received so far has been answered, or can no longer be
        (the connection is gone and the ack sender has stopped)."""
        machine = self.machine
        await self._until(lambda: machine.acks_owed == 0)

    async def _until(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition` holds after the sender's progress, or the sender is gone."""
        while not condition():
            acks = self._acks
            if acks is None or acks.task.done():
                return
            acks.progress.clear()
            await acks.progress.wait()

    async def revoke(self, reason: str = "token revoked") -> None:
        """Close the connection with 4001: the device's token was revoked or rotated out."""
        log.warning(
            "device %s: %s, closing the connection", self.device_id, reason, extra=self._log
        )
        await self.connection.close(CloseCode.REVOKED, reason)

    async def _receive(self) -> Close | None:
        """Handle frames until the connection closes (None) or the hub drains (the close)."""
        machine = self.machine
        async for frame in self.connection:
            if self._ports.drain.draining:
                # Not processed, so not acked: the device sends it again later.
                return machine.drain()
            # A method of its own so that the decoded frame is freed as soon as it is handled,
            # while its memory is still in the CPU's cache: freed at the next frame instead,
            # after every other connection's turn, it cost a tenth of the hub's time.
            await self._handle(frame)
            if not machine.has_room:  # flow control: no more frames until acks go out
                await self._until(lambda: machine.has_room)
        return None

    async def _handle(self, frame: str | bytes) -> None:
        if isinstance(frame, str):
            raise UnsupportedData("text frames are not part of the protocol; send binary msgpack")
        arrival_ns = time.time_ns()
        # A small frame is decoded here; a large one only scanned (hub.core.frames): its
        # readings are decoded in _prepare, a slice at a time (hub.core.slices).
        event = decode_device_frame(frame, self.machine.limits.frame)
        self.machine.check_rate(len(frame), event_items(event), time.monotonic())
        if isinstance(event, ReadingsFrame | SlicedReadings):
            await self._readings(event, arrival_ns)
        elif isinstance(event, TelegrafFrame | SlicedTelegraf):
            await self._telegraf(event, arrival_ns)
        elif isinstance(event, ConfigAck):
            # Unavailable: said once; still pending, so pushed (and answered) again at the
            # device's next connection.
            with contextlib.suppress(RegistryUnavailable):
                await self._config_answered(event)

    async def _readings(self, event: ReadingsFrame | SlicedReadings, arrival_ns: int) -> None:
        prepared = await self._prepare(event.readings, arrival_ns)
        metrics = self._ports.metrics
        metrics.traffic.readings_received += len(event.readings)
        durable = None
        if prepared.accepted:
            durable = await self._submit(prepared.lines, prepared.accepted)
            metrics.time_ack(durable, arrival_ns)
        acks = self._acks
        if acks is None:
            acks = self._acks = _AckSender()
            acks.task = asyncio.create_task(self._send_acks(acks))
        reasons = bounded_reasons(prepared.reasons) if prepared.reasons else {}
        ticket = self.machine.message_read(
            event.seq, prepared.accepted, reasons, durable is not None
        )
        if durable is not None:
            acks.durables[ticket] = durable
        acks.ready.set()  # a no-op unless the sender is idle

    async def _telegraf(self, event: TelegrafFrame | SlicedTelegraf, arrival_ns: int) -> None:
        prepared = await self._prepare(event.metrics, arrival_ns, stream=True)
        metrics = self._ports.metrics
        # A large stream finds an undecodable metric only while preparing (hub.core.slices).
        undecodable = event.undecodable or prepared.undecodable
        received = prepared.accepted + len(prepared.reasons) + undecodable  # up to the break
        metrics.traffic.readings_received += received
        if undecodable:
            metrics.count_rejections((), undecodable)
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
            self._ports.metrics.traffic.readings_stored += readings
            self._ports.presence.stored(self.device_id, readings)

    async def _config_answered(self, answer: ConfigAck) -> None:
        record = self.machine.config_answered(answer)
        recorded = await self._ports.configs.record_config_ack(
            self.device_id, record.version, record.ok, record.error
        )
        self._ports.metrics.config_acks.labels(config_result(recorded, record.ok)).inc()
        if not recorded:
            log.info(
                "device %s: ignored config_ack for version %d (stale or repeated)",
                self.device_id,
                answer.version,
                extra=self._log,
            )
        elif answer.ok:
            log.debug(  # DEBUG: see push_config
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

    async def _submit(self, lines: str, count: int) -> asyncio.Future[None]:
        # The pipeline makes devices wait while it is full (backpressure). One that is still
        # sending after overload_close_s is told to come back later rather than held.
        pipeline = self._ports.ingest
        if pipeline.has_room(count):
            # Goes straight through: no timeout, whose task and timer cost more than the
            # submit itself (a sixth of the hub's time with one reading a message).
            return pipeline.submit_nowait(lines, count)
        limit = self.machine.limits.overload_close_s
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
        stream: bool = False,
    ) -> PreparedReadings:
        # Looked up per message so that a SIGHUP reload applies to open connections too.
        validator = self._ports.validators.validator(self.ns_per_unit)
        ingest = self._ports.ingest
        dialect = ingest.dialect
        limits = self.machine.limits.frame
        time_limits = self.machine.limits.time
        metrics = self._ports.metrics
        field_types = ingest.field_types

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

    async def _send_acks(self, acks: _AckSender) -> None:
        machine = self.machine
        traffic = self._ports.metrics.traffic
        presence = self._ports.presence
        frames: list[bytes] = []  # acks encoded in this turn of the event loop, not yet written
        size = acked = 0  # their bytes, and the readings they accept
        try:
            while True:
                ack = machine.next_ack()
                if ack is not None:
                    frame = encode_ack(ack.seq, ack.accepted, ack.reasons)
                    frames.append(frame)
                    size += len(frame)
                    # Sent as far as the machine is concerned: written before anything waits.
                    machine.ack_sent()
                    traffic.readings_stored += ack.accepted
                    acked += ack.accepted
                    if size < ACK_WRITE_BYTES:
                        continue
                awaited = machine.awaited
                if awaited is not None and acks.durables[awaited].done() and size < ACK_WRITE_BYTES:
                    await self._settle(awaited, acks.durables.pop(awaited))  # does not suspend
                    continue
                if frames:  # before waiting: every ack this turn made, in one write
                    await self._write_acks(frames)
                    traffic.acks += len(frames)
                    presence.stored(self.device_id, acked)
                    frames, size, acked = [], 0, 0
                    continue
                if machine.acks_stopped:
                    return  # a message can no longer be stored: the hub is stopping
                acks.progress.set()
                if awaited is None:  # nothing owed: wait for the next message
                    acks.ready.clear()
                    await acks.ready.wait()
                else:  # the oldest message's durability, in the order they were read
                    await self._settle(awaited, acks.durables.pop(awaited))
        except (ConnectionClosed, RuntimeError):
            pass  # the device is gone or the hub is stopping: what is unacked, it resends
        finally:
            # Nothing owed will be answered now: whoever waits for room or for the acks
            # must not be held forever.
            machine.acks_failed()
            acks.durables.clear()
            acks.progress.set()

    async def _write_acks(self, frames: list[bytes]) -> None:
        """Send `frames`, each a message, with one write to the socket: websockets' `send`
        writes every message on its own, one syscall each."""
        connection = self.connection
        if len(frames) == 1:
            await connection.send(frames[0])
            return
        # send_context checks the state and waits for the drain, as for one send; its
        # protocol frames the messages, and the transport takes them in one writelines.
        async with connection.send_context():
            protocol = connection.protocol
            for frame in frames:
                protocol.send_binary(frame)
            # Frames only: the end-of-stream marker follows a close, which cannot come here.
            connection.transport.writelines(protocol.data_to_send())

    async def _settle(self, ticket: int, durable: asyncio.Future[None]) -> None:
        """Wait for a message's readings to be durable, and tell the machine how it went."""
        try:
            await durable
        except asyncio.CancelledError:
            if not durable.cancelled():
                raise  # the sender itself is cancelled
            self.machine.failed(ticket)
        except Exception:  # e.g. the pipeline stopping: the device resends what is unacked
            self.machine.failed(ticket)
        else:
            self.machine.durable(ticket)

    async def _close_after_acks(self, close: Close) -> None:
        """Carry out a close: the acks owed (bounded), the `error` message, the close frame."""
        if close.acks_within is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(close.acks_within):
                    await self.acks_sent()
        try:
            if close.error is not None:
                await self.connection.send(encode(close.error))
            await self._close(close.code, close.reason)
        except ConnectionClosed:
            pass

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
