"""The narrow parts of the hub a device session uses: its ports.

A session gets an ingest port (room, submit), a config store, a presence sink, a validator
source, the metrics and a draining signal, each typed by what the session calls, so that
neither the session nor its tests need the whole hub (`hub.gateway.server.Hub`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from hub.core.dialects import Dialect
from hub.core.fieldtypes import FieldTypes
from hub.core.measurements import ReadingsValidator
from hub.ops.metrics import HubMetrics
from hub.registry.ports import ConfigStore


class IngestPort(Protocol):
    """What a session uses of the write pipeline: room, submit, and how to format."""

    @property
    def dialect(self) -> Dialect:
        """The dialect to format lines in now."""
        ...

    @property
    def field_types(self) -> FieldTypes | None:
        """The field types to check readings against, if the server has them."""
        ...

    def has_room(self, count: int) -> bool:
        """Whether `submit_nowait` of `count` points may be called now."""
        ...

    def submit_nowait(
        self, lines: str, count: int, dialect: Dialect | None = None
    ) -> asyncio.Future[None]:
        """Queue points without waiting; the future completes when they are durable."""
        ...

    async def submit(
        self, lines: str, count: int, dialect: Dialect | None = None
    ) -> asyncio.Future[None]:
        """Queue points, waiting for room first."""
        ...


class PresenceSink(Protocol):
    """Who is told that a device's readings were stored."""

    def stored(self, device_id: str, readings: int) -> None:
        """`readings` of the device's readings are durable."""
        ...


class ValidatorSource(Protocol):
    """Where the readings validator for a precision comes from (it changes on reload)."""

    def validator(self, ns_per_unit: int) -> ReadingsValidator:
        """The readings validator for one precision."""
        ...


class DrainSignal(Protocol):
    """Whether the hub is draining: sessions then stop reading and say goodbye."""

    @property
    def draining(self) -> bool:
        """True once the hub drains."""
        ...


@dataclass(frozen=True, slots=True)
class SessionPorts:
    """Everything a session uses beyond its connection: no more (never the whole hub)."""

    ingest: IngestPort
    configs: ConfigStore
    presence: PresenceSink
    validators: ValidatorSource
    metrics: HubMetrics
    drain: DrainSignal
