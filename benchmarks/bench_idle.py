"""What an idle device connection holds in the hub process: Python objects, by where made.

    python benchmarks/bench_idle.py [--connections 2000] [--top 25]

Runs a real `HubService` in this process (registry, pipeline with no InfluxDB, websockets'
server on a free port) under tracemalloc, connects `--connections` devices from a child
process (so that the clients' objects are not counted), waits until the hub has them all,
and prints the bytes of Python objects grown per connection, then the `--top` lines of code
that made the most of them (the hub's and its libraries': websockets, asyncio). This is the
finer view of `device-sim bench --only idle`, which measures the hub's RSS; RSS also holds
the kernel's and the allocator's share, so the two differ by a few KiB.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import textwrap
import time
import tracemalloc
from pathlib import Path

from hub.registry.sqlite import Registry, secure_state_dir
from hub.service import HubService
from hub.settings import Settings

CLIENTS = textwrap.dedent(
    """
    import asyncio, sys
    from websockets.asyncio.client import connect

    async def main(url, tokens):
        held = []
        for token in tokens:
            held.append(await connect(url, additional_headers={"Authorization": f"Bearer {token}"}))
        await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1], sys.stdin.read().split()))
    """
)


async def measure(connections: int, top: int) -> None:
    """Connect `connections` idle devices; print what they hold in the hub."""
    with tempfile.TemporaryDirectory() as work:
        state = Path(work) / "state"
        settings = Settings(state_dir=state, port=0, health_enabled=False, log_level="WARNING")
        secure_state_dir(state)
        registry = Registry(settings.registry_path)
        tokens = registry.add_many([f"idle-{n:05}" for n in range(connections)])
        registry.close()
        async with HubService(settings) as service:
            gc.collect()
            tracemalloc.start(8)
            before = tracemalloc.take_snapshot()
            clients = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CLIENTS,
                service.url + "/v1/ws",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
            )
            try:
                assert clients.stdin is not None
                clients.stdin.write("\n".join(tokens).encode())
                clients.stdin.close()
                deadline = time.monotonic() + 120
                while len(service.hub.live_devices) < connections:
                    if time.monotonic() > deadline or clients.returncode is not None:
                        raise SystemExit("the clients did not all connect")
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)  # every session past its first config lookup
                gc.collect()
                after = tracemalloc.take_snapshot()
                tracemalloc.stop()
            finally:
                clients.kill()
                await clients.wait()
    report(after.compare_to(before, "lineno"), connections, top)


def report(stats: list[tracemalloc.StatisticDiff], connections: int, top: int) -> None:
    """Print the growth per connection, in all and by line."""
    grown = sum(stat.size_diff for stat in stats)
    print(f"{connections} idle connections: {grown / connections:.0f} bytes of Python objects each")
    print(f"{'bytes':>7} {'objects':>8}  where (per connection)")
    for stat in sorted(stats, key=lambda s: s.size_diff, reverse=True)[:top]:
        frame = stat.traceback[0]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        package = Path(frame.filename).parent.name
        print(
            f"{stat.size_diff / connections:7.0f} {stat.count_diff / connections:8.2f}  "
            f"{package}/{where}"
        )


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    asyncio.run(measure(args.connections, args.top))


if __name__ == "__main__":
    main()
