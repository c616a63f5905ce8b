"""The device client moved to the public package `sensorhub_client`; these names stay so
that existing imports keep working."""

from sensorhub_client.connection import (
    ConfigHandler,
    DeviceClient,
    Precision,
    device_url,
    pack,
    parse_ack,
)

__all__ = ["ConfigHandler", "DeviceClient", "Precision", "device_url", "pack", "parse_ack"]
