"""End to end over the v2 write API: device -> hub (influx_api auto) -> VictoriaMetrics."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer, vm_export
from tests.support import add_device, hub_settings, running_hub

pytestmark = pytest.mark.integration


async def test_readings_reach_victoria_metrics_through_the_v2_api(
    tmp_path: Path, victoria_metrics: LocalServer
) -> None:
    """With influx_api=auto the hub picks v2 for VictoriaMetrics; values, tags (device forced)
    and millisecond timestamps read back."""
    measurement = f"v2path_{uuid.uuid4().hex[:8]}"
    settings = hub_settings(tmp_path, victoria_metrics.url, influx_api="auto")
    token = add_device(settings, "v2-device")
    now_ms = int(time.time() * 1000)
    readings = [
        {
            "name": measurement,
            "time": now_ms - 10 + n,
            "tags": {"room": "hall", "device": "spoofed"},
            "fields": {"temperature": 20.0 + n, "count": n},
        }
        for n in range(5)
    ]
    async with running_hub(settings) as service:
        assert service.hub.pipeline.sink is not None
        async with DeviceClient(service.url, token) as client:
            ack = await asyncio.wait_for(client.store(readings), 10)
        assert (ack.accepted, ack.rejected) == (5, [])
        assert service.hub.pipeline.sink.name == "v2"
    series = vm_export(victoria_metrics.url, f'{{__name__=~"{measurement}_.*"}}')
    by_name = {s["metric"]["__name__"]: s for s in series}
    temperature = by_name[f"{measurement}_temperature"]
    assert temperature["metric"]["device"] == "v2-device"
    assert temperature["metric"]["room"] == "hall"
    assert temperature["values"] == [20.0 + n for n in range(5)]
    assert temperature["timestamps"] == [now_ms - 10 + n for n in range(5)]
    assert by_name[f"{measurement}_count"]["values"] == [float(n) for n in range(5)]
