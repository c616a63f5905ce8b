"""`hub serve` at run time: build the parts from settings, run until a signal, stop cleanly.

`HubService` is also what tests and benchmarks start in-process (`async with HubService(...)`).
Under systemd (`Type=notify`) it reports READY=1 once devices can connect, RELOADING=1 and
READY=1 around a SIGHUP reload, STOPPING=1 when asked to stop, and WATCHDOG=1 from its event
loop while that loop runs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

from hub.core.measurements import MeasurementSchemas, load_schema_file
from hub.errors import HubError
from hub.gateway.server import Hub
from hub.ingest.deadletters import DeadLetterFile
from hub.ingest.pipeline import Pipeline
from hub.ingest.sinks import Sink, open_sink
from hub.ingest.spool import Spool
from hub.ops.health import HealthServer
from hub.ops.logs import set_level
from hub.ops.metrics import HubMetrics
from hub.ops.runtime import tune_garbage_collector
from hub.ops.sdnotify import Notifier
from hub.options import HubOptions, live_changes
from hub.registry.backends import default_node_id, open_hub_registry
from hub.registry.sqlite import secure_state_dir
from hub.settings import Settings, reload_changes
from hub.workers.claims import NODE_ID_KEY
from hub.workers.slots import HEALTH_PORT_KEY, WorkerSlot, adopt_orphan_spools

log = logging.getLogger("hub")


class HubService:
    """The running hub: registry, pipeline and WebSocket server, started and stopped together."""

    def __init__(
        self,
        settings: Settings,
        sink: Sink | None = None,
        *,
        notifier: Notifier | None = None,
        load_settings: Callable[[], Settings] | None = None,
        worker: WorkerSlot | None = None,
    ) -> None:
        self.settings = settings
        self.options = HubOptions.of(settings)
        """Each part's options, from `settings`; a reload replaces the live ones."""
        self.worker = worker
        """The slot of one worker of `hub serve --workers N`; None for a hub of its own."""
        self._sink = sink
        self._hub: Hub | None = None
        self._health: HealthServer | None = None
        self._notifier = notifier or Notifier({})
        self._load_settings = load_settings
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def hub(self) -> Hub:
        """The WebSocket side, once started."""
        assert self._hub is not None, "start() first"
        return self._hub

    @property
    def url(self) -> str:
        """The address devices connect to."""
        listen = self.options.gateway.listen
        scheme = "wss" if listen.tls_cert is not None else "ws"
        return f"{scheme}://{listen.host}:{self.hub.port}"

    @property
    def health(self) -> HealthServer:
        """The /healthz and /metrics listener, once started (unless health_enabled is off)."""
        assert self._health is not None, "start() first, with health_enabled"
        return self._health

    async def start(self) -> None:
        """Open the registry and InfluxDB sink, start writing and listening."""
        options = self.options
        storage = options.storage
        schemas = MeasurementSchemas(load_schema_file(options.schemas.path))
        secure_state_dir(storage.state_dir)
        # SQLite: every registry query of the hub on one thread; PostgreSQL: a pool, the
        # schema migrated first. Neither blocks the loop.
        listen = options.gateway.listen
        worker = self.worker
        # A worker is a node of its own, NODE_ID/K: its claims are its own.
        node_id = (
            worker.node_id
            if worker is not None
            else options.registry.node_id or default_node_id(listen.port)
        )
        registry = await open_hub_registry(
            options.registry.url,
            storage.registry_path,
            options.gateway.fleet.registry_poll_s,
            node_id,
            f"{listen.host}:{listen.port}",
        )
        spool_dir = worker.spool_dir if worker is not None else storage.spool_dir
        if worker is None:  # a hub that had workers before: their spools replay here
            adopt_orphan_spools(storage.state_dir, spool_dir, workers=1)
        spool = Spool(spool_dir, storage.spool_max_bytes)  # locked: SpoolInUse if taken
        sink = self._sink
        if sink is None and options.influx.url is not None:
            sink = await open_sink(options.influx)
        elif sink is None:
            log.warning(
                "no InfluxDB configured (--influx-url): readings are kept in the spool at %s "
                "and written to InfluxDB once one is configured",
                storage.spool_dir,
            )
        metrics = HubMetrics()
        dead_letters = DeadLetterFile(
            worker.dead_letter_path if worker is not None else storage.dead_letter_path,
            storage.dead_letter_max_bytes,
        )
        influx = options.influx if options.influx.url is not None else None
        pipeline = Pipeline(sink, dead_letters, options.batch, spool, influx)
        metrics.watch_writes(pipeline.write_stats)
        pipeline.start()
        self._hub = Hub(
            options.gateway, registry, schemas, pipeline, metrics,
            node_id=node_id, one_of_workers=worker is not None,
            workers=worker.count if worker is not None else 1,
        )  # fmt: skip
        metrics.watch(self._hub)
        if options.health.enabled:
            self._health = HealthServer(
                self._hub, metrics, options.health.host, options.health.port
            )
            await self._health.start()
        try:
            await self._hub.start()
        except BaseException:
            if self._health is not None:
                await self._health.stop()
            raise
        log.info(
            "%s listening on %s:%d, writing to %s (%s API, bucket %s), on %s's event loop",
            f"{worker.name} ({worker.node_id})" if worker is not None else "hub",
            self._hub.host,
            self._hub.port,
            options.influx.url or "nowhere yet (spool only)",
            sink.name if sink else "no",
            options.influx.bucket,
            type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        if self._health is not None:
            log.info("health and metrics at %s/healthz and /metrics", self._health.url)
        # A worker tells its supervisor where its /healthz and /metrics are.
        health = () if self._health is None else (f"{HEALTH_PORT_KEY}={self._health.port}",)
        # ... and the node id it claims devices as, released by the supervisor if it dies.
        node = () if worker is None else (f"{NODE_ID_KEY}={worker.node_id}",)
        self._notifier.ready(f"listening on {self._hub.host}:{self._hub.port}", *health, *node)
        if self._notifier.watchdog_s is not None:
            self._watchdog = asyncio.create_task(self._notifier.keep_alive(), name="watchdog")

    async def stop(self) -> None:
        """Drain within `shutdown_timeout_s`: refuse new devices (503), make everything received
        durable (InfluxDB or spool), send its acks, close devices with 1001, stop writing."""
        hub = self.hub
        self._notifier.stopping()
        log.info("stopping: refusing new connections, flushing what devices sent")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.service.shutdown_timeout_s
        hub.begin_drain(self.options.service.shutdown_timeout_s)

        async def within_deadline(step: Awaitable[None]) -> None:
            try:
                async with asyncio.timeout(max(0.1, deadline - loop.time())):
                    await step
            except TimeoutError:
                log.warning("shutdown: giving up waiting; unacked readings will be resent")

        await within_deadline(hub.pipeline.drain())
        await within_deadline(hub.acks_sent())
        await hub.stop(max(0.1, deadline - loop.time()))
        await within_deadline(hub.pipeline.drain())  # the disconnect events
        await hub.pipeline.close()
        await within_deadline(hub.registry.close())
        if self._health is not None:
            await self._health.stop()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._notifier.close()
        log.info("stopped")

    def reload(self) -> None:
        """Reload the measurement schemas and the live settings (`LIVE_SETTINGS`) from the
        sources they came from; on any error, keep all of them as they were."""
        if self._hub is None:
            log.warning("reload asked for during start-up: the settings just loaded stay")
            return
        self._notifier.reloading()
        try:
            self._reload()
        finally:
            self._notifier.ready(f"listening on {self.hub.host}:{self.hub.port}")

    def _reload(self) -> None:
        live: dict[str, object] = {}
        if self._load_settings is not None:
            try:
                live, need_restart = reload_changes(self.settings, self._load_settings())
            except HubError as exc:
                log.error("reload failed, keeping the current settings and schemas: %s", exc)
                return
            if need_restart:
                log.warning(
                    "changed settings that apply only after a restart: %s",
                    ", ".join(need_restart),
                )
        settings = self.settings.model_copy(update=live)
        options = HubOptions.of(settings)
        try:
            reload_parts(self.hub, self.options, options)
        except Exception as exc:  # a bad file must not take the hub down
            log.error("schema reload failed, keeping the previous schemas and settings: %s", exc)
            return
        self.settings, self.options = settings, options
        log.info(
            "reloaded: measurement schemas from %s%s",
            options.schemas.path or "(none: every measurement accepted)",
            "".join(f", {name} = {value}" for name, value in live.items() if name != "schemas"),
        )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def reload_parts(hub: Hub, current: HubOptions, fresh: HubOptions) -> list[str]:
    """Reload: read the measurement schema file again, then hand each part whose live
    options changed its new ones (`live_changes`); the paths of those, in `HubOptions`. If
    the schema file cannot be read, it raises and nothing changes."""
    schemas = MeasurementSchemas(load_schema_file(fresh.schemas.path))
    changed = live_changes(current, fresh)
    hub.apply_schemas(schemas)
    if any(path.startswith("gateway.") for path in changed):
        hub.apply(fresh.gateway)
    if "batch" in changed:
        hub.pipeline.apply(fresh.batch)
    if "log" in changed:
        set_level(fresh.log.level)
    return sorted(changed)


async def serve(
    settings: Settings,
    load_settings: Callable[[], Settings] | None = None,
    worker: WorkerSlot | None = None,
) -> None:
    """Run the hub (or one `worker` of several) until SIGTERM or SIGINT, telling systemd (or
    the supervisor) how it goes; SIGHUP reloads the schemas and the live settings, which
    `load_settings` reads again from their sources."""
    service = HubService(settings, notifier=Notifier(), load_settings=load_settings, worker=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before start(): systemd may signal as soon as READY=1 is out.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload)
    await service.start()
    tune_garbage_collector()
    try:
        await stop.wait()
    finally:
        await service.stop()
