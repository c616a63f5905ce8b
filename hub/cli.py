"""The `hub` command: a thin shell that builds settings and hands them to the runtime."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from hub.cli_common import ConfigOption, StateDirOption, fail, open_registry, settings_from, when
from hub.cli_fleet import config_app, device_app, devices_command, parse_assignments, spool_app
from hub.errors import HubError
from hub.logs import configure_logging
from hub.settings import InfluxApi, LogLevel

app = typer.Typer(
    help="IoT sensor ingestion hub: devices stream readings over WebSocket into InfluxDB.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
token_app = typer.Typer(help="Issue, list and revoke device tokens.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(config_app, name="config")
app.add_typer(device_app, name="device")
app.add_typer(spool_app, name="spool")
app.command("devices")(devices_command)


@app.command()
def serve(
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on [8765].")] = None,
    influx_url: Annotated[str | None, typer.Option(help="InfluxDB base URL.")] = None,
    influx_bucket: Annotated[
        str | None, typer.Option(help="v2 bucket, or v1 database as db or db/rp [sensors].")
    ] = None,
    influx_org: Annotated[str | None, typer.Option(help="v2 organisation.")] = None,
    influx_token: Annotated[
        str | None,
        typer.Option(
            help="v2 token, or v1 user:password. Prefer HUB_INFLUX_TOKEN: flags show in ps."
        ),
    ] = None,
    influx_api: Annotated[
        InfluxApi | None, typer.Option(help="Write API: auto asks /ping [auto].")
    ] = None,
    schemas: Annotated[Path | None, typer.Option(help="Measurement schema file (TOML).")] = None,
    log_level: Annotated[LogLevel | None, typer.Option(help="Log level [INFO].")] = None,
) -> None:
    """Accept device connections and write their readings to InfluxDB."""
    settings = settings_from(
        config,
        state_dir=state_dir,
        host=host,
        port=port,
        influx_url=influx_url,
        influx_bucket=influx_bucket,
        influx_org=influx_org,
        influx_token=influx_token,
        influx_api=influx_api,
        schemas=schemas,
        log_level=log_level,
    )
    configure_logging(settings.log_level)
    from hub.service import serve as run_service

    try:
        asyncio.run(run_service(settings))
    except HubError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}")


@token_app.command("add")
def token_add(
    device_id: Annotated[str, typer.Argument(help="The new device's id.")],
    label: Annotated[
        list[str] | None, typer.Option(help="A label key=value for fleet pushes; repeatable.")
    ] = None,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Register a device and print its token, the only line on stdout. Shown once only."""
    labels = parse_assignments(label or [], json_values=False)
    registry = open_registry(config, state_dir)
    try:
        token = registry.add(device_id, labels)
    except HubError as exc:
        fail(str(exc))
    finally:
        registry.close()
    sys.stdout.write(token + "\n")


@token_app.command("list")
def token_list(config: ConfigOption = None, state_dir: StateDirOption = None) -> None:
    """List devices and whether their token is active (tokens themselves are never shown)."""
    registry = open_registry(config, state_dir)
    try:
        devices = registry.devices()
    finally:
        registry.close()
    if not devices:
        typer.echo("no devices registered; add one with: hub token add DEVICE_ID", err=True)
        return
    typer.echo(f"{'DEVICE':<40} {'STATUS':<8} CREATED")
    for device in devices:
        status = "active" if device.active else "revoked"
        typer.echo(f"{device.device_id:<40} {status:<8} {when(device.created_at)}")


@token_app.command("revoke")
def token_revoke(
    device_id: Annotated[str, typer.Argument(help="The device whose token stops working.")],
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Revoke a device's token; the device can no longer connect."""
    registry = open_registry(config, state_dir)
    try:
        registry.revoke(device_id)
    except HubError as exc:
        fail(str(exc))
    finally:
        registry.close()
    typer.echo(f"revoked {device_id}", err=True)
