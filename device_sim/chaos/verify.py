"""Whether InfluxDB holds every reading the hubs acked: waited for (bounded), device by device.

What a hub acked may still be in its spool when the devices stop (InfluxDB came back only
lately), so the check is repeated until nothing is missing or the bound passes; each round
asks InfluxDB only about the devices still missing something.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from device_sim.local_servers import LocalServer, ServerError, influxql, quote_string
from device_sim.sensors import MEASUREMENT

SHOWN_PER_DEVICE = 5
"""Missing timestamps listed per device in the report (all are counted)."""


def stored_times(influx: LocalServer, db: str, device_id: str) -> set[int]:
    """Timestamps (ns) of the device's readings in InfluxDB."""
    # The device id is quoted as an InfluxQL string literal (quote_string escapes it).
    where = f'"device" = {quote_string(device_id)}'
    query = f'SELECT "temperature" FROM "{MEASUREMENT}" WHERE {where}'  # noqa: S608
    rows = influxql(influx.url, db, query)
    return {int(row["time"]) for row in rows}


async def missing_readings(
    influx: LocalServer, db: str, acked: Mapping[str, set[int]], wait_s: float
) -> dict[str, list[int]]:
    """Per device, the acked timestamps (ns) InfluxDB still lacks after waiting up to
    `wait_s`; empty when everything arrived."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    pending = {device: set(times) for device, times in acked.items() if times}
    while True:
        for device in list(pending):
            try:
                stored = await asyncio.to_thread(stored_times, influx, db, device)
            except (ServerError, OSError):
                continue  # asked again next round
            pending[device] -= stored
            if not pending[device]:
                del pending[device]
        if not pending or loop.time() >= deadline:
            return {device: sorted(times) for device, times in sorted(pending.items())}
        await asyncio.sleep(1.0)


def loss_summary(missing: Mapping[str, list[int]]) -> dict[str, object]:
    """How many acked readings are missing, and a few of them per device."""
    return {
        "lost": sum(len(times) for times in missing.values()),
        "devices": {device: len(times) for device, times in missing.items()},
        "examples_ns": {device: times[:SHOWN_PER_DEVICE] for device, times in missing.items()},
    }
