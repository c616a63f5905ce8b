"""The PostgreSQL registry: what the hub's calls cost, what watching costs, how fast the
doorbell rings, and the operator's bulk commands.

    python -m benchmarks.bench_postgres_registry [--devices 10000] [--rounds 200] [--hubs 3]

Starts a throwaway PostgreSQL 15 (device_sim/servers/postgres.py: Debian's package, initdb in a
temporary directory, a free port; stopped at the end) and a fresh database owned by a
non-superuser role, then prints:
- `token add --count`: registering `--devices` devices in chunks, one transaction;
- the round trip of a credential lookup through the hub's pool, one at a time (p50, p99)
  and 100 at once (lookups per second), what a handshake costs on PostgreSQL;
- a presence flush of every device at once (the hub's 0.5 s flush after a connect storm);
- `config set --all` over every device;
- the doorbell: from a push to one held device until the hub's wait returns (p50, p99);
- the hub's process CPU per second while nothing changes (heartbeat and catch-up reads);
- the change feed of a fleet: `--hubs` hubs each holding a share of the devices, a `config
  set --all`, then what each hub's feed read hands it (rows, how many of them it holds,
  time): what every hub pays for a fleet-wide push.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from device_sim.servers.postgres import start_postgres
from hub.registry.postgres.backend import PostgresRegistry
from hub.registry.postgres.operator import PostgresOperator
from hub.registry.records import Presence, hash_token


def quantiles(samples: list[float]) -> str:
    """p50 and p99 of seconds, in milliseconds."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms"


async def run(url: str, devices: int, rounds: int, hubs: int) -> None:
    """Every measurement on the database at `url`."""
    operator = await PostgresOperator.open(url)
    hub = await PostgresRegistry.open(url, "bench-hub", "127.0.0.1:8765")
    try:
        ids = [f"sim-{n:06d}" for n in range(devices)]
        started = time.perf_counter()
        tokens = await operator.add_many(ids)
        print(f"token add --count {devices}: {time.perf_counter() - started:.2f} s")

        hashes = [hash_token(token) for token in tokens[:rounds]]
        samples = []
        for token_hash in hashes:
            before = time.perf_counter()
            await hub.credential(token_hash)
            samples.append(time.perf_counter() - before)
        many = [hash_token(token) for token in tokens[:1000]]
        await asyncio.gather(*(hub.credential(h) for h in many[:100]))  # the pool fills up
        started = time.perf_counter()
        for start in range(0, len(many), 100):
            await asyncio.gather(*(hub.credential(h) for h in many[start : start + 100]))
        rate = len(many) / (time.perf_counter() - started)
        print(f"credential lookup: {quantiles(samples)}; 100 at once: {rate:.0f} lookups/s")

        now = time.time()
        states = [Presence(d, True, "192.0.2.1:40000", now, now, 1) for d in ids]
        started = time.perf_counter()
        await hub.record_presence(states)
        print(f"presence flush of {devices} devices: {time.perf_counter() - started:.2f} s")

        started = time.perf_counter()
        targets = await operator.select(everyone=True)
        await operator.set_config(targets, updates={"interval_s": 5})
        print(f"config set --all ({devices} devices): {time.perf_counter() - started:.2f} s")
        await hub.changes_since(0)  # taken: the next waits are for new pushes only
        await hub.wait_for_change(0.5)

        samples = []
        for value in range(min(rounds, 50)):
            before = time.perf_counter()
            await operator.set_config([ids[0]], updates={"n": value})
            if not await hub.wait_for_change(5.0):
                raise SystemExit("the doorbell did not ring within 5 s")
            samples.append(time.perf_counter() - before)
            await hub.change_seq()
        print(f"doorbell, push of one held device to the hub's wake: {quantiles(samples)}")

        started_cpu, started = time.process_time(), time.monotonic()
        while time.monotonic() - started < 5.0:
            await hub.wait_for_change(1.0)
        cpu = (time.process_time() - started_cpu) / (time.monotonic() - started)
        print(f"watching, nothing changes: {cpu * 1000:.2f} ms CPU per second")
        await fleet_feed(url, operator, ids, hubs)
    finally:
        await hub.close()
        await operator.close()


async def fleet_feed(url: str, operator: PostgresOperator, ids: list[str], hubs: int) -> None:
    """`hubs` hubs claim the devices round robin; after one `config set --all`, print what
    each hub's change feed read."""
    fleet = [
        await PostgresRegistry.open(url, f"fleet-hub-{n}", f"127.0.0.1:{9000 + n}")
        for n in range(1, hubs + 1)
    ]
    try:
        held: list[set[str]] = [set() for _ in fleet]
        for start in range(0, len(ids), 100):
            chunk = ids[start : start + 100]
            owners = [n % hubs for n in range(start, start + len(chunk))]
            claims = await asyncio.gather(
                *(fleet[o].claim(d, "192.0.2.1:40000") for d, o in zip(chunk, owners, strict=True))
            )
            for device_id, owner, claim in zip(chunk, owners, claims, strict=True):
                if claim is not None:
                    held[owner].add(device_id)
        seen = [await member.change_seq() for member in fleet]
        targets = await operator.select(everyone=True)
        await operator.set_config(targets, updates={"fleet": 1})
        for n, member in enumerate(fleet):
            started = time.perf_counter()
            _, changes = await member.changes_since(seen[n])
            took = time.perf_counter() - started
            mine = sum(1 for change in changes if change.device_id in held[n])
            print(
                f"change feed of {member.node_id} after config set --all: read "
                f"{len(changes)} devices ({mine} of the {len(held[n])} it holds) "
                f"in {took * 1000:.0f} ms"
            )
    finally:
        for member in fleet:
            await member.close()


def main() -> None:
    """Start PostgreSQL, measure, stop it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--hubs", type=int, default=3, help="hubs sharing the fleet's feed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, start_postgres(Path(tmp)) as server:
        role, name = server.new_database()
        asyncio.run(run(server.dsn(name, role), args.devices, args.rounds, args.hubs))


if __name__ == "__main__":
    main()
