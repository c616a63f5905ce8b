"""`hub serve` at run time: build the parts from settings, run until a signal, stop cleanly.

`HubService` is also what tests and benchmarks start in-process (`async with HubService(...)`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable
from types import TracebackType
from typing import Self

from hub.influx import Sink, open_sink
from hub.measurements import MeasurementSchemas, load_schema_file
from hub.pipeline import DeadLetterFile, Pipeline
from hub.registry import Registry
from hub.server import Hub
from hub.settings import Settings
from hub.spool import Spool

log = logging.getLogger("hub")


class HubService:
    """The running hub: registry, pipeline and WebSocket server, started and stopped together."""

    def __init__(self, settings: Settings, sink: Sink | None = None) -> None:
        self.settings = settings
        self._sink = sink
        self._hub: Hub | None = None

    @property
    def hub(self) -> Hub:
        """The WebSocket side, once started."""
        assert self._hub is not None, "start() first"
        return self._hub

    @property
    def url(self) -> str:
        """The address devices connect to."""
        return f"ws://{self.settings.host}:{self.hub.port}"

    async def start(self) -> None:
        """Open the registry and InfluxDB sink, start writing and listening."""
        settings = self.settings
        schemas = MeasurementSchemas(load_schema_file(settings.schemas))
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        registry = Registry(settings.registry_path)
        spool = Spool(settings.spool_dir, settings.spool_max_bytes)
        sink = self._sink
        if sink is None and settings.influx_url is not None:
            sink = await open_sink(settings)
        elif sink is None:
            log.warning(
                "no InfluxDB configured (--influx-url): readings are kept in the spool at %s "
                "and written to InfluxDB once one is configured",
                settings.spool_dir,
            )
        pipeline = Pipeline(sink, DeadLetterFile(settings.dead_letter_path), settings, spool)
        pipeline.start()
        self._hub = Hub(settings, registry, schemas, pipeline)
        await self._hub.start()
        log.info(
            "hub listening on %s:%d, writing to %s (%s API, bucket %s)",
            settings.host,
            self._hub.port,
            settings.influx_url or "nowhere yet (spool only)",
            sink.name if sink else "no",
            settings.influx_bucket,
        )

    async def stop(self) -> None:
        """Drain within `shutdown_timeout_s`: refuse new devices (503), make everything received
        durable (InfluxDB or spool), send its acks, close devices with 1001, stop writing."""
        hub = self.hub
        log.info("stopping: refusing new connections, flushing what devices sent")
        hub.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout_s

        async def within_deadline(step: Awaitable[None]) -> None:
            try:
                await asyncio.wait_for(step, max(0.1, deadline - loop.time()))
            except TimeoutError:
                log.warning("shutdown: giving up waiting; unacked readings will be resent")

        await within_deadline(hub.pipeline.drain())
        await within_deadline(hub.acks_sent())
        await hub.stop()
        await within_deadline(hub.pipeline.drain())  # the disconnect events
        await hub.pipeline.close()
        hub.registry.close()
        log.info("stopped")

    def reload(self) -> None:
        """Reload the measurement schemas; a bad file keeps the previous ones."""
        try:
            self.hub.schemas = MeasurementSchemas(load_schema_file(self.settings.schemas))
        except Exception as exc:  # a bad file must not take the hub down
            log.error("schema reload failed, keeping the previous schemas: %s", exc)
            return
        log.info("measurement schemas reloaded from %s", self.settings.schemas)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def serve(settings: Settings) -> None:
    """Run the hub until SIGTERM or SIGINT; SIGHUP reloads the measurement schemas."""
    service = HubService(settings)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload)
    try:
        await stop.wait()
    finally:
        await service.stop()
