"""The supervisor's `/healthz` and `/metrics`, at `health_host:health_port`: the workers'.

Each worker serves its own on a free loopback port and says which with its READY=1; this
listener asks every worker that listens (in parallel, each within `WORKER_ANSWER_S`) and
answers for the hub (`hub.workers.exposition`: why one listener, and the `worker` label).
It adds the supervisor's own families: how many workers there should be, how many listen,
and how often each slot was restarted.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hub.ops.health import serve_operator_listener
from hub.settings import Settings
from hub.workers.exposition import WORKER_LABEL, combine_health, merge_expositions, render
from hub.workers.policy import SlotState
from hub.workers.slots import WORKER_HEALTH_HOST

WORKER_ANSWER_S = 2.0


class SupervisedView(Protocol):
    """What the listener reads of the supervisor."""

    settings: Settings
    slots: list[SlotState]


class SupervisorHealth:
    """Serves the hub's /healthz and /metrics from its workers' answers."""

    def __init__(self, supervisor: SupervisedView) -> None:
        self.supervisor = supervisor
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Listen; a port that cannot be bound is a `HubError` saying which."""
        settings = self.supervisor.settings
        self._runner = await serve_operator_listener(
            settings.health_host, settings.health_port, self._healthz, self._metrics
        )
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WORKER_ANSWER_S))

    async def stop(self) -> None:
        """Stop listening."""
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _ask(self, slot: SlotState, path: str) -> str | None:
        if slot.health_port is None or self._client is None:
            return None
        url = f"http://{WORKER_HEALTH_HOST}:{slot.health_port}{path}"
        try:
            async with self._client.get(url) as response:
                return await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def _ask_all(self, path: str) -> dict[str, str | None]:
        slots = self.supervisor.slots
        answers = await asyncio.gather(*(self._ask(slot, path) for slot in slots))
        return {str(slot.number): answer for slot, answer in zip(slots, answers, strict=True)}

    async def _healthz(self, request: web.Request) -> web.Response:
        bodies: dict[str, dict[str, Any] | None] = {}
        for worker, text in (await self._ask_all("/healthz")).items():
            try:
                bodies[worker] = json.loads(text) if text is not None else None
            except ValueError:
                bodies[worker] = None
        combined = combine_health(bodies)
        for slot in self.supervisor.slots:  # which process holds each slot, and how often
            combined.body["workers"][str(slot.number)].update(pid=slot.pid, restarts=slot.restarts)
        return web.json_response(combined.body, status=combined.status)

    async def _metrics(self, request: web.Request) -> web.Response:
        texts = await self._ask_all("/metrics")
        families = merge_expositions({w: t for w, t in texts.items() if t is not None})
        body = render([*families, *self._own_families()])
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _own_families(self) -> list[Metric]:
        slots = self.supervisor.slots
        configured = GaugeMetricFamily("hub_workers", "Worker processes the hub runs.")
        configured.add_metric([], len(slots))
        ready = GaugeMetricFamily(
            "hub_worker_up",
            "Whether the worker's process listens for devices.",
            labels=[WORKER_LABEL],
        )
        restarts = CounterMetricFamily(
            "hub_worker_restarts",
            "Times the supervisor started a worker again after it died.",
            labels=[WORKER_LABEL],
        )
        for slot in slots:
            ready.add_metric([str(slot.number)], 1.0 if slot.ready else 0.0)
            restarts.add_metric([str(slot.number)], slot.restarts)
        return [configured, ready, restarts]
