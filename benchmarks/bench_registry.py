"""The hub's registry on its own thread: what a call costs, what watching costs, and the
event loop while another process holds SQLite's write lock.

    python benchmarks/bench_registry.py [--devices 1000] [--seconds 3]
    python benchmarks/bench_registry.py --storm 10000

Prints, for a registry of `--devices` devices in a temporary directory:
- the round trip of a credential lookup through the registry's thread, against the same
  lookup called directly (what the hub did on its loop before);
- the process CPU per second of waiting for operator changes when there are none (the
  thread looks at `PRAGMA data_version` every `registry_poll_s`, 10 ms);
- with another process holding the write lock for `--seconds`: the loop's worst stall,
  the slowest credential lookup, and how long a presence write waited (it lands once the
  lock is gone).

`--storm N` instead asks, for N devices, what a fleet push asks all at once: N token
lookups, N configs one at a time, the N configs in one `config_states` call, and N config
acks, each storm gathered at once, through the thread; and the same calls made directly.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from hub.registry.records import Presence, hash_token
from hub.registry.sqlite import Registry
from hub.registry.thread import ThreadedSQLiteRegistry

POLL_S = 0.01
LOCK_HOLDER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


async def lookups(ports: ThreadedSQLiteRegistry, engine: Registry, tokens: list[str]) -> None:
    """Round trip of `credential` through the thread, and called directly."""
    hashes = [hash_token(t) for t in tokens]
    threaded = []
    for token_hash in hashes:
        started = time.perf_counter()
        await ports.credential(token_hash)
        threaded.append(time.perf_counter() - started)
    direct = []
    for token_hash in hashes:
        started = time.perf_counter()
        engine.credential(token_hash)
        direct.append(time.perf_counter() - started)
    print(
        f"credential lookup: through the thread p50 {statistics.median(threaded) * 1e6:.0f} µs,"
        f" direct p50 {statistics.median(direct) * 1e6:.0f} µs ({len(hashes)} lookups)"
    )


async def watching(ports: ThreadedSQLiteRegistry, seconds: float) -> None:
    """Process CPU per second while the hub waits for changes that do not come."""
    started_cpu, started = time.process_time(), time.monotonic()
    while time.monotonic() - started < seconds:
        await ports.wait_for_change(1.0)
    cpu = time.process_time() - started_cpu
    wall = time.monotonic() - started
    print(f"watching, nothing changes: {cpu / wall * 1000:.2f} ms CPU per second")


async def under_lock(
    ports: ThreadedSQLiteRegistry, path: Path, tokens: list[str], s: float
) -> None:
    """The loop, lookups and a write while another process holds the write lock."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LOCK_HOLDER, str(path), str(s), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and await holder.stdout.readline() == b"locked\n"
        locked_at = time.monotonic()
        write = asyncio.ensure_future(
            ports.record_presence([Presence("d0", True, None, None, None, 0)])
        )
        stall = lookup = 0.0
        index = 0
        while not write.done():
            before = time.monotonic()
            await asyncio.sleep(POLL_S)
            stall = max(stall, time.monotonic() - before - POLL_S)
            before = time.monotonic()
            await ports.credential(hash_token(tokens[index % len(tokens)]))
            lookup = max(lookup, time.monotonic() - before)
            index += 1
        await write
        waited = time.monotonic() - locked_at
    finally:
        await asyncio.wait_for(holder.wait(), s + 10)  # it ends by itself after `s`
    print(
        f"write lock held {s:g} s by another process: loop stalled at most "
        f"{stall * 1000:.1f} ms, {index} credential lookups, slowest {lookup * 1000:.1f} ms;"
        f" a presence write waited {waited:.2f} s"
    )


async def storm(ports: ThreadedSQLiteRegistry, engine: Registry, tokens: list[str]) -> None:
    """N concurrent calls of each kind through the thread, against the same calls direct."""
    ids = [f"d{i}" for i in range(len(tokens))]
    hashes = [hash_token(t) for t in tokens]
    versions = engine.set_config(ids, updates={"unit": "F"})
    threaded: dict[str, Callable[[], Awaitable[object]]] = {
        "credential": lambda: asyncio.gather(*(ports.credential(h) for h in hashes)),
        "config_state": lambda: asyncio.gather(*(ports.config_state(d) for d in ids)),
        "config_states (one call)": lambda: ports.config_states(ids),
        "record_config_ack": lambda: asyncio.gather(
            *(ports.record_config_ack(d, versions[d], True, None) for d in ids)
        ),
    }
    if not hasattr(ports, "config_states"):  # an older checkout, measured for comparison
        del threaded["config_states (one call)"]
    for name, calls in threaded.items():
        started, started_cpu = time.perf_counter(), time.process_time()
        await calls()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        print(
            f"{len(ids)} x {name} at once, through the thread: {elapsed:.2f} s"
            f" ({cpu:.2f} s process CPU, both threads)"
        )
    direct: dict[str, Callable[[], object]] = {
        "credential": lambda: [engine.credential(h) for h in hashes],
        "config_state": lambda: [engine.config_state(d) for d in ids],
    }
    for name, call in direct.items():
        started, started_cpu = time.perf_counter(), time.process_time()
        call()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        print(f"{len(ids)} x {name}, direct: {elapsed:.2f} s ({cpu:.2f} s CPU)")


async def main() -> None:
    """Run the three measurements on a fresh registry."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--storm", type=int, default=0, help="N devices' fleet-push calls")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state" / "registry.sqlite3"
        engine = Registry(path)
        tokens = engine.add_many([f"d{i}" for i in range(args.storm or args.devices)])
        ports = await ThreadedSQLiteRegistry.open(path, POLL_S)
        try:
            if args.storm:
                await storm(ports, engine, tokens)
                return
            await lookups(ports, engine, tokens)
            await watching(ports, args.seconds)
            await under_lock(ports, path, tokens, args.seconds)
        finally:
            await ports.close()
            engine.close()


if __name__ == "__main__":
    asyncio.run(main())
