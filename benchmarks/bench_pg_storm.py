"""A connect storm on one hub on PostgreSQL: every device connecting at the same moment.

    python -m benchmarks.bench_pg_storm [--devices 1000]

Starts a throwaway PostgreSQL 15 and InfluxDB 1.6.7 (device_sim/servers, device_sim/
local_servers: free ports, temporary directories, stopped by pid at the end), registers
`--devices` devices, starts one real `hub serve` on the database, and opens every device's
connection at once (retrying a refused one after its Retry-After, as firmware does). Prints
how long until all were in, the refusals by status, and how often the hub took the storm
for a registry outage (its `registry unavailable` log lines). To compare with another
commit, run it from a checkout of that commit (`PYTHONPATH=CHECKOUT`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import tempfile
import time
from pathlib import Path

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from device_sim.client import DeviceClient
from device_sim.hub_process import HubProcess, provision
from device_sim.local_servers import create_database, start_influxdb
from device_sim.servers.postgres import start_postgres

OPEN_TIMEOUT_S = 10.0
GIVE_UP_S = 120.0


async def connect_until_in(
    url: str, token: str, refusals: collections.Counter[str], got_in: list[float]
) -> None:
    """Connect, retrying refusals and timeouts as a device would; note when it got in."""
    while True:
        client = DeviceClient(url, token)
        try:
            await asyncio.wait_for(client.connect(), OPEN_TIMEOUT_S)
            got_in.append(time.monotonic())
            return
        except InvalidStatus as refused:
            refusals[str(refused.response.status_code)] += 1
            await asyncio.sleep(float(refused.response.headers.get("Retry-After", "1")))
        except (TimeoutError, OSError, InvalidHandshake, ConnectionClosed) as exc:
            refusals[type(exc).__name__] += 1
            await asyncio.sleep(1.0)


async def storm(devices: int) -> None:
    """Run one storm and print what it did."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with start_postgres(tmp / "pg") as pg, start_influxdb(tmp / "influx") as influx:
            role, db = pg.new_database()
            create_database(influx.url, "storm")
            url = pg.dsn(db, role)
            state_dir = tmp / "hub" / "state"
            state_dir.mkdir(parents=True)
            credentials = provision(state_dir, devices, "storm-", registry_url=url)
            hub = HubProcess(state_dir, influx, "storm", env={"HUB_REGISTRY_URL": url})
            await hub.start()
            refusals: collections.Counter[str] = collections.Counter()
            got_in: list[float] = []
            started = time.monotonic()
            tries = [connect_until_in(hub.url, c.token, refusals, got_in) for c in credentials]
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(GIVE_UP_S):
                        await asyncio.gather(*tries)
            finally:
                await hub.stop()
            outages = hub.log.count("registry unavailable")
            last = f"{max(got_in) - started:.1f} s" if got_in else "-"
            print(
                f"{devices} devices at once: {len(got_in)} in, the last after {last}"
                f" (giving up at {GIVE_UP_S:.0f} s); refused {dict(refusals) or 'never'}; "
                f"'registry unavailable' logged {outages} times (load {os.getloadavg()[0]:.1f})"
            )


def main() -> None:
    """Parse the arguments and run the storm."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(storm(args.devices))


if __name__ == "__main__":
    main()
