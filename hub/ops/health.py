"""The operator's listener: `GET /healthz` and `GET /metrics`, apart from the devices' port.

`/healthz` answers 200 while the hub accepts devices (listening, not draining, below
`max_connections`) and can store what they send (InfluxDB takes writes, or the spool takes
the batches InfluxDB cannot); 503 otherwise. Either way the body is JSON with the checks and,
when unhealthy, the reasons. InfluxDB's state is that of the last write: the check itself
sends nothing to InfluxDB, so polling it often costs nothing. `/metrics` is the Prometheus
text format (see `hub.metrics`). It listens on `health_host` (127.0.0.1 by default): put it
behind nginx, or let Prometheus scrape it locally, rather than opening it to the network.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hub.errors import HubError
from hub.ops.metrics import HubMetrics
from hub.ops.views import HubView


@dataclass(frozen=True, slots=True)
class HealthInputs:
    """What the health verdict depends on, read from the running hub."""

    listening: bool
    draining: bool
    accepting: bool
    influx_configured: bool
    influx_healthy: bool
    has_spool: bool
    spool_full: bool
    registry: str = "ok"
    """"ok", or "unavailable for N s": then new devices get 503, connected ones go on."""


@dataclass(frozen=True, slots=True)
class Health:
    """The verdict: healthy or not, why not, and what else an operator should know."""

    healthy: bool
    accepting: bool
    storing: bool
    influxdb: str
    registry: str = "ok"
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def assess(inputs: HealthInputs) -> Health:
    """The health verdict. Pure."""
    reasons: list[str] = []
    warnings: list[str] = []
    if not inputs.listening:
        reasons.append("not listening for devices")
    elif inputs.draining:
        reasons.append("shutting down: refusing new devices")
    elif not inputs.accepting:
        reasons.append("at max_connections: refusing new devices")
    accepting = not reasons
    if not inputs.influx_configured:
        influxdb = "not configured"
    else:
        influxdb = "ok" if inputs.influx_healthy else "failing"
    spool_takes = inputs.has_spool and not inputs.spool_full
    storing = inputs.influx_healthy or spool_takes
    if not storing:
        if inputs.has_spool:
            reasons.append(f"InfluxDB {influxdb} and the spool is full: acks wait")
        else:
            reasons.append(f"InfluxDB {influxdb} and no spool: acks wait")
    elif not inputs.influx_healthy:
        warnings.append(f"InfluxDB {influxdb}: batches go to the spool")
    if inputs.registry != "ok":
        # A warning, not a 503: every hub shares the registry, and a balancer taking them
        # all out would cut the devices that are still streaming.
        warnings.append(
            f"registry {inputs.registry}: new devices get 503, connected ones keep streaming"
        )
    return Health(
        accepting and storing, accepting, storing, influxdb, inputs.registry, reasons, warnings
    )


def inputs_of(hub: HubView) -> HealthInputs:
    """Read the health inputs from a running hub."""
    pipeline = hub.pipeline
    return HealthInputs(
        listening=hub.listening,
        draining=hub.draining,
        accepting=hub.accepting,
        influx_configured=pipeline.sink is not None,
        influx_healthy=pipeline.healthy,
        has_spool=pipeline.spool is not None,
        spool_full=pipeline.spool_full,
        registry=hub.registry_health.describe(),
    )


class HealthServer:
    """Serves `/healthz` and `/metrics` for one hub."""

    def __init__(self, hub: HubView, metrics: HubMetrics, host: str, port: int) -> None:
        self.hub = hub
        self.metrics = metrics
        self.host = host
        self._port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen; a port that cannot be bound is a `HubError` saying which."""
        self._runner = await serve_operator_listener(
            self.host, self._port, self._healthz, self._metrics
        )

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        assert self._runner is not None, "start() first"
        address: Any = self._runner.addresses[0]
        return int(address[1])

    @property
    def url(self) -> str:
        """`http://host:port`."""
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        health = assess(inputs_of(self.hub))
        body: dict[str, Any] = {"status": "ok" if health.healthy else "unavailable"}
        body.update(asdict(health))
        return web.json_response(body, status=200 if health.healthy else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve_operator_listener(
    host: str, port: int, healthz: Handler, metrics: Handler
) -> web.AppRunner:
    """Serve `GET /healthz` and `GET /metrics` on `host:port` (a hub's, or a supervisor's
    for its workers); a port that cannot be bound is a `HubError` saying which."""
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        reason = exc.strerror
        raise HubError(f"cannot listen for health checks on {host}:{port}: {reason}") from None
    return runner
