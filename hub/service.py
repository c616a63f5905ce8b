"""`hub serve` at run time: build the parts from settings, run until a signal, stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from hub.influx import open_sink
from hub.measurements import MeasurementSchemas, load_schema_file
from hub.pipeline import DeadLetterFile, Pipeline
from hub.registry import Registry
from hub.server import Hub
from hub.settings import Settings

log = logging.getLogger("hub")

SHUTDOWN_GRACE_S = 10.0


async def serve(settings: Settings) -> None:
    """Run the hub until SIGTERM or SIGINT; SIGHUP reloads the measurement schemas."""
    schemas = MeasurementSchemas(load_schema_file(settings.schemas))
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    registry = Registry(settings.registry_path)
    sink = await open_sink(settings)
    pipeline = Pipeline(sink, DeadLetterFile(settings.dead_letter_path), settings)
    pipeline.start()
    hub = Hub(settings, registry, schemas, pipeline)
    server = await hub.start()
    log.info(
        "hub listening on %s:%d, writing to %s (%s API, bucket %s)",
        settings.host,
        hub.port,
        settings.influx_url,
        sink.name,
        settings.influx_bucket,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload_schemas(hub))
    try:
        await stop.wait()
        log.info("stopping: refusing new connections, flushing what devices sent")
        hub.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pipeline.drain(), SHUTDOWN_GRACE_S)
        server.close()
        await server.wait_closed()
    finally:
        await pipeline.close()
        registry.close()
        log.info("stopped")


def _reload_schemas(hub: Hub) -> None:
    try:
        hub.schemas = MeasurementSchemas(load_schema_file(hub.settings.schemas))
    except Exception as exc:  # a bad file must not take the hub down
        log.error("schema reload failed, keeping the previous schemas: %s", exc)
        return
    log.info("measurement schemas reloaded from %s", hub.settings.schemas)
