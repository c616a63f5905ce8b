"""The attacks of issue 16 at the volumes it reported, against a real `hub serve`.

    python -m benchmarks.bench_attacks [--rounds 1000] [--resets 1000] [--huge 300] [--idle 1050]

Run from the repository root (it shares tests/attack_support.py with the attack tests). Each
scenario starts its own hub (InfluxDB 1.6.7 on loopback, started here), replays one attack
while a well-behaved device streams a reading every 20 ms and another connects afresh after
every 50 attack rounds, then prints: the attack's duration, the good device's ack latency
(p50, p99, max), how many fresh connections got in, what the hub holds afterwards (open
connections, descriptors, RSS before -> after) and how long it took to stop on SIGTERM.

* `clean_close`: connect, send 5 readings messages, close 1000 without reading the acks.
* `abandoned`: a valid upgrade request, then FIN (`shutdown(SHUT_WR)`) and close.
* `resets`: an upgrade request with a wrong token, then a TCP reset; also the log lines.
* `huge_headers`: 125 header lines of 8 KB without the final CRLF, all sockets at once.
* `idle`: idle TCP connections from one address, the hub started with a soft file limit of
  1024 (systemd's default without `LimitNOFILE`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from websockets.asyncio.client import connect

from device_sim.client import pack
from device_sim.local_servers import create_database, start_influxdb
from tests.attack_support import (
    READING,
    AttackedHub,
    GoodDevices,
    good_devices,
    raw_socket,
    register,
    reset,
    upgrade_request,
)

FRESH_EVERY = 50
ATTACKER = "127.0.0.2"
UNKNOWN_TOKEN = "hubt_" + "D" * 43


async def clean_close(hub: AttackedHub, token: str) -> None:
    """Send 5 readings messages, close 1000 without reading an ack."""
    connection = await connect(
        hub.url + "/v1/ws", additional_headers={"Authorization": f"Bearer {token}"}
    )
    for seq in range(5):
        await connection.send(pack({"type": "readings", "seq": seq, "readings": [READING]}))
    await connection.close()


def abandoned(hub: AttackedHub, token: str) -> None:
    """A valid upgrade request, then FIN and close."""
    sock = raw_socket(hub.port)
    sock.sendall(upgrade_request(token))
    sock.shutdown(socket.SHUT_WR)
    sock.close()


def request_then_reset(hub: AttackedHub) -> None:
    """An upgrade request with a wrong token, then a TCP reset."""
    sock = raw_socket(hub.port, ATTACKER)
    sock.sendall(upgrade_request(UNKNOWN_TOKEN))
    reset(sock)


async def huge_headers(hub: AttackedHub) -> None:
    """125 header lines of 8 KB without the final CRLF; wait for the hub to drop it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port, local_addr=(ATTACKER, 0))
    with contextlib.suppress(ConnectionError):
        writer.write(b"GET /v1/ws HTTP/1.1\r\n")
        for _ in range(125):
            writer.write(b"X-Big: " + b"a" * 8000 + b"\r\n")
            await writer.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(), 30)
    writer.transport.abort()


async def rounds(good: GoodDevices, count: int, attack: Callable[[], Awaitable[None]]) -> None:
    """`count` attack rounds, a fresh good connection every FRESH_EVERY."""
    for number in range(1, count + 1):
        await attack()
        if number % FRESH_EVERY == 0:
            await good.fresh()


async def scenario(
    name: str,
    base: Path,
    run: Callable[[AttackedHub, GoodDevices, str], Awaitable[str]],
    env: dict[str, str] | None = None,
    soft_file_limit: int | None = None,
) -> None:
    """Start InfluxDB and a hub, run one attack, print what it cost."""
    work = base / name
    influx = start_influxdb(work / "influxdb")
    try:
        create_database(influx.url, "bench")
        devices = register(work / "state")
        hub = AttackedHub(work / "state", influx, "bench", env, soft_file_limit)
        await hub.start()
        try:
            fds, rss = hub.open_fds(), hub.rss_kib()
            lines = len(hub.log.splitlines())
            started = time.monotonic()
            async with good_devices(hub.url, devices.steady, devices.fresh) as good:
                detail = await run(hub, good, devices.bad.token)
            elapsed = time.monotonic() - started
            held = await hub.metric_becomes("hub_connections", 0)
            fds_after, rss_after = await hub.fds_back_to(fds + 2), hub.rss_kib()
            new_lines = len(hub.log.splitlines()) - lines
            stop_s = await hub.stop_within()
        finally:
            if hub.process is not None and hub.process.poll() is None:
                await hub.kill()
    finally:
        influx.stop()
    latencies = sorted(good.report.ack_latencies_s)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
    failures = len(good.report.failures)
    print(
        f"{name:<13} {detail}; {elapsed:6.1f} s | good acks {len(latencies)}: p50 "
        f"{statistics.median(latencies or [0]) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max "
        f"{max(latencies or [0]) * 1000:.1f} ms | fresh {good.report.fresh_connections - failures}"
        f"/{good.report.fresh_connections} in | after: {held:g} connections, fds {fds} -> "
        f"{fds_after}, RSS {rss // 1024} -> {rss_after // 1024} MiB, {new_lines} log lines | "
        f"stop {stop_s:.2f} s"
    )


async def main(args: argparse.Namespace) -> None:
    """Every scenario, one after another."""
    with tempfile.TemporaryDirectory(prefix="bench-attacks-") as directory:
        base = Path(directory)
        slots = {"HUB_MAX_CONNECTIONS": "100"}

        async def run_clean_close(hub: AttackedHub, good: GoodDevices, token: str) -> str:
            await rounds(good, args.rounds, lambda: clean_close(hub, token))
            return f"{args.rounds} clean closes with acks owed"

        async def run_abandoned(hub: AttackedHub, good: GoodDevices, token: str) -> str:
            await rounds(good, args.rounds, lambda: asyncio.to_thread(abandoned, hub, token))
            return f"{args.rounds} abandoned handshakes"

        async def run_resets(hub: AttackedHub, good: GoodDevices, token: str) -> str:
            await rounds(good, args.resets, lambda: asyncio.to_thread(request_then_reset, hub))
            return f"{args.resets} resets mid-handshake"

        async def run_huge(hub: AttackedHub, good: GoodDevices, token: str) -> str:
            await asyncio.gather(*(huge_headers(hub) for _ in range(args.huge)))
            await good.fresh()
            return f"{args.huge} sockets x 1 MB of headers"

        async def run_idle(hub: AttackedHub, good: GoodDevices, token: str) -> str:
            idle: list[socket.socket] = []
            try:
                for _ in range(args.idle // FRESH_EVERY):
                    idle += await asyncio.to_thread(
                        lambda: [raw_socket(hub.port, ATTACKER) for _ in range(FRESH_EVERY)]
                    )
                    await good.fresh()
            finally:
                for sock in idle:
                    sock.close()
            return f"{len(idle)} idle sockets from one address"

        await scenario("clean_close", base, run_clean_close, slots)
        await scenario("abandoned", base, run_abandoned, slots)
        await scenario("resets", base, run_resets, {"HUB_AUTH_FAILURES_BURST": "0"})
        await scenario("huge_headers", base, run_huge)
        idle_env = {"HUB_REQUEST_HEADER_TIMEOUT_S": "60", "HUB_HANDSHAKE_TIMEOUT_S": "60"}
        await scenario("idle", base, run_idle, idle_env, soft_file_limit=1024)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=1000, help="clean closes, abandoned handshakes"
    )
    parser.add_argument("--resets", type=int, default=1000, help="resets mid-handshake")
    parser.add_argument("--huge", type=int, default=300, help="sockets with 1 MB of headers")
    parser.add_argument("--idle", type=int, default=1050, help="idle sockets from one address")
    asyncio.run(main(parser.parse_args()))
