"""sd_notify: a real `hub serve` tells a notify socket the test binds when it is ready,
reloading and stopping, and keeps the watchdog fed at the interval WATCHDOG_USEC asks for."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from device_sim.local_servers import LocalServer
from hub.ops.runtime import event_loop_name
from hub.ops.sdnotify import Notifier, watchdog_interval
from tests.support import HubProcess

WAIT_S = 30.0


class NotifySocket:
    """The service manager's end: a Unix datagram socket that collects notifications."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.received: list[dict[str, str]] = []
        self.sender_log: Callable[[], str] = str
        """What the sender printed, shown when a wait fails."""

    async def next(self) -> dict[str, str]:
        """The next notification as a dict of its assignments (bounded wait)."""
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), WAIT_S)
        except TimeoutError:
            raise AssertionError(
                f"no notification in {WAIT_S:g} s after {self.received}:\n{self.sender_log()}"
            ) from None
        message = dict(line.split("=", 1) for line in data.decode().split("\n"))
        self.received.append(message)
        return message

    async def until(self, key: str) -> dict[str, str]:
        """Read notifications until one sets `key`; return it."""
        while key not in (message := await self.next()):
            pass
        return message

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    """A notify socket at a file-system path."""
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


@pytest.fixture
def abstract_notify_socket() -> Iterator[NotifySocket]:
    """A notify socket in the abstract namespace (`@name`)."""
    listener = NotifySocket(f"@sensor-hub-test-{uuid.uuid4().hex}")
    yield listener
    listener.close()


def hub_process(
    tmp_path: Path, influxdb: LocalServer, db: str, notify: NotifySocket, watchdog_usec: int
) -> HubProcess:
    """A `hub serve` process that notifies `notify`, with the given watchdog period."""
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": str(watchdog_usec)}
    hub = HubProcess(tmp_path / "state", influxdb, db, env=env)
    notify.sender_log = lambda: hub.log
    return hub


@contextlib.asynccontextmanager
async def launched(hub: HubProcess) -> AsyncIterator[None]:
    """The hub process launched without waiting for its port; stopped on the way out."""
    hub.launch()
    try:
        yield
    finally:
        await hub.stop()


async def accepts(port: int) -> bool:
    """Whether 127.0.0.1:port accepts a TCP connection right now."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


# --- A real `hub serve` ------------------------------------------------------------------------


@pytest.mark.e2e
async def test_ready_comes_only_once_the_device_port_accepts(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str, notify_socket: NotifySocket
) -> None:
    """READY=1 is the first notification, and when it arrives the device port accepts."""
    hub = hub_process(tmp_path, influxdb, influx_db_name, notify_socket, 60_000_000)
    async with launched(hub):
        first = await notify_socket.next()
        assert first.get("READY") == "1", hub.log
        assert await accepts(hub.port), hub.log
        assert first["STATUS"] == f"listening on 127.0.0.1:{hub.port}"
        # `hub serve` runs on uvloop (a dependency here), as run_event_loop chose.
        assert event_loop_name() == "uvloop"
        assert "on uvloop's event loop" in hub.log, hub.log


@pytest.mark.e2e
async def test_watchdog_is_fed_at_half_of_watchdog_usec(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str, notify_socket: NotifySocket
) -> None:
    """With WATCHDOG_USEC=0.2 s, WATCHDOG=1 keeps coming after READY=1."""
    hub = hub_process(tmp_path, influxdb, influx_db_name, notify_socket, 200_000)
    async with launched(hub):
        await notify_socket.until("READY")
        for _ in range(5):
            assert (await notify_socket.next()).get("WATCHDOG") == "1"


@pytest.mark.e2e
async def test_watchdog_waits_for_a_long_watchdog_usec(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str, notify_socket: NotifySocket
) -> None:
    """With WATCHDOG_USEC of an hour, one WATCHDOG=1 at start is all a short run sends."""
    hub = hub_process(tmp_path, influxdb, influx_db_name, notify_socket, 3600_000_000)
    async with launched(hub):
        await notify_socket.until("READY")
        hub.signal(signal.SIGTERM)
        await notify_socket.until("STOPPING")
        assert await hub.stop() == 0
    watchdogs = [m for m in notify_socket.received if "WATCHDOG" in m]
    assert watchdogs == [{"WATCHDOG": "1"}]


@pytest.mark.e2e
async def test_stopping_is_sent_on_sigterm(
    tmp_path: Path,
    influxdb: LocalServer,
    influx_db_name: str,
    abstract_notify_socket: NotifySocket,
) -> None:
    """SIGTERM brings STOPPING=1 (to an abstract-namespace socket), then a clean exit."""
    hub = hub_process(tmp_path, influxdb, influx_db_name, abstract_notify_socket, 60_000_000)
    async with launched(hub):
        await abstract_notify_socket.until("READY")
        hub.signal(signal.SIGTERM)
        assert (await abstract_notify_socket.until("STOPPING"))["STOPPING"] == "1"
        assert await hub.stop() == 0


@pytest.mark.e2e
async def test_sighup_is_reported_as_reloading_then_ready(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str, notify_socket: NotifySocket
) -> None:
    """SIGHUP brings RELOADING=1 with MONOTONIC_USEC, then READY=1 again."""
    hub = hub_process(tmp_path, influxdb, influx_db_name, notify_socket, 60_000_000)
    async with launched(hub):
        await notify_socket.until("READY")
        hub.signal(signal.SIGHUP)
        reloading = await notify_socket.until("RELOADING")
        assert reloading["RELOADING"] == "1"
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert (await notify_socket.until("READY"))["READY"] == "1"


# --- The pieces ------------------------------------------------------------------------------


@pytest.mark.unit
def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    """WATCHDOG_USEC=30 s means a heartbeat every 15 s."""
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=42) == 15.0


@pytest.mark.unit
def test_watchdog_interval_ignores_another_process_watchdog() -> None:
    """A WATCHDOG_PID naming another process means no heartbeat from this one."""
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "41"}, pid=42) is None


@pytest.mark.unit
def test_watchdog_interval_is_none_without_watchdog_usec() -> None:
    """No WATCHDOG_USEC, no heartbeat."""
    assert watchdog_interval({}, pid=42) is None


@pytest.mark.unit
def test_notifier_without_notify_socket_sends_nothing() -> None:
    """Outside systemd a notification is a no-op that says it reached nobody."""
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    assert notifier.watchdog_s is None


@pytest.mark.integration
async def test_notifier_sends_one_datagram_per_notification(notify_socket: NotifySocket) -> None:
    """The assignments of one notification arrive together, one per line."""
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.address})
    try:
        assert notifier.notify("READY=1", "STATUS=up")
        assert await notify_socket.next() == {"READY": "1", "STATUS": "up"}
    finally:
        notifier.close()
