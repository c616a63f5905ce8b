"""The WebSocket shell: handshake checks, one session per device, acks in order.

Authentication happens in `process_request`, before the upgrade, so refusals are plain
HTTP answers. Everything a session does with a frame's contents is pure code from
`hub.protocol` and `hub.readings`; this module only moves bytes and waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from hub.errors import HubError, ProtocolError, RateLimited, UnsupportedData
from hub.measurements import MeasurementSchemas, ReadingsValidator
from hub.pipeline import Pipeline
from hub.protocol import DeviceEvent, ReadingsFrame, TelegrafFrame, decode_frame, encode
from hub.ratelimit import TokenBucket
from hub.readings import prepare_readings
from hub.registry import Registry
from hub.settings import Settings
from schemas.codes import DEFAULT_PRECISION, QUERY_PRECISIONS, WEBSOCKET_PATH, CloseCode
from schemas.messages import Ack, ConfigAck, ErrorMessage

log = logging.getLogger("hub.server")

RETRY_AFTER_S = 5
ACK_GRACE_S = 10.0


@dataclass(frozen=True, slots=True)
class Handshake:
    """What the handshake established about a connection."""

    device_id: str
    ns_per_unit: int


class HandshakeRefused(HubError):
    """The handshake is answered with `status` instead of an upgrade."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def read_credentials(path: str, headers: Mapping[str, str]) -> tuple[str, int]:
    """The token and the precision (ns per unit) a handshake asks for; pure, raises refusals."""
    url = urlsplit(path)
    if url.path != WEBSOCKET_PATH:
        raise HandshakeRefused(
            HTTPStatus.NOT_FOUND, f"no such path; devices connect to {WEBSOCKET_PATH}"
        )
    try:
        query = parse_qs(url.query, keep_blank_values=True, strict_parsing=bool(url.query))
    except ValueError:
        raise HandshakeRefused(HTTPStatus.BAD_REQUEST, "malformed query string") from None
    for name, values in query.items():
        if len(values) > 1:
            raise HandshakeRefused(
                HTTPStatus.BAD_REQUEST, f"query parameter {name!r} given twice"[:120]
            )
    precision = query.get("precision", [DEFAULT_PRECISION])[0]
    if precision not in QUERY_PRECISIONS:
        raise HandshakeRefused(
            HTTPStatus.BAD_REQUEST, "precision must be one of: " + ", ".join(QUERY_PRECISIONS)
        )
    query_token = query.get("token", [None])[0]
    header_token = None
    if (authorization := headers.get("Authorization")) is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise HandshakeRefused(HTTPStatus.UNAUTHORIZED, "invalid or missing token")
        header_token = value.strip()
    if query_token is not None and header_token is not None and query_token != header_token:
        raise HandshakeRefused(
            HTTPStatus.BAD_REQUEST, "the token query parameter and the Authorization header differ"
        )
    token = header_token or query_token
    if not token:
        raise HandshakeRefused(HTTPStatus.UNAUTHORIZED, "invalid or missing token")
    return token, QUERY_PRECISIONS[precision]


class Hub:
    """Accepts device connections and feeds their readings to the pipeline."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        schemas: MeasurementSchemas,
        pipeline: Pipeline,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.schemas = schemas
        self.pipeline = pipeline
        self.draining = False
        self._handshakes: dict[ServerConnection, Handshake] = {}
        self._live: dict[str, ServerConnection] = {}
        self._server: Server | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def live_devices(self) -> set[str]:
        """Devices with an open connection."""
        return set(self._live)

    async def start(self) -> Server:
        """Listen for devices."""
        s = self.settings
        self._server = await serve(
            self._session,
            s.host,
            s.port,
            # WebSocket
            compression=None,
            # HTTP
            process_request=self._process_request,
            server_header=None,
            # Timeouts
            open_timeout=s.handshake_timeout_s,
            ping_interval=s.ping_interval_s,
            ping_timeout=s.ping_timeout_s,
            close_timeout=5,
            # Limits
            max_size=s.max_message_bytes,
            max_queue=4,
            # Logging
            logger=logging.getLogger("websockets.server"),
        )
        return self._server

    async def stop(self) -> None:
        """Stop listening and close every connection with 1001."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        try:
            token, ns_per_unit = read_credentials(request.path, request.headers)
            if self.draining or len(self._handshakes) >= self.settings.max_connections:
                raise HandshakeRefused(
                    HTTPStatus.SERVICE_UNAVAILABLE, "the hub is not accepting connections now"
                )
            device_id = self.registry.authenticate(token)
            if device_id is None:
                raise HandshakeRefused(HTTPStatus.UNAUTHORIZED, "invalid or missing token")
        except HandshakeRefused as refusal:
            response = connection.respond(refusal.status, refusal.message + "\n")
            if refusal.status == HTTPStatus.SERVICE_UNAVAILABLE:
                response.headers["Retry-After"] = str(RETRY_AFTER_S)
            return response
        self._handshakes[connection] = Handshake(device_id, ns_per_unit)
        return None

    async def _session(self, connection: ServerConnection) -> None:
        handshake = self._handshakes[connection]
        device_id = handshake.device_id
        previous = self._live.get(device_id)
        self._live[device_id] = connection
        if previous is not None:
            # Not awaited: a vanished old peer must not delay the new session.
            closing = asyncio.create_task(
                previous.close(CloseCode.REPLACED, "replaced by a newer connection")
            )
            self._background.add(closing)
            closing.add_done_callback(self._background.discard)
        log.info("device %s connected from %s", device_id, _address(connection))
        try:
            await DeviceSession(self, connection, handshake).run()
        finally:
            del self._handshakes[connection]
            if self._live.get(device_id) is connection:
                del self._live[device_id]
            log.info("device %s disconnected (code %s)", device_id, connection.close_code)


class DeviceSession:
    """One device connection: read frames, submit readings, send acks in order."""

    def __init__(self, hub: Hub, connection: ServerConnection, handshake: Handshake) -> None:
        self.hub = hub
        self.connection = connection
        self.device_id = handshake.device_id
        self.ns_per_unit = handshake.ns_per_unit
        settings = hub.settings
        burst = settings.device_burst_s
        self._message_rate = TokenBucket(
            settings.device_messages_per_s, settings.device_messages_per_s * burst
        )
        self._reading_rate = TokenBucket(
            settings.device_readings_per_s, settings.device_readings_per_s * burst
        )
        self._acks: asyncio.Queue[tuple[Ack, asyncio.Future[None] | None]] = asyncio.Queue(
            hub.settings.max_unacked_messages
        )

    async def run(self) -> None:
        """Serve the connection until it closes."""
        sender = asyncio.create_task(self._send_acks())
        try:
            await self._receive()
        except ProtocolError as exc:
            # Messages before the bad frame were fine: ack them before saying goodbye.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acks.join(), ACK_GRACE_S)
            await self._refuse(exc)
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()

    async def _receive(self) -> None:
        max_readings = self.hub.settings.max_readings_per_message
        async for frame in self.connection:
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
                log.debug("device %s acknowledged config %d", self.device_id, event.version)

    async def _readings(self, event: ReadingsFrame, arrival_ns: int) -> None:
        prepared = prepare_readings(
            event.readings, self._validator(), self.device_id, self.ns_per_unit, arrival_ns
        )
        durable = None
        if prepared.accepted:
            durable = await self.hub.pipeline.submit(prepared.lines, prepared.accepted)
        ack = Ack(seq=event.seq, accepted=prepared.accepted, rejected=prepared.rejected)
        await self._acks.put((ack, durable))

    async def _telegraf(self, event: TelegrafFrame, arrival_ns: int) -> None:
        prepared = prepare_readings(
            event.metrics, self._validator(), self.device_id, self.ns_per_unit, arrival_ns
        )
        if prepared.accepted:
            await self.hub.pipeline.submit(prepared.lines, prepared.accepted)
        invalid = len(prepared.rejected) + event.undecodable
        if invalid:
            first = prepared.rejected[0].errors[0] if prepared.rejected else "truncated metric"
            log.warning(
                "device %s: %d invalid Telegraf metric(s) not stored, first: %s",
                self.device_id,
                invalid,
                first[:200],
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

    def _validator(self) -> ReadingsValidator:
        # Looked up per message so that a SIGHUP reload applies to open connections too.
        return self.hub.schemas.validator(self.ns_per_unit)

    async def _send_acks(self) -> None:
        while True:
            ack, durable = await self._acks.get()
            try:
                if durable is not None:
                    await durable
                await self.connection.send(encode(ack))
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


def _address(connection: ServerConnection) -> str:
    address: Any = connection.remote_address
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
