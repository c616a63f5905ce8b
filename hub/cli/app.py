"""The `hub` command: a thin shell that builds settings and hands them to the runtime."""

from __future__ import annotations

import contextlib
import csv
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TextIO

import typer

from hub.cli.check import check_config
from hub.cli.common import (
    ConfigOption,
    RegistryUrlOption,
    StateDirOption,
    fail,
    parse_duration,
    settings_from,
    when,
    with_registry,
)
from hub.cli.fleet import config_app, device_app, devices_command, nodes_command, parse_assignments
from hub.cli.spool import spool_app
from hub.cli.top import top_command
from hub.errors import HubError
from hub.ops.logs import configure_logging, tag_worker_lines
from hub.registry.url import has_password
from hub.settings import InfluxApi, LogFormat, LogLevel, Settings, load_settings

app = typer.Typer(
    help="IoT sensor ingestion hub: devices stream readings over WebSocket into InfluxDB.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
token_app = typer.Typer(help="Issue, list, rotate and revoke device tokens.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(config_app, name="config")
app.add_typer(device_app, name="device")
app.add_typer(spool_app, name="spool")
app.command("devices")(devices_command)
app.command("nodes")(nodes_command)
app.command("check-config")(check_config)
app.command("top")(top_command)


@app.command()
def serve(
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    registry_url: RegistryUrlOption = None,
    node_id: Annotated[
        str | None,
        typer.Option(
            help="This hub's name on a shared registry [HOSTNAME:PORT].", show_default=False
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on [8765].")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes accepting on the port [1].")
    ] = None,
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
    min_time: Annotated[
        str | None,
        typer.Option(help='Refuse readings timed earlier (RFC 3339; "" for none) [2015-01-01].'),
    ] = None,
    max_future_s: Annotated[
        float | None, typer.Option(help="Refuse readings timed further ahead, in s [3600].")
    ] = None,
    log_level: Annotated[LogLevel | None, typer.Option(help="Log level [INFO].")] = None,
    log_format: Annotated[
        LogFormat | None, typer.Option(help="Log lines as text or JSON [text].")
    ] = None,
    health_host: Annotated[
        str | None, typer.Option(help="Address of /healthz and /metrics [127.0.0.1].")
    ] = None,
    health_port: Annotated[
        int | None, typer.Option(help="Port of /healthz and /metrics, 0 for any [9765].")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate (chain): serve wss:// directly.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    dead_letter_max_bytes: Annotated[
        int | None,
        typer.Option(help="Size of the dead-letter files together [67108864]; oldest deleted."),
    ] = None,
) -> None:
    """Accept device connections and write their readings to InfluxDB."""
    flags: dict[str, object] = {
        "state_dir": state_dir,
        "registry_url": registry_url,
        "node_id": node_id,
        "host": host,
        "port": port,
        "workers": workers,
        "influx_url": influx_url,
        "influx_bucket": influx_bucket,
        "influx_org": influx_org,
        "influx_token": influx_token,
        "influx_api": influx_api,
        "schemas": schemas,
        "min_time": min_time,
        "max_future_s": max_future_s,
        "log_level": log_level,
        "log_format": log_format,
        "health_host": health_host,
        "health_port": health_port,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "dead_letter_max_bytes": dead_letter_max_bytes,
    }
    settings = settings_from(config, **flags)
    configure_logging(settings.log_level, settings.log_format)
    if has_password(settings.registry_url):
        logging.getLogger("hub").warning(
            "registry_url holds a password: put it in the hub user's ~/.pgpass instead "
            "(URLs show in process listings)"
        )
    from hub.ops.runtime import run_event_loop
    from hub.service import serve as run_service
    from hub.workers import slots

    # A SIGHUP reads the same sources again: the flags stay, the files may have changed.
    reload = functools.partial(load_settings, config, **flags)
    try:
        worker = slots.worker_slot(os.environ, settings)
        if worker is None and settings.workers > 1:
            from hub.workers.supervisor import supervise

            # The workers run this same command line (python -m hub: also from a venv's hub).
            argv = [sys.executable, "-m", "hub", *sys.argv[1:]]
            raise typer.Exit(run_event_loop(supervise(settings, argv)))
        if worker is not None:
            slots.adopt_passed_socket(os.environ, os.getpid())
            tag_worker_lines(worker.number)
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # the supervisor's, sent to all
            settings = slots.worker_settings(settings)
            reload = functools.partial(_as_worker, reload)
        run_event_loop(run_service(settings, reload, worker))
    except HubError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}")


def _as_worker(load: Callable[[], Settings]) -> Settings:
    """A worker's settings, read again: its health listener stays its own."""
    from hub.workers.slots import worker_settings

    return worker_settings(load())


@token_app.command("add")
def token_add(
    device_id: Annotated[
        str | None, typer.Argument(help="The new device's id (or use --count).")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option(help="A label key=value for fleet pushes; repeatable.")
    ] = None,
    count: Annotated[
        int | None,
        typer.Option(min=1, help="Register this many devices, PREFIX00001 and on, at once."),
    ] = None,
    prefix: Annotated[str, typer.Option(help="Id prefix of the devices --count adds.")] = "sim-",
    out: Annotated[
        Path | None,
        typer.Option(help="With --count: write device_id,token CSV here (mode 0600), not stdout."),
    ] = None,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    registry_url: RegistryUrlOption = None,
) -> None:
    """Register a device and print its token, the only line on stdout. Shown once only.

    With --count, register many devices in one transaction: their `device_id,token` CSV goes
    to --out (created with mode 0600; an existing file is never overwritten) or, without
    --out, to stdout. Progress and the summary go to stderr.
    """
    labels = parse_assignments(label or [], json_values=False)
    settings = settings_from(config, state_dir=state_dir, registry_url=registry_url)
    if count is None:
        if device_id is None or out is not None:
            fail("give one DEVICE_ID, or --count N (with --prefix and --out) for many")
        token = _register(settings, [device_id], labels)[0]
        sys.stdout.write(token + "\n")
        return
    if device_id is not None:
        fail("give either DEVICE_ID or --count, not both")
    width = max(5, len(str(count)))
    device_ids = [f"{prefix}{number:0{width}d}" for number in range(1, count + 1)]
    try:
        handle = _create_private(out) if out is not None else sys.stdout
    except OSError as exc:
        fail(f"cannot create {out}: {exc.strerror}")
    started = time.monotonic()
    typer.echo(f"registering {count} devices {device_ids[0]} .. {device_ids[-1]}", err=True)
    with handle if out is not None else contextlib.nullcontext(handle):
        tokens = _register(settings, device_ids, labels, cleanup=out)
        rows = csv.writer(handle, lineterminator="\n")
        rows.writerow(["device_id", "token"])
        rows.writerows(zip(device_ids, tokens, strict=True))
    where = f"tokens in {out} (mode 0600)" if out is not None else "tokens on stdout"
    typer.echo(
        f"registered {count} devices in {time.monotonic() - started:.2f} s; {where}", err=True
    )


def _create_private(path: Path) -> TextIO:
    """A new file only its owner can read; never an existing one (its tokens would be lost)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return os.fdopen(fd, "w", encoding="utf-8", newline="")


def _register(
    settings: Settings,
    device_ids: list[str],
    labels: dict[str, str],
    cleanup: Path | None = None,
) -> list[str]:
    """Register devices in one transaction and return their tokens, or fail cleanly."""
    try:
        return with_registry(settings, lambda registry: registry.add_many(device_ids, labels))
    except typer.Exit:
        if cleanup is not None:
            cleanup.unlink(missing_ok=True)  # empty: nothing was registered
        raise


@token_app.command("list")
def token_list(
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    registry_url: RegistryUrlOption = None,
) -> None:
    """List devices and whether their token is active (tokens themselves are never shown)."""
    settings = settings_from(config, state_dir=state_dir, registry_url=registry_url)
    devices = with_registry(settings, lambda registry: registry.devices())
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
    registry_url: RegistryUrlOption = None,
) -> None:
    """Revoke a device's token; the device can no longer connect."""
    settings = settings_from(config, state_dir=state_dir, registry_url=registry_url)
    with_registry(settings, lambda registry: registry.revoke(device_id))
    typer.echo(f"revoked {device_id}", err=True)


@token_app.command("rotate")
def token_rotate(
    device_id: Annotated[str, typer.Argument(help="The device that gets a new token.")],
    grace: Annotated[
        str,
        typer.Option(
            help="How long the old token keeps working: 0 (not at all), 90s, 30m, 1h, 7d.",
            show_default=False,
        ),
    ],
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    registry_url: RegistryUrlOption = None,
) -> None:
    """Issue a new token, printed as the only line on stdout; the old one works for --grace."""
    grace_s = parse_duration(grace)
    settings = settings_from(config, state_dir=state_dir, registry_url=registry_url)
    token = with_registry(settings, lambda registry: registry.rotate(device_id, grace_s))
    sys.stdout.write(token + "\n")
    until = f"until {when(time.time() + grace_s)}" if grace_s else "no longer"
    typer.echo(f"rotated {device_id}; the old token works {until}", err=True)
