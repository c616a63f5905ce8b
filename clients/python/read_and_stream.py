"""Read a sensor on a Raspberry Pi (or any Linux box) and stream it to a sensor-hub.

    HUB_TOKEN=... python read_and_stream.py --url ws://hub.local:8765 --interval 5

Reads the SoC temperature (/sys/class/thermal/thermal_zone0/temp) where there is one, and
the load average (/proc/loadavg) always, as measurement `system`. The token comes from the
HUB_TOKEN variable or --token-file, never from the command line (`ps` shows arguments to
every user). Stops on Ctrl-C or SIGTERM after trying (10 s) to get the last acks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from sensorhub_client import StreamingClient

THERMAL = Path("/sys/class/thermal/thermal_zone0/temp")
LOADAVG = Path("/proc/loadavg")


def read_sensors() -> dict[str, float]:
    """One sample: load average, and the SoC temperature in °C where the board has one."""
    fields = {"load1": float(LOADAVG.read_text().split()[0])}
    if THERMAL.exists():
        fields["cpu_temp_c"] = int(THERMAL.read_text()) / 1000
    return fields


async def main(url: str, token: str, interval_s: float, duration_s: float | None) -> int:
    """Sample every `interval_s`, stream, and apply `interval_s` from pushed configs."""
    state = {"interval_s": interval_s}

    def on_config(config: dict[str, Any], version: int) -> str | None:
        interval = config.get("interval_s", interval_s)
        if not isinstance(interval, int | float) or isinstance(interval, bool) or interval < 1:
            return f"interval_s must be a number >= 1, got {interval!r}"
        state["interval_s"] = float(interval)
        logging.info("config %d applied: sampling every %s s", version, interval)
        return None

    client = StreamingClient(url, token, on_config, max_batch=100)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if duration_s is not None:
        loop.call_later(duration_s, stop.set)
    streaming = asyncio.create_task(client.run())
    tags = {"host": socket.gethostname()}
    while not stop.is_set() and not streaming.done():
        client.add("system", read_sensors(), tags)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), state["interval_s"])
    flushed = await client.flush(10.0)
    client.stop()
    why = await streaming
    stats = client.stats
    logging.info("sent %d, acked %d, rejected %d, unacked %d", stats.sent, stats.acked,
                 stats.rejected, client.held())  # fmt: skip
    if why is not None:
        logging.error("the hub refused this device for good: %s", why)
        return 2
    return 0 if flushed else 1


def cli() -> None:
    """Parse the arguments and run `main`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="ws://HOST:PORT or wss://HOST:PORT")
    parser.add_argument("--token-file", type=Path, help="file holding the device token")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    args = parser.parse_args()
    token = args.token_file.read_text().strip() if args.token_file else os.environ.get("HUB_TOKEN")
    if not token:
        parser.error("give the device token in HUB_TOKEN or --token-file")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    raise SystemExit(asyncio.run(main(args.url, token, args.interval, args.duration)))


if __name__ == "__main__":
    cli()
