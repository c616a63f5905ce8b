"""The test suite's HAProxy launcher: it forwards WebSockets to real backends, stops by pid."""

from __future__ import annotations

import asyncio
import http
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from device_sim.local_servers import ServerError
from device_sim.servers.haproxy import ConfigFor, HAProxyServer, websocket_config
from device_sim.servers.processes import process_tree

pytestmark = pytest.mark.integration

WAIT_S = 20.0
HEALTH_PATH = "/healthz"


@dataclass
class Backend:
    """A WebSocket echo server that remembers the handshakes it saw."""

    name: str
    server: Server | None = None
    forwarded_for: list[str | None] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def echo(self, ws: ServerConnection) -> None:
        self.forwarded_for.append(ws.request.headers.get("X-Forwarded-For") if ws.request else None)
        async for message in ws:
            data = message.encode() if isinstance(message, str) else message
            await ws.send(f"{self.name}:".encode() + data)

    def health(self, ws: ServerConnection, request: Request) -> Response | None:
        if request.path == HEALTH_PATH:
            return ws.respond(http.HTTPStatus.OK, "ok\n")
        return None


@asynccontextmanager
async def backends(*names: str) -> AsyncIterator[list[Backend]]:
    """Echo backends on free loopback ports, closed on exit."""
    started = [Backend(name) for name in names]
    try:
        for backend in started:
            backend.server = await serve(
                backend.echo, "127.0.0.1", 0, process_request=backend.health
            )
        yield started
    finally:
        for backend in started:
            if backend.server is not None:
                backend.server.close()
                await backend.server.wait_closed()


def config_for(found: list[Backend], health_path: str = "") -> ConfigFor:
    """HAProxy's WebSocket config in front of `found`."""
    return lambda port: websocket_config(port, [("127.0.0.1", b.port) for b in found], health_path)


async def round_trip(url: str, payload: bytes) -> bytes:
    """Open a WebSocket through `url`, send one binary message, return the answer."""
    async with connect(url + "/devices", open_timeout=WAIT_S) as ws:
        await ws.send(payload)
        answer = await asyncio.wait_for(ws.recv(), WAIT_S)
    assert isinstance(answer, bytes)
    return answer


async def test_a_websocket_goes_through_to_the_backend_with_the_device_address(
    haproxy: Callable[[ConfigFor], HAProxyServer],
) -> None:
    """A binary message crosses HAProxy both ways; the backend sees X-Forwarded-For."""
    async with backends("only") as (backend,):
        proxy = haproxy(config_for([backend]))
        assert await round_trip(proxy.url, b"\x81\xa1t\x01") == b"only:\x81\xa1t\x01"
        assert backend.forwarded_for == ["127.0.0.1"]
        assert proxy.port != backend.port


async def test_connections_are_spread_round_robin_and_health_checked(
    haproxy: Callable[[ConfigFor], HAProxyServer],
) -> None:
    """With /healthz checks on, connections alternate over the backends that answer."""
    async with backends("a", "b") as found:
        proxy = haproxy(config_for(found, HEALTH_PATH))
        answers = [await round_trip(proxy.url, b"x") for _ in range(4)]
        assert sorted(answers) == [b"a:x", b"a:x", b"b:x", b"b:x"]
        assert "option httpchk GET /healthz" in proxy.config_path.read_text()


async def test_stop_ends_haproxy_by_its_pid_and_a_bad_config_is_reported(
    haproxy: Callable[[ConfigFor], HAProxyServer],
) -> None:
    """stop() ends the process it started; a config HAProxy rejects fails with its message."""
    async with backends("only") as (backend,):
        proxy = haproxy(config_for([backend]))
        pid = proxy.pid
        assert process_tree(pid)
        proxy.stop()
        assert not proxy.running and process_tree(pid) == {}
        with pytest.raises(OSError):
            await round_trip(proxy.url, b"x")
    with pytest.raises(ServerError, match="haproxy rejects"):
        haproxy(lambda port: f"frontend broken\n    bind 127.0.0.1:{port}\n    no_such_keyword\n")
