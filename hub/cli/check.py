"""`hub check-config`: validate the configuration and show what `hub serve` would run with."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import typer
from pydantic import SecretStr

from hub.cli.common import ConfigOption, RegistryUrlOption, StateDirOption, fail, settings_from
from hub.core.measurements import load_schema_file
from hub.errors import HubError
from hub.ops.logs import redact
from hub.options import InfluxOptions
from hub.registry.url import has_password
from hub.settings import LIVE_SETTINGS, Settings, setting_origins


def check_config(
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    registry_url: RegistryUrlOption = None,
) -> None:
    """Validate the settings (flags, HUB_ environment, credentials, config file) and the
    schema file; print the effective configuration with secrets masked."""
    settings = settings_from(config, state_dir=state_dir, registry_url=registry_url)
    try:
        load_schema_file(settings.schemas)
        if settings.influx_api == "v1":
            from hub.ingest.sinks import V1Sink

            V1Sink(InfluxOptions.of(settings))  # checks that the token is user:password
    except HubError as exc:
        fail(str(exc))
    if has_password(settings.registry_url):
        typer.echo(
            "warning: registry_url holds a password; put it in the hub user's ~/.pgpass "
            "instead (URLs show in process listings)",
            err=True,
        )
    origins = setting_origins(config, state_dir=state_dir, registry_url=registry_url)
    typer.echo(
        "# effective configuration; precedence: flag, HUB_ environment, credential, "
        "config file, default"
    )
    for line in describe(settings, origins):
        typer.echo(line)
    typer.echo("configuration OK", err=True)


def describe(settings: Settings, origins: Mapping[str, str]) -> list[str]:
    """The settings as TOML lines, each commented with its origin; secrets masked. Pure."""
    rows = []
    for name in Settings.model_fields:
        value = getattr(settings, name)
        text = f"# {name} is not set" if value is None else f"{name} = {toml_value(value)}"
        note = origins.get(name, "default") + (", SIGHUP reloads" if name in LIVE_SETTINGS else "")
        rows.append((text, note))
    width = max(len(text) for text, _ in rows)
    return [f"{text:<{width}}  # {note}" for text, note in rows]


def toml_value(value: object) -> str:
    """A setting's value as TOML; secrets as "***", passwords in URLs too."""
    if isinstance(value, SecretStr):
        return '"***"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    text = str(value) if isinstance(value, Path) else redact(str(value))
    return json.dumps(text, ensure_ascii=False)
