"""Each part of the hub's options, typed and frozen, derived from the one flat `Settings`.

The flat surface (flags, `HUB_` variables, credentials, TOML, `hub check-config`) stays
`hub.settings`; which flat setting belongs to which group is `hub.settings.GROUPS`, and
nowhere else. Here each part gets its options object, built from one or more of those groups
(`OPTION_GROUPS`) and from nothing else (tests/test_setting_groups.py reads what each
builder touches): a part never sees the whole `Settings`.

`HubOptions.of(settings)` builds them all; `hub.service` hands each part its own. On a SIGHUP
reload the service builds them again from the reloaded settings and gives each part whose
live options changed its new object (`live_changes`, then the part's `apply`): it never
reaches into a part.

The device session's own options are pure code's types: `hub.core.session.SessionLimits`
(with `FrameLimits` and `TimeLimits` inside) and `hub.core.measurements.ReadingLimits`;
they are built here too (`session_limits`, `reading_limits`, ...), so that pure code never
sees `Settings`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Self

from pydantic import SecretStr

from hub.core.frames import FrameLimits
from hub.core.measurements import ReadingLimits
from hub.core.readings import TimeLimits
from hub.core.session import SessionLimits
from hub.settings import GROUPS, InfluxApi, LogFormat, LogLevel, Settings, parse_rfc3339_ns


def frame_limits(settings: Settings) -> FrameLimits:
    """What one device frame may hold."""
    return FrameLimits(
        settings.max_readings_per_message,
        settings.max_nesting_depth,
        settings.max_objects_per_message,
    )


def time_limits(settings: Settings) -> TimeLimits:
    """Times no working clock produces (`min_time`, `max_future_s`)."""
    return _time_limits(settings.min_time, settings.max_future_s)


@functools.lru_cache(maxsize=8)
def _time_limits(min_time: str, max_future_s: float) -> TimeLimits:
    return TimeLimits(parse_rfc3339_ns(min_time) if min_time else None, int(max_future_s * 1e9))


def session_limits(settings: Settings) -> SessionLimits:
    """What one connection may do."""
    return SessionLimits(
        messages_per_s=settings.device_messages_per_s,
        readings_per_s=settings.device_readings_per_s,
        bytes_per_s=settings.device_bytes_per_s,
        burst_s=settings.device_burst_s,
        max_message_bytes=settings.max_message_bytes,
        max_unacked_messages=settings.max_unacked_messages,
        overload_close_s=settings.overload_close_s,
        shutdown_timeout_s=settings.shutdown_timeout_s,
        frame=frame_limits(settings),
        time=time_limits(settings),
    )


def reading_limits(settings: Settings) -> ReadingLimits:
    """How big one reading may be."""
    return ReadingLimits(
        settings.max_fields_per_reading,
        settings.max_tags_per_reading,
        settings.max_name_chars,
        settings.max_string_chars,
    )


@dataclass(frozen=True, slots=True)
class StorageOptions:
    """Where the hub keeps its state, and how much of the disk it may use."""

    registry_path: Path
    spool_dir: Path
    spool_max_bytes: int
    dead_letter_path: Path
    dead_letter_max_bytes: int
    state_dir: Path

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """The `storage` group."""
        return cls(
            settings.registry_path,
            settings.spool_dir,
            settings.spool_max_bytes,
            settings.dead_letter_path,
            settings.dead_letter_max_bytes,
            settings.state_dir,
        )


@dataclass(frozen=True, slots=True)
class RegistryOptions:
    """Which registry: SQLite in the state directory (`url` empty) or PostgreSQL; and this
    hub's node id on it (empty: the default, host name and port)."""

    url: str
    node_id: str

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """The `registry` group."""
        return cls(settings.registry_url, settings.node_id)


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How many processes serve the port (`hub serve --workers N`, hub.workers)."""

    count: int

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """The `workers` group."""
        return cls(settings.workers)


@dataclass(frozen=True, slots=True)
class DrainOptions:
    """How fast a draining hub closes its devices (hub.gateway.drain); live."""

    rate: float
    """Closes per second; 0: all at once."""

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """The `drain` group."""
        return cls(settings.drain_rate)


@dataclass(frozen=True, slots=True)
class FleetOptions:
    """How often the hub looks at the registry: operator changes, and presence."""

    registry_poll_s: float
    presence_flush_s: float

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """The `fleet` group."""
        return cls(settings.registry_poll_s, settings.presence_flush_s)


@dataclass(frozen=True, slots=True)
class ListenOptions:
    """The device port: where, TLS, compression, websockets' timeouts."""

    host: str
    port: int
    tls_cert: Path | None
    tls_key: Path | None
    compression: bool
    ping_interval_s: float
    ping_timeout_s: float
    handshake_timeout_s: float

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """The `listen` group."""
        return cls(
            settings.host,
            settings.port,
            settings.tls_cert,
            settings.tls_key,
            settings.compression,
            settings.ping_interval_s,
            settings.ping_timeout_s,
            settings.handshake_timeout_s,
        )


@dataclass(frozen=True, slots=True)
class AdmissionOptions:
    """Who is let in: the connection cap (live) and the limits on strangers."""

    max_connections: int
    allowed_origins: tuple[str, ...]
    auth_failures_burst: int
    auth_failures_per_min: float
    auth_block_s: float
    max_unauthenticated_per_source: int
    max_request_header_bytes: int
    request_header_timeout_s: float
    proxy_protocol_from: tuple[str, ...]
    registry_timeout_s: float
    registry_outage_admit_s: float

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """The `capacity` and `strangers` groups."""
        return cls(
            settings.max_connections,
            tuple(settings.allowed_origins),
            settings.auth_failures_burst,
            settings.auth_failures_per_min,
            settings.auth_block_s,
            settings.max_unauthenticated_per_source,
            settings.max_request_header_bytes,
            settings.request_header_timeout_s,
            tuple(settings.proxy_protocol_from),
            settings.registry_timeout_s,
            settings.registry_outage_admit_s,
        )


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    """Everything the WebSocket side (`hub.gateway.server.Hub`) uses, in its groups."""

    listen: ListenOptions
    admission: AdmissionOptions
    session: SessionLimits
    readings: ReadingLimits
    fleet: FleetOptions
    drain: DrainOptions

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """The gateway's groups."""
        return cls(
            ListenOptions.of(settings),
            AdmissionOptions.of(settings),
            session_limits(settings),
            reading_limits(settings),
            FleetOptions.of(settings),
            DrainOptions.of(settings),
        )


@dataclass(frozen=True, slots=True)
class InfluxOptions:
    """The server the pipeline writes to, and how to ask it."""

    url: str | None
    api: InfluxApi
    bucket: str
    org: str
    token: SecretStr | None
    timeout_s: float

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """The `influx` group."""
        return cls(
            settings.influx_url,
            settings.influx_api,
            settings.influx_bucket,
            settings.influx_org,
            settings.influx_token,
            settings.influx_timeout_s,
        )


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """The write pipeline's batching, backpressure (live), writers and retries."""

    batch_size: int
    flush_interval_s: float
    max_pending_readings: int
    max_inflight_writes: int
    write_deadline_s: float
    retry_initial_s: float
    retry_max_s: float

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """The `batching` and `backpressure` groups."""
        return cls(
            settings.batch_size,
            settings.flush_interval_s,
            settings.max_pending_readings,
            settings.max_inflight_writes,
            settings.write_deadline_s,
            settings.retry_initial_s,
            settings.retry_max_s,
        )


@dataclass(frozen=True, slots=True)
class LogOptions:
    """How much the hub logs (live), and in which format."""

    level: LogLevel
    format: LogFormat

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """The `log_level` and `log_format` groups."""
        return cls(settings.log_level, settings.log_format)


@dataclass(frozen=True, slots=True)
class HealthOptions:
    """The operator's listener: /healthz and /metrics."""

    enabled: bool
    host: str
    port: int

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """The `health` group."""
        return cls(settings.health_enabled, settings.health_host, settings.health_port)


@dataclass(frozen=True, slots=True)
class SchemaOptions:
    """The measurement schema file (live: a reload reads it again)."""

    path: Path | None

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """The `schemas` group."""
        return cls(settings.schemas)


@dataclass(frozen=True, slots=True)
class ServiceOptions:
    """What the service itself uses to stop."""

    shutdown_timeout_s: float

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """`shutdown_timeout_s` (of the `connection` group, which sessions get too)."""
        return cls(settings.shutdown_timeout_s)


OPTION_GROUPS: dict[type[Any], tuple[str, ...]] = {
    StorageOptions: ("storage",),
    RegistryOptions: ("registry",),
    WorkerOptions: ("workers",),
    FleetOptions: ("fleet",),
    DrainOptions: ("drain",),
    ListenOptions: ("listen",),
    AdmissionOptions: ("capacity", "strangers"),
    SessionLimits: ("device_rates", "message_counts", "time_range", "connection"),
    ReadingLimits: ("reading_size",),
    InfluxOptions: ("influx",),
    BatchOptions: ("batching", "backpressure"),
    LogOptions: ("log_level", "log_format"),
    HealthOptions: ("health",),
    SchemaOptions: ("schemas",),
    ServiceOptions: ("connection",),
}
"""The groups (`hub.settings.GROUPS`) each options object is built from, all of them:
whether it is live (replaced on a reload) follows from them."""

BUILDERS: dict[type[Any], Callable[[Settings], Any]] = {
    StorageOptions: StorageOptions.of,
    RegistryOptions: RegistryOptions.of,
    WorkerOptions: WorkerOptions.of,
    FleetOptions: FleetOptions.of,
    DrainOptions: DrainOptions.of,
    ListenOptions: ListenOptions.of,
    AdmissionOptions: AdmissionOptions.of,
    SessionLimits: session_limits,
    ReadingLimits: reading_limits,
    InfluxOptions: InfluxOptions.of,
    BatchOptions: BatchOptions.of,
    LogOptions: LogOptions.of,
    HealthOptions: HealthOptions.of,
    SchemaOptions: SchemaOptions.of,
    ServiceOptions: ServiceOptions.of,
}
"""How each options object of `OPTION_GROUPS` is built from `Settings`."""


def is_live(options: type[Any]) -> bool:
    """Whether a reload may change an options object of this type: one of its groups is live."""
    return any(GROUPS[group].live for group in OPTION_GROUPS[options])


@dataclass(frozen=True, slots=True)
class HubOptions:
    """Every part's options, from one `Settings`."""

    storage: StorageOptions
    registry: RegistryOptions
    workers: WorkerOptions
    gateway: GatewayOptions
    influx: InfluxOptions
    batch: BatchOptions
    log: LogOptions
    health: HealthOptions
    schemas: SchemaOptions
    service: ServiceOptions

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """All of them."""
        return cls(
            StorageOptions.of(settings),
            RegistryOptions.of(settings),
            WorkerOptions.of(settings),
            GatewayOptions.of(settings),
            InfluxOptions.of(settings),
            BatchOptions.of(settings),
            LogOptions.of(settings),
            HealthOptions.of(settings),
            SchemaOptions.of(settings),
            ServiceOptions.of(settings),
        )


def live_changes(current: HubOptions, fresh: HubOptions) -> dict[str, Any]:
    """The live options objects that differ between `current` and `fresh`, by their path in
    `HubOptions` (`batch`, `gateway.session`, ...): what a reload hands to the parts."""
    changed: dict[str, Any] = {}
    _diff(current, fresh, "", changed)
    return changed


def _diff(current: Any, fresh: Any, prefix: str, changed: dict[str, Any]) -> None:
    for field in fields(current):
        old, new = getattr(current, field.name), getattr(fresh, field.name)
        path = prefix + field.name
        if type(old) in OPTION_GROUPS:
            if is_live(type(old)) and old != new:
                changed[path] = new
        elif hasattr(old, "__dataclass_fields__"):
            _diff(old, new, path + ".", changed)
