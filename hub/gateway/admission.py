"""Who holds a connection: slots of admitted devices, and bounds on clients not yet let in.

Two things are counted here and nowhere else.

* **Slots.** A handshake `process_request` admits holds a slot from that moment until its
  TCP connection is lost, whatever happens in between: the upgrade fails, the client leaves
  before the handler runs, the session ends cleanly, with an error, a reset or a timeout.
  The slot is released by the connection's own connection-lost future, which websockets
  resolves exactly once for every connection, so a slot can neither leak nor be freed
  twice. `max_connections`, `/healthz` and `hub_connections` all read this one count.
* **Unauthenticated connections.** From the TCP accept until the request headers are in,
  a client is a stranger: at most `max_unauthenticated_per_source` of them per source
  address (IPv6: per /64; and never more than a quarter of the open-file limit), each with
  `request_header_timeout_s` from its first byte to the end of its headers, and at most
  `max_request_header_bytes` of them. The deadline is not enforced while the event loop is
  behind (a connect storm), since the rest of the request may be waiting unread in the
  socket; websockets' `handshake_timeout_s` remains the hard bound for every connection.
  websockets' own header limits are per line (8 KiB) and per count (128), which let one
  socket pin a megabyte.

Log lines about strangers go through `StrangerLog`: a few a second at most, the rest
counted, so that nobody without a token can flood the journal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode

from hub.core.handshake import Handshake
from hub.core.proxyheader import ProxyHeaderError, TrustedProxies, read_proxy_header
from hub.core.ratelimit import TokenBucket, source_key
from hub.gateway.drain import DrainPace

LOOP_LAG_TOLERANCE_S = 0.1
"""A header deadline firing later than this finds the event loop behind (a connect storm):
the request may be sitting unread in the socket, so the deadline is re-armed, not enforced.
websockets' own `handshake_timeout_s` stays the hard bound."""
LAG_RECHECK_S = 0.1
STRANGER_LINES_PER_S = 5.0
STRANGER_LINES_BURST = 20.0
UNKNOWN_SOURCE = "unknown"
_HEADERS_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Connection: close\r\nContent-Length: 0\r\n\r\n"
)


class ConnectionSlots:
    """Admitted connections and what their handshake established; see the module docstring."""

    def __init__(self) -> None:
        self._held: dict[ServerConnection, Handshake] = {}

    def __len__(self) -> int:
        return len(self._held)

    def admit(self, connection: ServerConnection, handshake: Handshake) -> None:
        """Hold a slot for `connection` until its TCP connection is lost."""
        self._held[connection] = handshake
        # Called once, also when the connection is already lost (then at the next loop turn).
        connection.connection_lost_waiter.add_done_callback(
            lambda _: self._held.pop(connection, None)
        )

    def get(self, connection: ServerConnection) -> Handshake | None:
        """The handshake of a connection holding a slot, or None."""
        return self._held.get(connection)


@dataclass
class StrangerCounts:
    """What unauthenticated clients did since start (exported as metrics)."""

    over_source_cap: int = 0
    header_timeouts: int = 0
    headers_too_large: int = 0
    handshake_errors: int = 0
    proxy_header_errors: int = 0
    log_lines_suppressed: int = 0


class StrangerLog:
    """Log lines about unauthenticated clients, at most a few a second; the rest counted.

    The first line after a suppressed stretch says how many were left out.
    """

    def __init__(
        self,
        logger: logging.Logger,
        counts: StrangerCounts,
        clock: Callable[[], float],
        rate: float = STRANGER_LINES_PER_S,
        burst: float = STRANGER_LINES_BURST,
    ) -> None:
        self._log = logger
        self._counts = counts
        self._clock = clock
        self._budget = TokenBucket(rate, burst, updated=clock())
        self._suppressed_since_last = 0

    def line(self, level: int, message: str, *args: object) -> bool:
        """Log `message % args` at `level` if the budget allows; True if it was logged."""
        if not self._budget.take(1, self._clock()):
            self._counts.log_lines_suppressed += 1
            self._suppressed_since_last += 1
            return False
        if self._suppressed_since_last:
            message += " (%d earlier lines about unauthenticated clients suppressed)"
            args = (*args, self._suppressed_since_last)
            self._suppressed_since_last = 0
        self._log.log(level, message, *args)
        return True


@dataclass
class StrangerLimits:
    """Unauthenticated connections per source: the pure bookkeeping of `StrangerGuard`."""

    per_source: int
    _open: dict[str, int] = field(default_factory=dict)

    def enter(self, source: str) -> bool:
        """Count one more unauthenticated connection from `source`; False if over the cap."""
        held = self._open.get(source, 0)
        if held >= self.per_source:
            return False
        self._open[source] = held + 1
        return True

    def leave(self, source: str) -> None:
        """One unauthenticated connection from `source` authenticated or went away."""
        held = self._open.get(source, 0) - 1
        if held > 0:
            self._open[source] = held
        else:
            self._open.pop(source, None)

    def open_from(self, source: str) -> int:
        """Unauthenticated connections from `source` now."""
        return self._open.get(source, 0)

    def __len__(self) -> int:
        return sum(self._open.values())


class StrangerGuard:
    """The limits on connections that have not sent their request headers yet."""

    def __init__(
        self,
        per_source: int,
        header_timeout_s: float,
        max_header_bytes: int,
        log: StrangerLog,
        counts: StrangerCounts,
        trusted_proxies: TrustedProxies | None = None,
    ) -> None:
        self.limits = StrangerLimits(per_source)
        self.trusted_proxies = trusted_proxies or TrustedProxies(())
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self.log = log
        self.counts = counts
        self.waiting: set[ServerConnection] = set()
        self.opening: set[ServerConnection] = set()
        """Connections accepted whose handshake is not over (headers unread, or being
        answered): a stop on a socket another process takes over lets them finish first."""

    def fit_to(self, open_files: int) -> None:
        """Keep one source below a quarter of the process's descriptors, whatever the
        setting says: the cap exists so that one address cannot take them all."""
        fitted = max(16, open_files // 4)
        if fitted < self.limits.per_source:
            self.limits.per_source = fitted

    def abort_waiting(self) -> None:
        """Drop every connection still waiting for its headers (the hub is stopping)."""
        for connection in list(self.waiting):
            connection.transport.abort()


def guarded_connection(
    guard: StrangerGuard, drain_pace: Callable[[], DrainPace | None] = lambda: None
) -> type[ServerConnection]:
    """A `ServerConnection` class (for `serve(create_connection=...)`) enforcing `guard`;
    while the hub drains (`drain_pace` gives its pace), each 1001 waits for its turn."""

    class GuardedConnection(ServerConnection):
        """Counts itself as unauthenticated until its request is in; knows its peer."""

        # Slots, not attributes in the instance's __dict__: websockets' connection has so
        # many already that these made its __dict__ a plain one, 1.5 KiB an idle connection.
        __slots__ = (
            "_deadline",
            "_due",
            "_header_bytes",
            "_ignore_input",
            "_proxy_header",
            "_waiting",
            "peer",
            "source",
        )

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.peer: tuple[str, int] | None = None
            self.source = UNKNOWN_SOURCE
            self._waiting = False
            self._header_bytes = 0
            self._deadline: asyncio.TimerHandle | None = None
            self._due = 0.0
            self._ignore_input = False
            # What a balancer's PROXY header has sent so far; None once read (or no balancer).
            self._proxy_header: bytes | None = None
            super().__init__(*args, **kwargs)

        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            try:
                await super().handshake(*args, **kwargs)
            finally:
                guard.opening.discard(self)
            # websockets keeps the request and response for the connection's lifetime; their
            # headers (~3 KiB an idle connection) are read only during the handshake.
            for message in (self.request, self.response):
                if message is not None:
                    message.headers.clear()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            guard.opening.add(self)
            # Read now: under uvloop, asking a reset transport later raises.
            self.peer = _peer_of(transport)
            if self.peer and self.peer[0] in guard.trusted_proxies:
                # A balancer: the client it names in its PROXY header is charged, once read.
                self._proxy_header = b""
                guard.waiting.add(self)
                self._arm(guard.header_timeout_s)  # a balancer sends its header at once
                return
            self._enter(self.peer)

        def _enter(self, peer: tuple[str, int] | None) -> bool:
            """Charge the connection to `peer`'s source; False (and dropped) if over the cap."""
            self.source = source_key(peer[0]) if peer else UNKNOWN_SOURCE
            if not guard.limits.enter(self.source):
                guard.waiting.discard(self)
                guard.counts.over_source_cap += 1
                guard.log.line(
                    logging.WARNING,
                    "connection from %s dropped: %d unauthenticated connections from it "
                    "already (max_unauthenticated_per_source)",
                    self.source,
                    guard.limits.per_source,
                )
                self.transport.abort()
                return False
            self._waiting = True
            guard.waiting.add(self)
            return True

        def data_received(self, data: bytes) -> None:
            if self._proxy_header is not None:
                data = self._read_proxy_header(data)
                if not data:
                    return
            if self._waiting:
                if self._deadline is None:
                    # From the first byte: a client that has not started yet (its own loop
                    # busy in a connect storm) is not slow, and one sending nothing at all
                    # is bounded by the per-source cap and handshake_timeout_s.
                    self._arm(guard.header_timeout_s)
                self._header_bytes += len(data)
                if self._header_bytes > guard.max_header_bytes:
                    self._stop_waiting()
                    guard.counts.headers_too_large += 1
                    guard.log.line(
                        logging.INFO,
                        "connection from %s dropped: request headers over %d bytes",
                        self.source,
                        guard.max_header_bytes,
                    )
                    self.transport.write(_HEADERS_TOO_LARGE)
                    self.transport.close()
                    self._ignore_input = True
                    return
            if self._ignore_input:
                return
            super().data_received(data)

        def _read_proxy_header(self, data: bytes) -> bytes:
            """Take the balancer's PROXY header off the front of the stream; what follows
            it, once it is complete (b"" until then, or when the connection is dropped)."""
            buffer = (self._proxy_header or b"") + data
            try:
                header = read_proxy_header(buffer)
            except ProxyHeaderError as exc:
                self._proxy_header = None
                guard.waiting.discard(self)
                self._cancel_deadline()
                guard.counts.proxy_header_errors += 1
                guard.log.line(
                    logging.WARNING,
                    "connection from balancer %s dropped: %s (proxy_protocol_from)",
                    self.peer[0] if self.peer else UNKNOWN_SOURCE,
                    exc,
                )
                self.transport.abort()
                self._ignore_input = True
                return b""
            if header is None:
                self._proxy_header = buffer
                return b""
            self._proxy_header = None
            self._cancel_deadline()  # re-armed for the request headers from their first byte
            if header.client is not None:
                self.peer = header.client
            if not self._enter(self.peer):
                self._ignore_input = True
                return b""
            return buffer[header.length :]

        async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
            pace = drain_pace()
            if pace is not None and code == CloseCode.GOING_AWAY:  # hub.gateway.drain
                await pace.turn(self)
            await super().close(code, reason)

        def process_event(self, event: Any) -> None:
            if self.request is None:
                self._stop_waiting()  # the request is in: the handshake checks take over
            super().process_event(event)

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            guard.opening.discard(self)
            super().connection_lost(exc)

        def _arm(self, delay_s: float) -> None:
            self._due = self.loop.time() + delay_s
            self._deadline = self.loop.call_later(delay_s, self._headers_late)

        def _headers_late(self) -> None:
            self._deadline = None
            if not self._waiting and self._proxy_header is None:
                return
            if self.loop.time() - self._due > LOOP_LAG_TOLERANCE_S:
                self._arm(LAG_RECHECK_S)  # the loop is behind: let it read the socket first
                return
            self._stop_waiting()
            guard.counts.header_timeouts += 1
            guard.log.line(
                logging.INFO,
                "connection from %s dropped: no request headers within %g s",
                self.source,
                guard.header_timeout_s,
            )
            self.transport.abort()

        def _stop_waiting(self) -> None:
            if self._proxy_header is not None:  # lost before the balancer's header was in
                self._proxy_header = None
                guard.waiting.discard(self)
                self._cancel_deadline()
            if not self._waiting:
                return
            self._waiting = False
            guard.waiting.discard(self)
            guard.limits.leave(self.source)
            self._cancel_deadline()

        def _cancel_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

    return GuardedConnection


def _peer_of(transport: asyncio.BaseTransport) -> tuple[str, int] | None:
    try:
        peer = transport.get_extra_info("peername")
    except OSError:  # uvloop, when the client already reset the connection
        return None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return None


def peer_of(connection: ServerConnection) -> tuple[str, int] | None:
    """The client's (host, port) as read at accept time, or None if unknown."""
    peer = getattr(connection, "peer", None)
    return peer if isinstance(peer, tuple) else None


def address_of(connection: ServerConnection) -> str:
    """The client's `host:port` for logs and presence."""
    peer = peer_of(connection)
    return f"{peer[0]}:{peer[1]}" if peer is not None else "an unknown address"


def source_of(connection: ServerConnection) -> str:
    """Whom a handshake is charged to (see `source_key`), or "unknown"."""
    source = getattr(connection, "source", None)
    return source if isinstance(source, str) else UNKNOWN_SOURCE
