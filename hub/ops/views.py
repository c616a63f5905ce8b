"""What the operator's side (metrics collectors, the health check) reads from a running hub.

Narrow, read-only protocols instead of the gateway's `Hub`: hub.ops depends on no part of
hub.gateway or hub.ingest (no import cycle, not even under TYPE_CHECKING), and a component
can be swapped for anything that shows these attributes. The service hands the real hub in;
mypy checks that it fits.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Protocol


class SpoolStatusView(Protocol):
    """What the spool holds, as `Spool.status()` reports it."""

    @property
    def segments(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def batches(self) -> int: ...
    @property
    def points(self) -> int: ...
    @property
    def oldest(self) -> float | None: ...
    @property
    def skipped_bytes(self) -> int: ...


class SpoolView(Protocol):
    """The disk spool: its limit and what it holds."""

    @property
    def max_bytes(self) -> int: ...
    def status(self) -> SpoolStatusView:
        """What the spool holds now."""
        ...


class DeadLetterStatusView(Protocol):
    """The dead-letter files' size and limit."""

    @property
    def size(self) -> int: ...
    @property
    def max_bytes(self) -> int: ...


class DeadLettersView(Protocol):
    """The dead-letter files."""

    @property
    def discarded_points(self) -> int: ...
    def status(self) -> DeadLetterStatusView:
        """The files' size and limit now."""
        ...


class PipelineCountersView(Protocol):
    """What the write pipeline has done since start."""

    @property
    def points_written(self) -> int: ...
    @property
    def batches_written(self) -> int: ...
    @property
    def points_spooled(self) -> int: ...
    @property
    def points_replayed(self) -> int: ...
    @property
    def retries(self) -> int: ...
    @property
    def dead_lettered_points(self) -> int: ...


class PipelineView(Protocol):
    """The write pipeline's state: pending readings, InfluxDB's health, spool, dead letters."""

    @property
    def pending(self) -> int: ...
    @property
    def healthy(self) -> bool: ...
    @property
    def spool_full(self) -> bool: ...
    @property
    def sink(self) -> object | None: ...
    @property
    def spool(self) -> SpoolView | None: ...
    @property
    def dead_letters(self) -> DeadLettersView: ...
    @property
    def counters(self) -> PipelineCountersView: ...


class HandshakeFailureCountsView(Protocol):
    """Failed handshakes and the blocks they caused."""

    @property
    def failures(self) -> int: ...
    @property
    def blocks(self) -> int: ...
    @property
    def refused_while_blocked(self) -> int: ...


class FailedHandshakesView(Protocol):
    """The limiter of failed handshakes per source address."""

    @property
    def counters(self) -> HandshakeFailureCountsView: ...


class StrangerCountsView(Protocol):
    """What unauthenticated clients did since start."""

    @property
    def over_source_cap(self) -> int: ...
    @property
    def header_timeouts(self) -> int: ...
    @property
    def headers_too_large(self) -> int: ...
    @property
    def handshake_errors(self) -> int: ...
    @property
    def proxy_header_errors(self) -> int: ...
    @property
    def log_lines_suppressed(self) -> int: ...


class StrangersView(Protocol):
    """The guard of connections still sending their request headers."""

    @property
    def limits(self) -> Sized: ...


class RegistryHealthView(Protocol):
    """Whether the registry answers (hub.gateway.registryhealth.RegistryHealth)."""

    @property
    def up(self) -> bool: ...
    @property
    def failures(self) -> int: ...
    def describe(self) -> str: ...


class HubView(Protocol):
    """The running hub as the collectors and the health check see it."""

    @property
    def connections(self) -> int: ...
    @property
    def listening(self) -> bool: ...
    @property
    def draining(self) -> bool: ...
    @property
    def accepting(self) -> bool: ...
    @property
    def pipeline(self) -> PipelineView: ...
    @property
    def failed_handshakes(self) -> FailedHandshakesView: ...
    @property
    def stranger_counts(self) -> StrangerCountsView: ...
    @property
    def strangers(self) -> StrangersView: ...
    @property
    def registry_health(self) -> RegistryHealthView: ...
