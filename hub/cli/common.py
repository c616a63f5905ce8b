"""What every `hub` subcommand shares: the options that find settings and the registry,
and error exits."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer

from hub.errors import HubError
from hub.registry.backends import open_operator
from hub.registry.operator import OperatorRegistry
from hub.settings import Settings, load_settings

T = TypeVar("T")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="TOML config file (also HUB_CONFIG).", show_default=False),
]
StateDirOption = Annotated[
    Path | None,
    typer.Option(
        help="State directory: registry, dead letters (also HUB_STATE_DIR).", show_default=False
    ),
]
RegistryUrlOption = Annotated[
    str | None,
    typer.Option(
        help="The registry: postgresql://USER@HOST:PORT/DB, or empty for SQLite in the state "
        "directory (also HUB_REGISTRY_URL). Keep its password in ~/.pgpass.",
        show_default=False,
    ),
]


def fail(message: str) -> NoReturn:
    """Print `error: message` on stderr and exit with status 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def settings_from(config: Path | None, **flags: object) -> Settings:
    """Settings from flags, environment and config file, or a clean exit saying why not."""
    try:
        return load_settings(config, **flags)
    except HubError as exc:
        fail(str(exc))


def with_registry(settings: Settings, work: Callable[[OperatorRegistry], Awaitable[T]]) -> T:
    """`work(registry)` on the registry the settings name (SQLite or PostgreSQL), closed
    after; a clean exit saying why if the registry cannot be opened or refuses."""

    async def run() -> T:
        registry = await open_operator(settings.registry_url, settings.registry_path)
        try:
            return await work(registry)
        finally:
            await registry.close()

    try:
        return asyncio.run(run())
    except HubError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot open the registry in {settings.state_dir}: {exc.strerror}")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in `0`, `90s`, `30m`, `1h` or `7d`; a clean exit if it is none of those."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        fail(f"not a duration: {text!r}; write it as 0, 90s, 30m, 1h or 7d")
    if not 0 <= seconds < float("inf"):
        fail(f"not a duration: {text!r}; it must be 0 or more")
    return seconds


def when(timestamp: float | None) -> str | None:
    """A UTC time for people, or None."""
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
