"""The WebSocket shell: handshake checks, one live session per device, operator changes.

Authentication happens in `process_request`, before the upgrade, so refusals are plain
HTTP answers. The hub also watches the registry for what operators change from the CLI
(a new desired config, a revoked token) and acts on live sessions within a poll interval,
and keeps presence: who is connected, in the registry and as points in InfluxDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Coroutine
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from hub.core.dialects import Dialect
from hub.core.handshake import Handshake, HandshakeRefused, read_credentials
from hub.core.measurements import MeasurementSchemas, ReadingLimits, ReadingsValidator
from hub.core.proxyheader import TrustedProxies
from hub.core.ratelimit import FailedHandshakeLimiter
from hub.core.session import SessionLimits
from hub.gateway.activation import take_device_socket
from hub.gateway.admission import (
    ConnectionSlots,
    StrangerCounts,
    StrangerGuard,
    StrangerLog,
    guarded_connection,
    peer_of,
    source_of,
)
from hub.gateway.ownership import Ownership
from hub.gateway.presence import PresenceTracker
from hub.gateway.rotation import ROTATED_OUT_REASON, RotationWatch
from hub.gateway.session import DeviceSession
from hub.gateway.session_ports import SessionPorts
from hub.gateway.tls import tls_context
from hub.gateway.watcher import FleetWatcher
from hub.ingest.pipeline import Pipeline
from hub.ops.filelimit import raise_file_limit
from hub.ops.logs import RedactingFilter, device_extra
from hub.ops.metrics import HubMetrics, refusal_reason
from hub.registry.ports import HubRegistry
from hub.registry.records import hash_token
from hub.settings import Settings
from schemas.codes import CloseCode

log = logging.getLogger("hub.server")

RETRY_AFTER_S = 5
LISTEN_BACKLOG = 4096
STOP_GRACE_S = 0.5
"""After the deadline: how long the handlers of dropped connections get to finish."""


class Hub:
    """Accepts device connections and feeds their readings to the pipeline."""

    def __init__(
        self,
        settings: Settings,
        registry: HubRegistry,
        schemas: MeasurementSchemas,
        pipeline: Pipeline,
        metrics: HubMetrics,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.schemas = schemas
        self.pipeline = pipeline
        self.metrics = metrics
        self.presence = PresenceTracker(registry)
        self.draining = False
        self.session_limits = SessionLimits.of(settings)
        self.slots = ConnectionSlots()
        self.rotation = RotationWatch(registry)
        self.stranger_counts = StrangerCounts()
        self.stranger_log = StrangerLog(log, self.stranger_counts, time.monotonic)
        self.strangers = StrangerGuard(
            settings.max_unauthenticated_per_source,
            settings.request_header_timeout_s,
            settings.max_request_header_bytes,
            self.stranger_log,
            self.stranger_counts,
            TrustedProxies(settings.proxy_protocol_from),
        )
        self._background: set[asyncio.Task[None]] = set()
        self.ownership = Ownership(registry, self.presence, self._spawn)
        self._sessions = self.ownership.sessions
        self.watcher = FleetWatcher(
            registry, self._sessions, self.rotation, settings.registry_poll_s, self._spawn
        )
        self._server: Server | None = None
        self._socket_from_systemd = False
        self._bound: Any = None  # (host, port, ...) of the device socket, once listening
        self._loops: list[asyncio.Task[None]] = []
        self._validators: dict[int, ReadingsValidator] = {}
        self.failed_handshakes = FailedHandshakeLimiter(
            settings.auth_failures_burst,
            settings.auth_failures_per_min / 60,
            settings.auth_block_s,
        )

    @property
    def live_devices(self) -> set[str]:
        """Devices with an open connection."""
        return set(self._sessions)

    @property
    def connections(self) -> int:
        """Admitted connections still open (what `max_connections` bounds)."""
        return len(self.slots)

    async def start(self) -> Server:
        """Listen for devices and start watching the registry."""
        s = self.settings
        await self.presence.load()
        if (files := raise_file_limit(s.max_connections)) is not None:
            self.strangers.fit_to(files.soft)
        listener = take_device_socket()  # hub.socket's, or None: bind host:port as always
        self._socket_from_systemd = listener is not None
        where: dict[str, Any] = (
            {"sock": listener} if listener is not None else {"host": s.host, "port": s.port}
        )
        self._server = await serve(
            self._session,
            **where,
            ssl=tls_context(s),
            # WebSocket; deflate is off unless asked for: memory per connection, and
            # compression next to secrets invites CRIME-style guessing
            compression="deflate" if s.compression else None,
            # HTTP
            process_request=self._process_request,
            server_header=None,
            # Strangers: per-source cap, header deadline and size (hub.admission)
            create_connection=guarded_connection(self.strangers),
            # Timeouts
            open_timeout=s.handshake_timeout_s,
            ping_interval=s.ping_interval_s,
            ping_timeout=s.ping_timeout_s,
            close_timeout=5,
            # Limits (with deflate, max_size bounds the inflated message)
            max_size=s.max_message_bytes,
            max_queue=4,
            # asyncio's default of 100 overflows in a connect storm: the kernel drops the
            # SYNs and those devices retry 1, 3, 7 s later. It caps this at somaxconn.
            backlog=LISTEN_BACKLOG,
            # Logging
            logger=_redacting_logger("websockets.server"),
        )
        # Kept: once the drain has closed the listener (stop_accepting) it has no sockets.
        self._bound = self._server.sockets[0].getsockname()
        self._loops = [
            asyncio.create_task(self.watcher.run(), name="registry-watch"),
            asyncio.create_task(self._keep_presence(), name="presence"),
            asyncio.create_task(self.ownership.run(), name="ownership-safety-net"),
        ]
        return self._server

    def stop_accepting(self) -> None:
        """On systemd's socket, stop accepting as the drain begins: devices that connect
        during a restart then wait in the backlog (systemd keeps the socket open) for the
        next hub instead of getting 503. A socket of our own stays open and answers 503."""
        if self._socket_from_systemd and self._server is not None:
            self._server.server.close()

    async def acks_sent(self) -> None:
        """Wait until every session has answered every message it received."""
        await asyncio.gather(*(session.acks_sent() for session in list(self._sessions.values())))

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop listening, close every connection with 1001, record everyone offline; all
        within `timeout_s` (default `shutdown_timeout_s`), dropping what is still open then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (
            self.settings.shutdown_timeout_s if timeout_s is None else timeout_s
        )
        if self._server is not None:
            self._server.close()
            self.strangers.abort_waiting()
            try:
                async with asyncio.timeout(max(0.1, deadline - loop.time())):
                    await self._server.wait_closed()
            except TimeoutError:
                self._drop_connections(self._server)
                with contextlib.suppress(TimeoutError):  # their handlers' cleanup, briefly
                    async with asyncio.timeout(STOP_GRACE_S):
                        await self._server.wait_closed()
        for loop_task in self._loops:
            loop_task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        # Bounded: with the pipeline full (InfluxDB gone, spool full) submit would wait forever.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.1, deadline - loop.time())):
                await self._record_presence()

    def _drop_connections(self, server: Server) -> None:
        log.warning(
            "shutdown: %d connection(s) did not close in time; dropping them",
            len(server.handler_tasks),
        )
        for connection in list(server.all_connections):
            connection.transport.abort()
        for task in list(server.handler_tasks):
            task.cancel()

    @property
    def listening(self) -> bool:
        """Whether the device port is open."""
        return self._server is not None and self._server.is_serving()

    @property
    def accepting(self) -> bool:
        """Whether new devices are let in: listening, not draining, below max_connections."""
        return (
            self.listening and not self.draining and len(self.slots) < self.settings.max_connections
        )

    def reconfigure(self, settings: Settings, schemas: MeasurementSchemas) -> None:
        """Apply reloaded settings and schemas to the hub and every open connection."""
        self.settings = settings
        self.schemas = schemas
        self._validators.clear()
        self.session_limits = SessionLimits.of(settings)
        for session in self._sessions.values():
            session.apply_limits(self.session_limits)

    def validator(self, ns_per_unit: int) -> ReadingsValidator:
        """The readings validator for one precision, under the current schemas and limits."""
        found = self._validators.get(ns_per_unit)
        if found is None:
            limits = ReadingLimits.of(self.settings)
            found = self._validators[ns_per_unit] = self.schemas.validator(ns_per_unit, limits)
        return found

    @property
    def host(self) -> str:
        """The address actually bound: systemd's socket may differ from the `host` setting."""
        assert self._bound is not None, "start() first"
        return str(self._bound[0])

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        assert self._bound is not None, "start() first"
        return int(self._bound[1])

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        # Never log request.path: its query string may hold the token.
        try:
            return await self._admit(connection, request)
        except Exception as exc:  # e.g. the client reset the connection: one line, no traceback
            self.stranger_counts.handshake_errors += 1
            self.stranger_log.line(
                logging.WARNING,
                "handshake from %s failed: %s",
                source_of(connection),
                type(exc).__name__,
            )
            return connection.respond(
                HTTPStatus.INTERNAL_SERVER_ERROR, "the hub could not answer this handshake\n"
            )

    async def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        source = source_of(connection)
        limiter = self.failed_handshakes
        now = time.monotonic()
        blocked_s = limiter.blocked_for(source, now)
        try:
            token, ns_per_unit = read_credentials(
                request.path, request.headers, self.settings.allowed_origins
            )
            self._check_room()
            if blocked_s and not limiter.may_check(source, now):
                raise _blocked(blocked_s)
            credential = await self.registry.credential(hash_token(token))
            if credential is None:
                raise HandshakeRefused(HTTPStatus.UNAUTHORIZED, "invalid or missing token")
            self._check_room()  # again: others may have been let in, or a drain begun, meanwhile
            # Last: a claim rings the hub holding the device, which closes it.
            claim = await self.ownership.claim(
                connection, credential.device_id, _address(connection)
            )
        except HandshakeRefused as refused:
            refusal = refused
            if refusal.status == HTTPStatus.UNAUTHORIZED and blocked_s:
                refusal = _blocked(blocked_s)  # a wrong guess looks like any other while blocked
            elif refusal.status == HTTPStatus.UNAUTHORIZED:
                self._handshake_failed(source, now)
            if refusal.status == HTTPStatus.TOO_MANY_REQUESTS:
                limiter.refused_while_blocked()
            self.metrics.handshakes_refused.labels(refusal_reason(refusal.status)).inc()
            response = connection.respond(refusal.status, refusal.message + "\n")
            if refusal.retry_after is not None:
                response.headers["Retry-After"] = str(math.ceil(refusal.retry_after))
            return response
        self.slots.admit(
            connection,
            Handshake(
                credential.device_id,
                ns_per_unit,
                credential.token_hash,
                credential.expires_at,
                claim.epoch,
            ),
        )
        return None

    def _check_room(self) -> None:
        if self.draining or len(self.slots) >= self.settings.max_connections:
            raise HandshakeRefused(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "the hub is not accepting connections now",
                retry_after=RETRY_AFTER_S,
            )

    def _handshake_failed(self, source: str, now: float) -> None:
        limiter = self.failed_handshakes
        if limiter.failed(source, now):
            self.stranger_log.line(
                logging.WARNING,
                "handshakes from %s refused for %g s: more failed handshakes (bad or missing "
                "token) than %d at once or %g a minute",
                source,
                limiter.block_s,
                limiter.burst,
                self.settings.auth_failures_per_min,
            )
        else:
            self.stranger_log.line(
                logging.INFO, "handshake from %s refused: invalid or missing token", source
            )

    async def _session(self, connection: ServerConnection) -> None:
        handshake = self.slots.get(connection)
        if handshake is None:  # lost before its handler ran: nothing to serve
            return
        device_id = handshake.device_id
        self.ownership.started(connection)
        configs = self.ownership.configs(handshake.epoch)
        ports = SessionPorts(self.pipeline, configs, self.presence, self, self.metrics, drain=self)
        session = DeviceSession(connection, handshake, ports, self.session_limits)
        if not self.ownership.hold(session, configs):
            return  # a connection of a newer claim holds the device: this one closes, 4000
        remote = _address(connection)
        self.presence.connected(device_id, remote, handshake.epoch)
        self.metrics.connections_opened.inc()
        log.info("device %s connected from %s", device_id, remote, extra=device_extra(device_id))
        try:
            device = await self.registry.device(device_id)
            if device is None or not device.active:
                # Revoked between the handshake and now: the watcher could not see us yet.
                await session.revoke()
            elif not await self.rotation.token_works(connection, device_id, handshake.token_hash):
                await session.revoke(ROTATED_OUT_REASON)
            else:
                await session.run()
        finally:
            self.rotation.forget(connection)
            reason = _close_reason(connection)
            if self.ownership.release(session):  # its presence row released by epoch
                self.presence.disconnected(device_id, reason)
            log.info(
                "device %s disconnected (%s)", device_id, reason, extra=device_extra(device_id)
            )

    async def _keep_presence(self) -> None:
        while True:
            await asyncio.sleep(self.settings.presence_flush_s)
            await self._record_presence()

    async def _record_presence(self) -> None:
        try:
            await self.presence.flush()
            events = self.presence.take_events()
            if events:
                # Formatted with format_point's default, the strict dialect.
                await self.pipeline.submit("\n".join(events), len(events), Dialect.STRICT)
        except Exception:  # presence must never stop the hub
            log.exception("recording presence failed")

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(_quietly(work))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _blocked(blocked_s: float) -> HandshakeRefused:
    return HandshakeRefused(
        HTTPStatus.TOO_MANY_REQUESTS,
        "too many failed handshakes from this address; retry later",
        retry_after=blocked_s,
    )


async def _quietly(work: Coroutine[Any, Any, None]) -> None:
    with contextlib.suppress(ConnectionClosed):
        await work


def _redacting_logger(name: str) -> logging.Logger:
    """The logger `name`, masking tokens in its records whatever handlers are installed.

    websockets logs request lines and headers (query token, Authorization) at DEBUG; the
    handler filter of `configure_logging` is not there when the hub runs embedded.
    """
    logger = logging.getLogger(name)
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
        logger.addFilter(RedactingFilter())
    return logger


def _address(connection: ServerConnection) -> str:
    peer = peer_of(connection)
    return f"{peer[0]}:{peer[1]}" if peer is not None else "an unknown address"


def _close_reason(connection: ServerConnection) -> str:
    code = connection.close_code
    reason = connection.close_reason
    if code is None:
        return "connection lost"
    try:
        name = CloseCode(code).name.lower().replace("_", " ")
    except ValueError:
        name = {1000: "normal closure", 1006: "connection lost", 1011: "ping timeout or error"}.get(
            code, "closed"
        )
    return f"{code} {name}" + (f": {reason}" if reason else "")
