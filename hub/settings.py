"""The hub's settings, apart from the runtime objects that use them.

Each setting comes from, highest precedence first:

1. a command-line flag (`--influx-url`);
2. a `HUB_` environment variable named after it (`HUB_INFLUX_URL`);
3. a systemd credential named after it (`LoadCredential=influx_token:...`), read from
   `$CREDENTIALS_DIRECTORY`; an empty credential counts as not given;
4. the TOML config file given by `--config` or `HUB_CONFIG` (`influx_url = "..."`);
5. the default below.

The flat settings fall into `GROUPS`, one typed options object per part of the hub
(`hub.options`); `LIVE_SETTINGS`, those a SIGHUP applies to the running hub, are the live
groups' settings; the others need a restart.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from hub.core.proxyheader import parse_networks
from hub.errors import ConfigError
from hub.registry.url import check_registry_url

InfluxApi = Literal["auto", "v1", "v2"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["text", "json"]


@dataclass(frozen=True, slots=True)
class SettingGroup:
    """Flat settings that parts of the hub get together, in one typed options object
    (`hub.options`); a live group is replaced in those parts on a SIGHUP reload."""

    settings: tuple[str, ...]
    live: bool = False


GROUPS: dict[str, SettingGroup] = {
    # The one place that says which flat setting belongs to which group: each setting to
    # exactly one (tests/test_setting_groups.py). A group is live or not as a whole, so a
    # part that takes live and restart-only settings is built from two groups.
    "storage": SettingGroup(("state_dir", "spool_max_bytes", "dead_letter_max_bytes")),
    "schemas": SettingGroup(("schemas",), live=True),
    "listen": SettingGroup(
        (
            "host",
            "port",
            "tls_cert",
            "tls_key",
            "compression",
            "ping_interval_s",
            "ping_timeout_s",
            "handshake_timeout_s",
        )
    ),
    "influx": SettingGroup(
        (
            "influx_url",
            "influx_api",
            "influx_bucket",
            "influx_org",
            "influx_token",
            "influx_timeout_s",
        )
    ),
    "batching": SettingGroup(
        (
            "batch_size",
            "flush_interval_s",
            "max_inflight_writes",
            "retry_initial_s",
            "retry_max_s",
            "write_deadline_s",
        )
    ),
    "backpressure": SettingGroup(("max_pending_readings",), live=True),
    "reading_size": SettingGroup(
        ("max_fields_per_reading", "max_tags_per_reading", "max_name_chars", "max_string_chars")
    ),
    "message_counts": SettingGroup(
        ("max_readings_per_message", "max_objects_per_message"), live=True
    ),
    "connection": SettingGroup(
        (
            "max_message_bytes",
            "max_nesting_depth",
            "max_unacked_messages",
            "overload_close_s",
            "shutdown_timeout_s",
        )
    ),
    "device_rates": SettingGroup(
        ("device_messages_per_s", "device_readings_per_s", "device_bytes_per_s", "device_burst_s"),
        live=True,
    ),
    "time_range": SettingGroup(("min_time", "max_future_s"), live=True),
    "capacity": SettingGroup(("max_connections",), live=True),
    "strangers": SettingGroup(
        (
            "allowed_origins",
            "auth_failures_burst",
            "auth_failures_per_min",
            "auth_block_s",
            "max_unauthenticated_per_source",
            "max_request_header_bytes",
            "request_header_timeout_s",
            "proxy_protocol_from",
            "registry_timeout_s",
            "registry_outage_admit_s",
        )
    ),
    "fleet": SettingGroup(("registry_poll_s", "presence_flush_s")),
    "drain": SettingGroup(("drain_rate",), live=True),
    "registry": SettingGroup(("registry_url", "node_id")),
    "workers": SettingGroup(("workers",)),
    "log_level": SettingGroup(("log_level",), live=True),
    "log_format": SettingGroup(("log_format",)),
    "health": SettingGroup(("health_enabled", "health_host", "health_port")),
}
"""Every flat setting, by group; `hub.options` builds the parts' options from these."""

LIVE_SETTINGS = frozenset(
    name for group in GROUPS.values() if group.live for name in group.settings
)
"""Settings a SIGHUP reload applies without a restart (to open connections too): those of
the live groups."""

_config_file: ContextVar[Path | None] = ContextVar("hub_config_file", default=None)


def default_state_dir() -> Path:
    """systemd's StateDirectory when run as a unit, else the user's XDG state directory."""
    if systemd_state := os.environ.get("STATE_DIRECTORY"):
        return Path(systemd_state.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "sensor-hub"


PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class Settings(BaseSettings):
    """Everything `hub serve` and the operator commands can be told."""

    model_config = SettingsConfigDict(env_prefix="HUB_", extra="forbid", frozen=True)

    # Where things live
    state_dir: Path = Field(default_factory=default_state_dir)
    schemas: Path | None = None

    # Listening
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8765

    # Workers (hub.workers): processes accepting on one port, and this hub's name
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    node_id: Annotated[str, Field(max_length=200, pattern=r"^[^\s/]*$")] = ""
    """This hub's name among those sharing a registry (`hub nodes`, `hub devices`); empty:
    HOSTNAME:PORT. Worker K of several is NODE_ID/K."""

    # InfluxDB
    influx_url: str | None = None
    influx_api: InfluxApi = "auto"
    influx_bucket: str = "sensors"
    influx_org: str = ""
    influx_token: SecretStr | None = None
    influx_timeout_s: PositiveFloat = 10.0

    # Batching
    batch_size: PositiveInt = 5000
    flush_interval_s: PositiveFloat = 0.02
    max_inflight_writes: PositiveInt = 4
    max_pending_readings: PositiveInt = 100_000
    retry_initial_s: PositiveFloat = 0.2
    retry_max_s: PositiveFloat = 10.0
    write_deadline_s: PositiveFloat = 3.0

    # Spool and dead letters
    spool_max_bytes: PositiveInt = 512 * 2**20
    dead_letter_max_bytes: Annotated[int, Field(ge=64 * 1024)] = 64 * 2**20

    # Limits
    max_message_bytes: PositiveInt = 2**20
    max_readings_per_message: PositiveInt = 5000
    max_objects_per_message: PositiveInt = 2**18
    max_fields_per_reading: PositiveInt = 100
    max_tags_per_reading: PositiveInt = 32
    max_name_chars: PositiveInt = 256
    max_string_chars: PositiveInt = 4096
    max_nesting_depth: Annotated[int, Field(ge=4)] = 8
    max_connections: PositiveInt = 20_000
    max_unacked_messages: PositiveInt = 64
    device_messages_per_s: PositiveFloat = 100.0
    device_readings_per_s: PositiveFloat = 50_000.0
    device_bytes_per_s: PositiveFloat = 4.0 * 2**20
    device_burst_s: PositiveFloat = 2.0
    overload_close_s: PositiveFloat = 15.0
    auth_failures_burst: Annotated[int, Field(ge=0)] = 10
    auth_failures_per_min: PositiveFloat = 6.0
    auth_block_s: PositiveFloat = 300.0
    max_unauthenticated_per_source: PositiveInt = 4096
    max_request_header_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024

    # Times no working clock produces (rejected in the ack)
    min_time: str = "2015-01-01T00:00:00Z"
    """RFC 3339; a reading timestamped before it is refused ("clock not set?"); empty: off."""
    max_future_s: PositiveFloat = 3600.0
    """A reading timestamped more than this ahead of the hub's clock is refused."""

    # Security
    allowed_origins: list[str] = []
    proxy_protocol_from: list[str] = []
    """Balancers (addresses or CIDR networks) whose connections start with a PROXY header
    naming the device's address; required from them, ignored from anyone else."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    compression: bool = False

    # Timeouts
    ping_interval_s: PositiveFloat = 20.0
    ping_timeout_s: PositiveFloat = 20.0
    handshake_timeout_s: PositiveFloat = 10.0
    request_header_timeout_s: PositiveFloat = 3.0
    shutdown_timeout_s: PositiveFloat = 10.0
    drain_rate: Annotated[float, Field(ge=0)] = 200.0
    """Closes per second (1001) of a draining hub's devices, faster if they would not all be
    closed within `shutdown_timeout_s`; 0: all at once (hub/gateway/drain.py)."""

    # Fleet
    registry_timeout_s: PositiveFloat = 5.0
    """A registry call (a handshake's token lookup, a presence flush) that takes longer
    counts as the registry being unavailable: the handshake gets 503 with Retry-After."""
    registry_outage_admit_s: Annotated[float, Field(ge=0)] = 0.0
    """While the registry is unavailable, let in a token this hub verified within this many
    seconds (0: nobody; see hub/gateway/registryhealth.py for the trade-off)."""
    registry_url: str = ""
    """Empty: SQLite in the state directory; `postgresql://USER@HOST:PORT/DB`: shared."""
    registry_poll_s: PositiveFloat = 0.01
    presence_flush_s: PositiveFloat = 0.5

    # Logging
    log_level: LogLevel = "INFO"
    log_format: LogFormat = "text"

    # Health and metrics (GET /healthz, /metrics)
    health_enabled: bool = True
    health_host: str = "127.0.0.1"
    health_port: Annotated[int, Field(ge=0, le=65535)] = 9765

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        if credentials := os.environ.get("CREDENTIALS_DIRECTORY"):
            sources.append(_CredentialsSource(settings_cls, Path(credentials)))
        if (path := _config_file.get()) is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator("min_time")
    @classmethod
    def _rfc3339(cls, value: str) -> str:
        if value.strip():
            parse_rfc3339_ns(value)  # raises ValueError with the reason
        return value.strip()

    @field_validator("proxy_protocol_from")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        parse_networks(value)  # raises ValueError naming the bad entry
        return [text.strip() for text in value]

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        return self

    @field_validator("registry_url")
    @classmethod
    def _registry_url(cls, value: str) -> str:
        return check_registry_url(value)  # raises ValueError naming the setting

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        if len(value) > 200 or not value.isprintable():
            raise ValueError("node_id is at most 200 printable characters")
        return value

    @property
    def registry_path(self) -> Path:
        """The SQLite device registry."""
        return self.state_dir / "registry.sqlite3"

    @property
    def spool_dir(self) -> Path:
        """Batches waiting for InfluxDB, durable on disk."""
        return self.state_dir / "spool"

    @property
    def dead_letter_path(self) -> Path:
        """Batches InfluxDB refused for good, one JSON object a line."""
        return self.state_dir / "dead-letters.jsonl"


def parse_rfc3339_ns(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time (`2015-01-01T00:00:00Z`, an offset
    is required); ValueError saying what is wrong otherwise."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time like 2015-01-01T00:00:00Z") from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone: end it with Z or an offset like +02:00")
    since = moment - _EPOCH  # exact, unlike the float of moment.timestamp()
    return (since.days * 86_400 + since.seconds) * 1_000_000_000 + since.microseconds * 1000


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Build settings from flags (None means not given), environment and config file."""
    config_file = config_file or _env_path("HUB_CONFIG")
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file {config_file} does not exist")
    token = _config_file.set(config_file)
    try:
        return Settings(**{key: value for key, value in flags.items() if value is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise ConfigError(f"invalid settings: {problems}") from None
    except ValueError as exc:  # an unreadable TOML file
        raise ConfigError(f"config file {config_file}: {exc}") from None
    finally:
        _config_file.reset(token)


class _CredentialsSource(SecretsSettingsSource):
    """systemd credentials named after settings; empty ones (a `SetCredential=` default)
    count as not given."""

    def __init__(self, settings_cls: type[BaseSettings], directory: Path) -> None:
        super().__init__(settings_cls, secrets_dir=directory, env_prefix="")

    def __call__(self) -> dict[str, Any]:
        return {key: value for key, value in super().__call__().items() if value != ""}


def setting_origins(config_file: Path | None = None, **flags: Any) -> dict[str, str]:
    """Where each setting's value comes from (`load_settings` with the same arguments):
    `flag`, `environment`, `credential`, `config file` or `default`."""
    config_file = config_file or _env_path("HUB_CONFIG")
    given = {key: value for key, value in flags.items() if value is not None}
    token = _config_file.set(config_file)
    try:
        sources = Settings.settings_customise_sources(
            Settings,
            init_settings=InitSettingsSource(Settings, given),
            env_settings=EnvSettingsSource(Settings),
            dotenv_settings=DotEnvSettingsSource(Settings),
            file_secret_settings=SecretsSettingsSource(Settings),
        )
        origins: dict[str, str] = {}
        for source in reversed(sources):  # lowest precedence first: higher ones overwrite
            for name in source():
                origins[name] = _ORIGINS.get(type(source), type(source).__name__)
    finally:
        _config_file.reset(token)
    return {name: origins.get(name, "default") for name in Settings.model_fields}


def reload_changes(current: Settings, fresh: Settings) -> tuple[dict[str, Any], list[str]]:
    """What reloading `fresh` over `current` changes: the live settings to apply now, and
    the names of changed settings that need a restart."""
    changed = [
        name for name in Settings.model_fields if getattr(current, name) != getattr(fresh, name)
    ]
    live = {name: getattr(fresh, name) for name in changed if name in LIVE_SETTINGS}
    return live, [name for name in changed if name not in LIVE_SETTINGS]


_ORIGINS: dict[type[PydanticBaseSettingsSource], str] = {
    InitSettingsSource: "flag",
    EnvSettingsSource: "environment",
    _CredentialsSource: "credential",
    TomlConfigSettingsSource: "config file",
}


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None
