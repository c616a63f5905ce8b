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
import time
from collections.abc import Coroutine
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from hub.core.dialects import Dialect
from hub.core.measurements import MeasurementSchemas, ReadingsValidator
from hub.core.proxyheader import TrustedProxies
from hub.core.ratelimit import FailedHandshakeLimiter
from hub.errors import RegistryUnavailable
from hub.gateway.activation import take_device_socket
from hub.gateway.admission import (
    ConnectionSlots,
    StrangerCounts,
    StrangerGuard,
    StrangerLog,
    address_of,
    guarded_connection,
)
from hub.gateway.drain import DrainPace
from hub.gateway.handshakes import HandshakeGate
from hub.gateway.ownership import Ownership
from hub.gateway.presence import PresenceTracker
from hub.gateway.registryhealth import RegistryHealth, WatchedRegistry
from hub.gateway.rotation import ROTATED_OUT_REASON, RotationWatch
from hub.gateway.session import DeviceSession
from hub.gateway.session_ports import SessionPorts
from hub.gateway.tls import tls_context
from hub.gateway.watcher import FleetWatcher
from hub.ingest.pipeline import Pipeline
from hub.ops.filelimit import raise_file_limit
from hub.ops.logs import RedactingFilter, device_extra
from hub.ops.metrics import HubMetrics
from hub.options import GatewayOptions
from hub.registry.ports import HubRegistry
from schemas.codes import CloseCode

log = logging.getLogger("hub.server")

LISTEN_BACKLOG = 4096
HANDOVER_GRACE_S = 1.0
"""How long a stop on a taken-over socket waits for handshakes under way to finish."""
HANDOVER_POLL_S = 0.02
STOP_GRACE_S = 0.5
"""After the deadline: how long the handlers of dropped connections get to finish."""


class Hub:
    """Accepts device connections and feeds their readings to the pipeline."""

    def __init__(
        self,
        options: GatewayOptions,
        registry: HubRegistry,
        schemas: MeasurementSchemas,
        pipeline: Pipeline,
        metrics: HubMetrics,
        *,
        node_id: str,
        one_of_workers: bool = False,
        workers: int = 1,
    ) -> None:
        """`node_id`: this hub's (or worker's) in the fleet, named in its connection events;
        `workers`: how many processes share the device port (`hub serve --workers`)."""
        self.options = options
        # A worker of `hub serve --workers N` shares the device port with its siblings.
        self.one_of_workers = one_of_workers
        admission = options.admission
        # Every registry call's outcome is watched: an outage is logged once, shown by
        # /healthz, counted, and answered "not now" (503 to new devices) without tracebacks.
        self.registry_health = RegistryHealth()
        registry = WatchedRegistry(registry, self.registry_health, admission.registry_timeout_s)
        self.registry = registry
        self.schemas = schemas
        self.pipeline = pipeline
        self.metrics = metrics
        self.presence = PresenceTracker(registry, node_id)
        self.draining = False
        self._drain_pace: DrainPace | None = None
        self.slots = ConnectionSlots()
        self.rotation = RotationWatch(registry)
        self.stranger_counts = StrangerCounts()
        self.stranger_log = StrangerLog(log, self.stranger_counts, time.monotonic)
        self.strangers = StrangerGuard(
            admission.max_unauthenticated_per_source,
            admission.request_header_timeout_s,
            admission.max_request_header_bytes,
            self.stranger_log,
            self.stranger_counts,
            TrustedProxies(admission.proxy_protocol_from),
        )
        self._background: set[asyncio.Task[None]] = set()
        self.ownership = Ownership(
            registry, self.presence, self._spawn, lost=metrics.takeovers.labels("lost").inc
        )
        self._sessions = self.ownership.sessions
        poll_s = options.fleet.registry_poll_s
        self.watcher = FleetWatcher(
            registry, registry, self._sessions, self.rotation, poll_s, self._spawn
        )
        self._server: Server | None = None
        self._socket_from_systemd = False
        self._bound: Any = None  # (host, port, ...) of the device socket, once listening
        self._loops: list[asyncio.Task[None]] = []
        self._validators: dict[int, ReadingsValidator] = {}
        self.gate = HandshakeGate(
            admission, registry, self.ownership.claim, self.slots, self._full, metrics,
            self.stranger_log, self.stranger_counts, workers,
        )  # fmt: skip

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
        s = self.options.listen
        await self.presence.load(mark_all_offline=not self.one_of_workers)
        if (files := raise_file_limit(self.options.admission.max_connections)) is not None:
            self.strangers.fit_to(files.soft)
        listener = take_device_socket()  # hub.socket's, or None: bind host:port as always
        self._socket_from_systemd = listener is not None
        where: dict[str, Any] = (
            {"sock": listener}
            if listener is not None
            else {"host": s.host, "port": s.port, "reuse_port": self.one_of_workers or None}
        )
        self._server = await serve(
            self._session,
            **where,
            ssl=tls_context(s),
            # WebSocket; deflate is off unless asked for: memory per connection, and
            # compression next to secrets invites CRIME-style guessing
            compression="deflate" if s.compression else None,
            # HTTP
            process_request=self.gate.process_request,
            server_header=None,
            # Strangers: per-source cap, header deadline and size (hub.admission)
            create_connection=guarded_connection(self.strangers, lambda: self._drain_pace),
            # Timeouts
            open_timeout=s.handshake_timeout_s,
            ping_interval=s.ping_interval_s,
            ping_timeout=s.ping_timeout_s,
            close_timeout=5,
            # Limits (with deflate, max_size bounds the inflated message)
            max_size=self.options.session.max_message_bytes,
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

    def begin_drain(self, drain_s: float) -> None:
        """The drain begins: new devices are refused (or left in the backlog, see
        `stop_accepting`), and the devices held are closed with 1001 at `drain_rate`
        within `drain_s` (hub.gateway.drain) as their sessions end."""
        self.draining = True
        self._drain_pace = DrainPace(len(self.slots), self.options.drain.rate, drain_s)
        self.stop_accepting()

    def stop_accepting(self) -> None:
        """On systemd's socket, stop accepting as the drain begins: devices that connect
        during a restart then wait in the backlog (systemd keeps the socket open) for the
        next hub instead of getting 503; a worker's port, likewise, for its siblings to take.
        A socket of a hub's own stays open and answers 503."""
        if self._hands_over and self._server is not None:
            self._server.server.close()
            # websockets answers 503 to any handshake that succeeds once its listener is
            # closed; this one is closed only so that new devices wait in the backlog for the
            # next process: the handshakes under way are let in (then closed with 1001 with
            # the rest), so websockets is told the server still serves them.
            self._server.is_serving = lambda: True  # type: ignore[method-assign]

    async def acks_sent(self) -> None:
        """Wait until every session has answered every message it received."""
        await asyncio.gather(*(session.acks_sent() for session in list(self._sessions.values())))

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop listening, close every connection with 1001 (at `drain_rate` once
        `begin_drain` set the pace), record everyone offline; all within `timeout_s`
        (default `shutdown_timeout_s`), dropping what is still open then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (
            self.options.session.shutdown_timeout_s if timeout_s is None else timeout_s
        )
        if self._server is not None:
            if self._hands_over:
                await self._let_handshakes_finish(min(deadline, loop.time() + HANDOVER_GRACE_S))
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

    async def _let_handshakes_finish(self, until: float) -> None:
        """Before closing a socket another process takes over: the connections this one
        accepted but has not answered yet would be refused (503) or cut (headers unread) by
        the close, which a device takes as a failed connect; their handshakes finish first
        (let in, they are closed with 1001 with the rest), until `until` at the latest."""
        assert self._server is not None
        loop = asyncio.get_running_loop()
        while loop.time() < until:
            if not self.strangers.opening:
                return
            # Polled: websockets signals no handshake's end but to its own handler.
            await asyncio.sleep(HANDOVER_POLL_S)

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
        return self._server is not None and self._server.server.is_serving()

    @property
    def accepting(self) -> bool:
        """Whether new devices are let in: listening, not draining, below max_connections."""
        return self.listening and not self._full()

    def _full(self, pending: int = 0) -> bool:
        # Draining on a socket that outlives this process (systemd's, or the port the
        # workers share), the listener is closed at once and new devices wait in the backlog
        # for the next process; a handshake already under way is let in, not refused, and
        # closed with 1001 with everyone, which a device takes as "reconnect", not "refused".
        refusing = self.draining and not self._hands_over
        taken = len(self.slots) + pending  # `pending`: admitted, not yet in a slot
        return refusing or taken >= self.options.admission.max_connections

    @property
    def _hands_over(self) -> bool:
        """Whether another process takes over this one's listening socket."""
        return self._socket_from_systemd or self.one_of_workers

    @property
    def failed_handshakes(self) -> FailedHandshakeLimiter:
        """Failed handshakes per source, and the blocks they earned."""
        return self.gate.failed_handshakes

    def apply(self, options: GatewayOptions) -> None:
        """Use reloaded options from now on, on every open connection too."""
        previous, self.options = self.options, options
        self.gate.options = options.admission
        if options.readings != previous.readings:
            self._validators.clear()
        if options.session != previous.session:
            for session in self._sessions.values():
                session.apply_limits(options.session)

    def apply_schemas(self, schemas: MeasurementSchemas) -> None:
        """Validate readings against reloaded measurement schemas from now on."""
        self.schemas = schemas
        self._validators.clear()

    def validator(self, ns_per_unit: int) -> ReadingsValidator:
        """The readings validator for one precision, under the current schemas and limits."""
        found = self._validators.get(ns_per_unit)
        if found is None:
            limits = self.options.readings
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

    async def _session(self, connection: ServerConnection) -> None:
        handshake = self.slots.get(connection)
        if handshake is None:  # lost before its handler ran: nothing to serve
            return
        device_id = handshake.device_id
        self.ownership.started(connection)
        configs = self.ownership.configs(handshake.epoch)
        ports = SessionPorts(self.pipeline, configs, self.presence, self, self.metrics, drain=self)
        session = DeviceSession(connection, handshake, ports, self.options.session)
        if not self.ownership.hold(session, configs):
            return  # a connection of a newer claim holds the device: this one closes, 4000
        remote = address_of(connection)
        self.presence.connected(device_id, remote, handshake.epoch)
        self.metrics.connections_opened.inc()
        log.info("device %s connected from %s", device_id, remote, extra=device_extra(device_id))
        try:
            try:
                device = await self.registry.device(device_id)
                revoked = device is None or not device.active
                works = revoked or await self.rotation.token_works(
                    connection, device_id, handshake.token_hash
                )
            except RegistryUnavailable:  # admitted from memory: the registry checks it later
                revoked, works = False, True
            if revoked:
                # Revoked between the handshake and now: the watcher could not see us yet.
                await session.revoke()
            elif not works:
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
            await asyncio.sleep(self.options.fleet.presence_flush_s)
            await self._record_presence()

    async def _record_presence(self) -> None:
        # Unavailable: said once by the registry's health; the next flush writes it all.
        with contextlib.suppress(RegistryUnavailable):
            await self.presence.flush()
        try:
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
