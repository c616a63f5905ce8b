"""The Python client of sensor-hub, for Raspberry Pi scripts and gateways (asyncio).

- `StreamingClient`: add readings, it streams them, keeps them until acked, reconnects and
  resends (the behaviour of the MicroPython client in clients/micropython/).
- `DeviceClient`: one protocol v1 connection, for those who want their own policy.
- `sensorhub_client.policy`: the reconnect policy as data.

See clients/README.md and clients/python/read_and_stream.py.
"""

from sensorhub_client.connection import ConfigHandler, DeviceClient, Precision, device_url, pack
from sensorhub_client.streaming import ConfigCallback, StreamingClient, StreamStats

__all__ = [
    "ConfigCallback",
    "ConfigHandler",
    "DeviceClient",
    "Precision",
    "StreamStats",
    "StreamingClient",
    "device_url",
    "pack",
]
