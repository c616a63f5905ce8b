"""clients/python/read_and_stream.py, the example for Raspberry Pi scripts, really streams."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from device_sim.local_servers import LocalServer
from tests.support import add_device, hub_settings, points, running_hub

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).parent.parent / "clients" / "python" / "read_and_stream.py"
WAIT_S = 30.0


async def test_example_reads_the_load_average_and_streams_it(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Run for a while, then SIGTERM: it flushes, exits 0, and InfluxDB holds its samples."""
    settings = hub_settings(tmp_path / "state", influxdb.url, influx_bucket=influx_db_name)
    token = add_device(settings, "pi-example")
    async with running_hub(settings) as service:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), "--url", service.url, "--interval", "0.1",
            env={**os.environ, "HUB_TOKEN": token},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            async with asyncio.timeout(WAIT_S):
                while len(points(influxdb, influx_db_name, "system")) < 3:
                    await asyncio.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(WAIT_S):
                output, _ = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    text = output.decode()
    assert process.returncode == 0, text
    assert token not in text
    rows = points(influxdb, influx_db_name, "system")
    assert all(row["device"] == "pi-example" and row["load1"] >= 0 for row in rows)
    assert f"acked {len(rows)}," in text, text
