"""A hub behind a real HAProxy that speaks the PROXY protocol (`proxy_protocol_from`).

Without it every device behind the balancer is the balancer's address: one guesser gets
everyone's handshakes blocked, and the per-source cap on unauthenticated connections is
shared by the whole fleet. With it the hub charges each device its own address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from device_sim.local_servers import HAPROXY, LocalServer, free_port
from device_sim.servers.haproxy import HAProxyServer, proxy_protocol_config
from sensorhub_client.connection import DeviceClient
from tests.attack_support import (
    READING,
    WAIT_S,
    AttackedHub,
    Devices,
    closed_within,
    hub_command,
    raw_socket,
    register,
    upgrade_request,
)
from tests.packages import ensure_haproxy

pytestmark = pytest.mark.e2e

GUESSER = "127.0.0.2"
NEIGHBOUR = "127.0.0.3"
UNKNOWN_TOKEN = "hubt_" + "C" * 43
PER_SOURCE = 8


@contextlib.asynccontextmanager
async def hub_behind_haproxy(
    tmp_path: Path,
    influx: LocalServer,
    bucket: str,
    haproxy: Callable[[Callable[[int], str]], HAProxyServer],
    version: int = 2,
) -> AsyncIterator[tuple[AttackedHub, HAProxyServer, Devices]]:
    """A `hub serve` trusting 127.0.0.1 (HAProxy's address toward it) for PROXY headers,
    and HAProxy in front of it; both stopped by pid."""
    state = tmp_path / "state"
    devices = register(state)
    env = {
        "HUB_PROXY_PROTOCOL_FROM": '["127.0.0.1"]',
        "HUB_MAX_UNAUTHENTICATED_PER_SOURCE": str(PER_SOURCE),
    }
    hub = AttackedHub(state, influx, bucket, env)
    await hub.start()
    try:
        backends = [("127.0.0.1", hub.port)]
        proxy = haproxy(lambda port: proxy_protocol_config(port, backends, version))
        yield hub, proxy, devices
    finally:
        if hub.process is not None and hub.process.poll() is None:
            await hub.kill()


def idle_through(proxy: HAProxyServer, source: str) -> socket.socket:
    """A TCP connection from `source` to HAProxy that never sends its request."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", proxy.port))
    return sock


async def stored_through(proxy: HAProxyServer, token: str, source: str) -> int:
    """Connect through HAProxy from `source`, store one reading; how many were accepted."""
    async with asyncio.timeout(WAIT_S):
        device = DeviceClient(proxy.url + "/v1/ws", token)
        await device.connect(local_addr=(source, 0))
        try:
            ack = await device.store([READING])
        finally:
            await device.close()
    return ack.accepted


@pytest.mark.parametrize("version", [1, 2])
async def test_each_client_behind_the_balancer_is_charged_its_own_address(
    tmp_path: Path,
    influxdb: LocalServer,
    influx_db_name: str,
    haproxy: Callable[[Callable[[int], str]], HAProxyServer],
    version: int,
) -> None:
    """Idle sockets from one client past the per-source cap are dropped as that client's;
    a neighbour behind the same balancer still gets in, and presence names its address."""
    async with hub_behind_haproxy(tmp_path, influxdb, influx_db_name, haproxy, version) as (
        hub,
        proxy,
        devices,
    ):
        idle = [idle_through(proxy, GUESSER) for _ in range(PER_SOURCE + 4)]
        try:
            name = 'hub_unauthenticated_dropped_total{reason="source_cap"}'
            assert await hub.metric_becomes(name, 4.0) == 4.0
            assert await stored_through(proxy, devices.steady.token, NEIGHBOUR) == 1
            device = DeviceClient(proxy.url + "/v1/ws", devices.fresh.token)
            await device.connect(local_addr=(NEIGHBOUR, 0))
            try:
                await device.store([READING])
                rows = await presence_rows(hub)
            finally:
                await device.close()
            assert rows[devices.fresh.device_id].startswith(NEIGHBOUR + ":"), rows
        finally:
            for sock in idle:
                sock.close()
        await hub.stop_within()


async def presence_rows(hub: AttackedHub) -> dict[str, str]:
    """`hub devices --json` once every online device shows: device -> remote address."""
    async with asyncio.timeout(WAIT_S):
        while True:
            listed = await asyncio.to_thread(hub_command, hub.state_dir, "devices", "--json")
            rows = {row["device"]: row["remote_address"] for row in json.loads(listed.stdout)}
            if rows.get("atk-fresh"):
                return rows
            await asyncio.sleep(0.05)


async def test_a_guesser_behind_the_balancer_blocks_only_itself(
    tmp_path: Path,
    influxdb: LocalServer,
    influx_db_name: str,
    haproxy: Callable[[Callable[[int], str]], HAProxyServer],
) -> None:
    """Wrong tokens from one client get it blocked (429); a wrong token from its neighbour
    behind the same balancer is still only a 401."""
    async with hub_behind_haproxy(tmp_path, influxdb, influx_db_name, haproxy) as (hub, proxy, _):
        answers = [await status_through(proxy, GUESSER) for _ in range(12)]
        assert answers[:11] == [b"401"] * 11 and answers[11] == b"429", answers
        assert await status_through(proxy, NEIGHBOUR) == b"401"
        await hub.stop_within()


async def status_through(proxy: HAProxyServer, source: str) -> bytes:
    """The status code the hub answers an upgrade with an unknown token, sent from `source`."""

    def ask() -> bytes:
        with idle_through(proxy, source) as sock:
            sock.sendall(upgrade_request(UNKNOWN_TOKEN))
            _, answer = closed_within(sock, WAIT_S)
        return answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.1 ") else answer

    return await asyncio.to_thread(ask)


async def test_a_balancer_without_a_header_is_dropped_and_nobody_else_may_send_one(
    tmp_path: Path,
    influxdb: LocalServer,
    influx_db_name: str,
    haproxy: Callable[[Callable[[int], str]], HAProxyServer],
) -> None:
    """From the trusted address a request without a PROXY header is dropped and counted;
    from any other address a PROXY line is not trusted: it is a broken request, dropped."""
    async with hub_behind_haproxy(tmp_path, influxdb, influx_db_name, haproxy) as (hub, _, _d):
        with raw_socket(hub.port, "127.0.0.1") as sock:
            sock.sendall(upgrade_request(UNKNOWN_TOKEN))
            closed, answer = await asyncio.to_thread(closed_within, sock, WAIT_S)
        assert closed and answer == b""
        name = 'hub_unauthenticated_dropped_total{reason="proxy_header"}'
        assert await hub.metric_becomes(name, 1.0) == 1.0
        await hub.log_count("does not start with a PROXY protocol header", 1)
        with raw_socket(hub.port, GUESSER) as sock:
            sock.sendall(b"PROXY TCP4 10.9.9.9 127.0.0.1 4000 8765\r\n" + upgrade_request(None))
            closed, answer = await asyncio.to_thread(closed_within, sock, WAIT_S)
        assert closed and not answer.startswith(b"HTTP/1.1 101"), answer[:200]
        print(f"untrusted PROXY line answered {answer[:60]!r}")
        assert "10.9.9.9" not in hub.log
        await hub.stop_within()


def test_the_documented_haproxy_config_is_one_haproxy_accepts(tmp_path: Path) -> None:
    """docs/scale-out.md's HAProxy configuration passes `haproxy -c` (bound to a free
    loopback port instead of :443)."""
    ensure_haproxy()
    text = (Path(__file__).parents[1] / "docs" / "scale-out.md").read_text()
    found = re.search(r"```haproxy\n(.*?)```", text, re.S)
    assert found, "no haproxy block in docs/scale-out.md"
    config = found.group(1).replace("bind :443", f"bind 127.0.0.1:{free_port()}")
    assert "send-proxy-v2" in config
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    checked = subprocess.run(
        [str(HAPROXY), "-c", "-f", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
