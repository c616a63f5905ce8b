"""What a handshake's claim costs on SQLite, and a connect storm of claims from two workers.

    python benchmarks/bench_claims.py [--devices 2000]

In a temporary state directory with `--devices` devices, through the hub's ports
(`ThreadedSQLiteRegistry`, one thread each), as the workers of one host use them:
- one worker claiming one device at a time: the round trip of a claim, p50/p99;
- a storm: every device claimed at once, half by each of two workers (two connections to
  the file, like two worker processes), then every device claimed again by the other
  worker (each a takeover, ringing the previous owner's doorbell): claims per second, and
  how many rings the two doorbells heard;
- a registry write another connection holds meanwhile does not stop claims: their p99 with
  the registry file locked;
- the safety net's question (`stale_sessions`) over every session a worker holds, as it asks
  every 5 s: how long it takes the registry's thread.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sqlite3
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from hub.registry.records import HeldSession
from hub.registry.sqlite import Registry
from hub.registry.thread import ThreadedSQLiteRegistry

POLL_S = 0.01


def count_ring(heard: Counter[str], name: str, _device_id: str, _epoch: int) -> None:
    """A ring heard by node `name`."""
    heard[name] += 1


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


async def one_at_a_time(worker: ThreadedSQLiteRegistry, ids: list[str]) -> list[float]:
    """Each device claimed in turn; each claim's round trip in seconds."""
    took = []
    for device_id in ids:
        started = time.perf_counter()
        assert await worker.claim(device_id, "192.0.2.1:1") is not None
        took.append(time.perf_counter() - started)
    return took


async def main() -> None:
    """Run the measurements on a fresh registry."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--devices", type=int, default=2000)
    args = parser.parse_args()
    ids = [f"d{n:06}" for n in range(args.devices)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state" / "registry.sqlite3"
        engine = Registry(path)
        engine.add_many(ids)
        engine.close()
        first = await ThreadedSQLiteRegistry.open(path, POLL_S, "bench/1")
        second = await ThreadedSQLiteRegistry.open(path, POLL_S, "bench/2")
        heard: Counter[str] = Counter()
        for name, worker in (("bench/1", first), ("bench/2", second)):
            worker.watch_takeovers(functools.partial(count_ring, heard, name), lambda: None)
        try:
            took = await one_at_a_time(first, ids[: min(500, len(ids))])
            print(
                f"claim round trip, one at a time ({len(took)}): p50 "
                f"{statistics.median(took) * 1000:.2f} ms, "
                f"p99 {percentile(took, 0.99) * 1000:.2f} ms"
            )
            for what, pairs in (
                ("storm, 2 workers", [(first, ids[0::2]), (second, ids[1::2])]),
                ("storm of takeovers", [(second, ids[0::2]), (first, ids[1::2])]),
            ):
                started = time.perf_counter()
                claims = [w.claim(d, "192.0.2.1:1") for w, chunk in pairs for d in chunk]
                await asyncio.gather(*claims)
                elapsed = time.perf_counter() - started
                await asyncio.sleep(0.2)  # the rings' datagrams read
                print(
                    f"{what}: {len(ids)} claims in {elapsed:.2f} s "
                    f"({len(ids) / elapsed:.0f}/s); rings heard {dict(heard)}"
                )
            holder = sqlite3.connect(path, isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")
            try:
                locked = await one_at_a_time(second, ids[: min(200, len(ids))])
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            print(
                f"claims with the registry file locked by another connection ({len(locked)}): "
                f"p50 {statistics.median(locked) * 1000:.2f} ms, "
                f"p99 {percentile(locked, 0.99) * 1000:.2f} ms"
            )
            # first's devices since the last storm, as sessions of an older epoch: every one
            # is reported taken over, the most work the check can have.
            held = [HeldSession(d, 0, 0, "h") for d in ids[1::2]]
            started = time.perf_counter()
            stale = await first.stale_sessions(held)
            print(
                f"safety net over {len(held)} held sessions: "
                f"{(time.perf_counter() - started) * 1000:.1f} ms "
                f"({len(stale)} reported taken over)"
            )
        finally:
            await first.close()
            await second.close()


if __name__ == "__main__":
    asyncio.run(main())
