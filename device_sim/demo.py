"""The README's first command: a local InfluxDB, the hub, a few devices, readings arriving."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from device_sim.fleet import FleetReport, run_fleet
from device_sim.hub_process import HubProcess, provision
from device_sim.local_servers import (
    INFLUXD,
    LocalServer,
    create_database,
    influxql,
    missing_packages,
    start_influxdb,
)

DATABASE = "sensors"


def missing_acked(influx: LocalServer, report: FleetReport) -> int:
    """Acked readings that InfluxDB does not hold (each device's exact timestamps)."""
    missing = 0
    for device_id, device in report.devices.items():
        rows = influxql(
            influx.url,
            DATABASE,
            f"SELECT temperature FROM environment WHERE device = '{device_id}'",  # noqa: S608
        )
        missing += len(set(device.acked_times_ns()) - {int(row["time"]) for row in rows})
    return missing


def stored_per_device(influx: LocalServer) -> dict[str, int]:
    """Readings stored in InfluxDB, per device."""
    rows = influxql(
        influx.url, DATABASE, 'SELECT count("temperature") FROM "environment" GROUP BY "device"'
    )
    return {str(row.get("device")): int(row["count"]) for row in rows}


async def show_progress(influx: LocalServer, duration: float) -> None:
    """Print what InfluxDB holds every two seconds while the devices stream."""
    started = time.monotonic()
    while time.monotonic() - started < duration + 1:
        await asyncio.sleep(2)
        elapsed = time.monotonic() - started
        counts = await asyncio.to_thread(stored_per_device, influx)
        per_device = ", ".join(f"{d}={n}" for d, n in sorted(counts.items()))
        print(f"  {elapsed:5.1f} s  stored in InfluxDB: {sum(counts.values()):7d}  ({per_device})")


async def demo(devices: int, duration: float, rate: float, batch: int) -> int:
    """Run the whole demo; returns the process exit status."""
    for package in missing_packages(INFLUXD):
        # This only starts what is installed; scripts/demo.sh installs what is missing.
        print(
            f"error: {INFLUXD} is missing: install the Debian package {package} "
            f"(`sudo apt-get install {package}`, or run scripts/demo.sh, which installs it)",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="hub-demo-") as workdir:
        work = Path(workdir)
        with start_influxdb(work / "influxdb") as influx:
            create_database(influx.url, DATABASE)
            print(
                f"InfluxDB 1.6.7 running at {influx.url} (pid {influx.pid}), database {DATABASE!r}"
            )
            state_dir = work / "hub-state"
            creds = provision(state_dir, devices, "demo-sensor-", work / "tokens.csv")
            print(f"registered {len(creds)} devices with `hub token add --count {devices}`")
            hub = HubProcess(state_dir, influx, DATABASE)
            await hub.start()
            print(f"hub running at {hub.url}/v1/ws (pid {hub.pid})")
            print(
                f"{devices} devices sending {rate:g} messages/s "
                f"of {batch} readings for {duration:g} s:"
            )
            try:
                report, _ = await asyncio.gather(
                    run_fleet(hub.url, creds, rate=rate, batch=batch, duration=duration),
                    show_progress(influx, duration),
                )
            finally:
                await hub.stop()
            stored = sum(stored_per_device(influx).values())
            missing = missing_acked(influx, report)
            print(
                f"\nsent {report.sent}, acked {report.acked}, stored in InfluxDB {stored}, "
                f"acked but missing {missing}; "
                f"hub log: {hub.log.count(chr(10))} lines"
            )
            sample = influxql(
                influx.url, DATABASE, 'SELECT * FROM "environment" ORDER BY time DESC LIMIT 1'
            )
            print(f"the latest point in InfluxDB: {sample[0] if sample else None}")
            print("to run the hub for real, see 'Running the hub' in README.md")
            if report.acked == 0 or missing:
                print("FAILED: acked readings are missing from InfluxDB", file=sys.stderr)
                print(hub.log, file=sys.stderr)
                return 1
    print("demo finished: every acked reading is in InfluxDB")
    return 0
