"""IoT sensor ingestion hub: devices stream msgpack readings over WebSocket into InfluxDB."""

__version__ = "0.1.0"
