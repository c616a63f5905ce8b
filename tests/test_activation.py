"""Socket activation (hub/gateway/activation.py): the sd_listen_fds rules, and `hub serve` taking
over a socket that systemd's own `systemd-socket-activate` passes it, as hub.socket does.

The restart through a real systemd is in tests/test_systemd_real.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer, create_database, free_port, start_influxdb
from hub.errors import ConfigError
from hub.gateway.activation import (
    DEVICES_FD_NAME,
    PassedFd,
    choose_device_fd,
    passed_fds,
    take_device_socket,
)
from tests.nspawn import ensure_host_tools
from tests.support import HubProcess, add_device, hub_settings

PID = 4242
COOL = [{"name": "environment", "time": 1_700_000_000_000, "fields": {"temperature": 20.0}}]
WAIT_S = 30.0

# --- The protocol, pure -----------------------------------------------------------------------


@pytest.mark.unit
def test_no_variables_means_no_sockets() -> None:
    """Not socket-activated: nothing passed, the hub binds its own port."""
    assert passed_fds({}, PID) == []


@pytest.mark.unit
def test_variables_meant_for_another_process_are_ignored() -> None:
    """LISTEN_PID of another process (inherited variables): nothing passed."""
    assert passed_fds({"LISTEN_PID": "1", "LISTEN_FDS": "1"}, PID) == []


@pytest.mark.unit
def test_descriptors_start_at_3_with_their_names() -> None:
    """LISTEN_FDS descriptors from 3, named by LISTEN_FDNAMES in order."""
    environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "devices:other"}
    assert passed_fds(environ, PID) == [PassedFd(3, "devices"), PassedFd(4, "other")]


@pytest.mark.unit
def test_descriptors_without_names_are_unknown() -> None:
    """Without LISTEN_FDNAMES each descriptor is `unknown`, as sd_listen_fds_with_names says."""
    environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": "1"}
    assert passed_fds(environ, PID) == [PassedFd(3, "unknown")]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, "not numbers"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": ""}, "not numbers"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "-1"}, "negative"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "devices"}, "names 1"),
    ],
)
def test_malformed_variables_are_a_clear_error(environ: dict[str, str], says: str) -> None:
    """Malformed LISTEN_* values: a ConfigError that says what is wrong."""
    with pytest.raises(ConfigError, match=says):
        passed_fds(environ, PID)


@pytest.mark.unit
def test_the_device_socket_is_the_one_named_devices() -> None:
    """Among several sockets, the one named `devices`."""
    fds = [PassedFd(3, "health"), PassedFd(4, DEVICES_FD_NAME)]
    assert choose_device_fd(fds) == PassedFd(4, DEVICES_FD_NAME)


@pytest.mark.unit
def test_a_single_socket_is_the_device_socket_whatever_its_name() -> None:
    """One socket, named or not: the device port."""
    assert choose_device_fd([PassedFd(3, "hub.socket")]) == PassedFd(3, "hub.socket")
    assert choose_device_fd([]) is None


@pytest.mark.unit
def test_several_sockets_none_named_devices_is_an_error() -> None:
    """Several sockets and none named `devices`: which one is meant is unclear."""
    with pytest.raises(ConfigError, match="FileDescriptorName=devices"):
        choose_device_fd([PassedFd(3, "a"), PassedFd(4, "b")])


@pytest.mark.unit
def test_taking_removes_the_variables() -> None:
    """The LISTEN_* variables are gone once read, so no child takes them for its own."""
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "devices", "KEEP": "1"}
    assert take_device_socket(environ) is None
    assert environ == {"KEEP": "1"}


# --- hub serve on a passed socket -------------------------------------------------------------


@pytest.fixture
def socket_activate() -> str:
    """systemd's systemd-socket-activate (in the `systemd` package, installed when missing)."""
    ensure_host_tools()  # systemd-container depends on systemd
    found = shutil.which("systemd-socket-activate")
    assert found is not None, "systemd-socket-activate missing though systemd is installed"
    return found


@pytest.fixture
def frozen_influx(tmp_path: Path) -> Iterator[LocalServer]:
    """A private InfluxDB the test freezes (SIGSTOP) to hold the hub's drain open."""
    server = start_influxdb(tmp_path / "influxdb")
    create_database(server.url, "sensors")
    try:
        yield server
    finally:
        server.stop()  # continues a paused server first


def activated_hub(
    tool: str, state: Path, influx: LocalServer, bucket: str
) -> tuple[HubProcess, int]:
    """`hub serve` started by systemd-socket-activate on `hub.port`, and its own --port:
    another free port, which it must not bind."""
    hub = HubProcess(state, influx, bucket)
    own_port = free_port()
    argv = list(hub.argv)
    argv[argv.index("--port") + 1] = str(own_port)
    hub.argv = [tool, "-l", f"127.0.0.1:{hub.port}", f"--fdname={DEVICES_FD_NAME}", *argv]
    return hub, own_port


@pytest.mark.e2e
async def test_hub_serves_devices_on_the_socket_it_is_passed(
    socket_activate: str, tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Socket-activated, the hub serves on the passed socket and binds nothing of its own
    on the device side; a device is acked there."""
    state = tmp_path / "state"
    token = add_device(hub_settings(state, None), "sensor-1")
    hub, own_port = activated_hub(socket_activate, state, influxdb, influx_db_name)
    async with hub:
        async with DeviceClient(hub.url, token) as client:
            assert (await asyncio.wait_for(client.store(COOL), WAIT_S)).accepted == 1
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", own_port), timeout=2).close()
        assert "the socket systemd passed" in hub.log
        assert await hub.stop() == 0


class HeldSocketHub(HubProcess):
    """`hub serve` passed a listening socket (fd 3, LISTEN_*) that the test keeps open too,
    as systemd does for hub.socket: closing the hub's copy leaves the socket listening."""

    def __init__(self, state: Path, influx: LocalServer, listener: socket.socket) -> None:
        super().__init__(state, influx, "sensors")
        self.listener = listener
        self.port = listener.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}"
        self.argv[self.argv.index("--port") + 1] = str(free_port())

    def launch(self) -> None:
        """Start the hub with the socket as fd 3 and LISTEN_PID its own pid (sh execs it)."""
        env = {
            **os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": DEVICES_FD_NAME,
            "HUB_WRITE_DEADLINE_S": "8",
        }  # fmt: skip
        fd = self.listener.fileno()
        with self.log_path.open("ab") as output:
            self.process = subprocess.Popen(
                ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *self.argv],
                stdout=output, stderr=subprocess.STDOUT, env=env, pass_fds=(3,),
                preexec_fn=lambda: os.dup2(fd, 3),
            )  # fmt: skip


@pytest.mark.e2e
async def test_a_draining_hub_leaves_new_devices_in_the_backlog(
    tmp_path: Path, frozen_influx: LocalServer
) -> None:
    """While an activated hub drains (InfluxDB frozen: the last write waits for its
    deadline), a device that connects gets no 503: it waits in the backlog that systemd
    keeps for the next hub. (A hub on its own socket answers 503 then.)"""
    state = tmp_path / "state"
    first = add_device(hub_settings(state, None), "sensor-1")
    second = add_device(hub_settings(state, None), "sensor-2")
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    hub = HeldSocketHub(state, frozen_influx, listener)
    async with hub:
        async with DeviceClient(hub.url, first) as client:
            assert (await asyncio.wait_for(client.store(COOL), WAIT_S)).accepted == 1
            frozen_influx.pause()
            pending = await client.send_readings(COOL)
            hub.signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT_S
            while "stopping: refusing new connections" not in hub.log:
                assert loop.time() < deadline, hub.log
                await asyncio.sleep(0.02)
            late = DeviceClient(hub.url, second)
            try:
                await asyncio.wait_for(late.connect(open_timeout=WAIT_S), 2.0)
            except TimeoutError:
                pass  # waiting in the backlog: what should happen
            except InvalidStatus as exc:
                raise AssertionError(
                    f"a draining hub answered {exc.response.status_code}"
                ) from None
            else:
                raise AssertionError("a draining hub let a new device in")
            assert hub.process is not None and hub.process.poll() is None, (
                "the drain ended before the check: inconclusive\n" + hub.log
            )
            frozen_influx.resume()
            assert (await asyncio.wait_for(pending, WAIT_S)).accepted == 1
        assert await hub.stop() == 0
        listener.close()
