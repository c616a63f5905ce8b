"""Operator commands for the fleet: desired configs, labels, and who is connected."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from hub.cli.common import (
    ConfigOption,
    RegistryUrlOption,
    StateDirOption,
    fail,
    settings_from,
    when,
    with_registry,
)
from hub.registry.operator import OperatorRegistry
from hub.registry.records import ConfigState, Device, Presence

config_app = typer.Typer(help="Push configuration to devices.", no_args_is_help=True)
device_app = typer.Typer(help="Device labels.", no_args_is_help=True)

WAIT_POLL_S = 0.1


def parse_assignments(pairs: list[str], *, json_values: bool) -> dict[str, Any]:
    """`key=value` arguments as a dict; values parsed as JSON when they parse, else strings."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {pair!r}")
        if json_values:
            try:
                result[key] = json.loads(value)
            except ValueError:
                result[key] = value
            except RecursionError:  # far deeper than any device may receive
                raise typer.BadParameter(f"{key}: the value nests too deep") from None
        else:
            result[key] = value
    return result


@config_app.command("set")
def config_set(
    device_id: Annotated[
        str | None, typer.Argument(help="The device (or use --all/--label).")
    ] = None,
    assignments: Annotated[
        list[str] | None, typer.Argument(help="key=value ...; JSON values when they parse.")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="A JSON object that replaces the whole config.")
    ] = None,
    everyone: Annotated[bool, typer.Option("--all", help="Every active device.")] = False,
    label: Annotated[
        list[str] | None, typer.Option(help="Devices with this label (key=value); repeatable.")
    ] = None,
    wait: Annotated[
        float | None, typer.Option(help="Wait this many seconds for every device's answer.")
    ] = None,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    registry_url: RegistryUrlOption = None,
) -> None:
    """Set desired configuration; connected devices receive it within a second.

    key=value pairs update those keys and keep the others; --file replaces the whole config.
    """
    pairs = list(assignments or [])
    if (everyone or label) and device_id is not None:
        pairs.insert(0, device_id)  # with --all/--label the first word is an assignment too
        device_id = None
    updates = parse_assignments(pairs, json_values=True)
    replace = _read_config_file(file) if file is not None else None
    if replace is None and not updates:
        fail("nothing to set: give key=value pairs or --file")
    labels = parse_assignments(label or [], json_values=False)
    if sum((device_id is not None, everyone, bool(labels))) != 1:
        fail("name one device, or use --all, or --label key=value")
    settings = settings_from(config, state_dir=state_dir, registry_url=registry_url)

    async def push(registry: OperatorRegistry) -> None:
        targets = await registry.select(
            [device_id] if device_id else [], everyone=everyone, labels=labels
        )
        if not targets:
            fail("no active device matches")
        # Configs go to devices no deeper than devices may send (the hub's max_nesting_depth).
        versions = await registry.set_config(
            targets, updates=updates, replace=replace, max_depth=settings.max_nesting_depth
        )
        typer.echo(f"config set for {len(versions)} device(s)", err=True)
        # One write: 10,000 echo calls cost the push ~70 ms before it starts waiting.
        typer.echo("".join(f"{t}\tversion {v}\n" for t, v in sorted(versions.items())), nl=False)
        if wait is not None:
            await _wait_for_answers(registry, versions, wait)

    with_registry(settings, push)


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    except ValueError as exc:
        fail(f"{path} is not valid JSON: {exc}")
    except RecursionError:  # far deeper than any device may receive
        fail(f"{path} nests too deep")
    if not isinstance(data, dict):
        fail(f"{path} must hold a JSON object")
    return data


async def _wait_for_answers(
    registry: OperatorRegistry, versions: dict[str, int], wait_s: float
) -> None:
    # Polled, not one asyncio.timeout: progress is shown as answers come in.
    deadline = time.monotonic() + wait_s
    answered: dict[str, ConfigState] = {}
    shown = -1
    while True:
        waiting = [d for d in versions if d not in answered]
        for state in await registry.config_states(waiting):
            if (state.acked_version or 0) >= versions[state.device_id]:
                answered[state.device_id] = state
        if len(answered) != shown:
            shown = len(answered)
            typer.echo(f"answered {shown}/{len(versions)}", err=True)
        if len(answered) == len(versions) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(WAIT_POLL_S)
    refused = {d: s.ack_error for d, s in answered.items() if not s.ack_ok}
    silent = sorted(set(versions) - set(answered))
    for device, error in sorted(refused.items()):
        typer.echo(f"refused by {device}: {error}", err=True)
    if silent:
        typer.echo(f"no answer within {wait_s:g} s from: {', '.join(silent)}", err=True)
    if refused or silent:
        raise typer.Exit(1)
    typer.echo(f"applied by all {len(versions)} device(s)", err=True)


@config_app.command("get")
def config_get(
    device_id: Annotated[str, typer.Argument(help="The device.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    registry_url: RegistryUrlOption = None,
) -> None:
    """Show a device's desired config, what it acknowledged, and its last error."""
    settings = settings_from(config, state_dir=state_dir, registry_url=registry_url)
    state = with_registry(settings, lambda registry: registry.config_state(device_id))
    report = {
        "device": state.device_id,
        "desired": state.config,
        "desired_version": state.version,
        "acknowledged_version": state.acked_version,
        "pending": state.pending,
        "last_answer": None if state.ack_ok is None else ("ok" if state.ack_ok else "refused"),
        "last_error": state.ack_error,
        "answered_at": when(state.acked_at),
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        shown = json.dumps(value) if key == "desired" else ("-" if value is None else value)
        typer.echo(f"{key + ':':<22}{shown}")


@device_app.command("label")
def device_label(
    device_id: Annotated[str, typer.Argument(help="The device.")],
    assignments: Annotated[
        list[str] | None, typer.Argument(help="key=value labels to set.")
    ] = None,
    remove: Annotated[list[str] | None, typer.Option(help="Label to remove; repeatable.")] = None,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    registry_url: RegistryUrlOption = None,
) -> None:
    """Set or remove labels of a device; prints its labels afterwards."""
    changes = parse_assignments(assignments or [], json_values=False)
    settings = settings_from(config, state_dir=state_dir, registry_url=registry_url)
    labels = with_registry(
        settings, lambda registry: registry.set_labels(device_id, changes, remove or [])
    )
    typer.echo(" ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(no labels)")


@dataclass(frozen=True, slots=True)
class _Fleet:
    devices: list[Device]
    presence: dict[str, Presence]
    configs: dict[str, ConfigState]
    holders: dict[str, str]


async def _fleet(registry: OperatorRegistry) -> _Fleet:
    devices = await registry.devices()
    presence = await registry.presence()
    states = await registry.config_states([d.device_id for d in devices])
    holders = await registry.holders()
    return _Fleet(devices, presence, {state.device_id: state for state in states}, holders)


def devices_command(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    registry_url: RegistryUrlOption = None,
) -> None:
    """Every device: online, address, since, last seen, readings stored, config versions,
    and on PostgreSQL the hub holding it."""
    settings = settings_from(config, state_dir=state_dir, registry_url=registry_url)
    fleet = with_registry(settings, _fleet)
    rows = []
    for device in fleet.devices:
        seen = fleet.presence.get(device.device_id)
        wanted = fleet.configs[device.device_id]
        online = bool(seen and seen.online)
        rows.append(
            {
                "device": device.device_id,
                "status": "active" if device.active else "revoked",
                "online": online,
                "hub": fleet.holders.get(device.device_id) if online else None,
                "remote_address": seen.remote_address if seen and online else None,
                "connected_since": when(seen.connected_since) if seen and online else None,
                "last_seen": when(seen.last_seen) if seen else None,
                "readings_stored": seen.readings_stored if seen else 0,
                "config_desired": wanted.version,
                "config_acknowledged": wanted.acked_version,
                "labels": device.labels,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    # One hub on SQLite: no column to name it; several hubs, or workers: which holds it.
    shared = bool(settings.registry_url) or settings.workers > 1
    header = f"{'DEVICE':<28} {'ONLINE':<7} {'REMOTE':<22} {'SINCE':<21} {'LAST SEEN':<21} "
    typer.echo(header + f"{'STORED':>10} {'CONFIG':>9}" + ("  HUB" if shared else ""))
    for row in rows:
        state = "yes" if row["online"] else ("revoked" if row["status"] == "revoked" else "no")
        versions = f"{row['config_acknowledged'] or 0}/{row['config_desired']}"
        typer.echo(
            f"{row['device']:<28} {state:<7} {row['remote_address'] or '-':<22} "
            f"{row['connected_since'] or '-':<21} {row['last_seen'] or '-':<21} "
            f"{row['readings_stored']:>10} {versions:>9}"
            + (f"  {row['hub'] or '-'}" if shared else "")
        )


def nodes_command(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    registry_url: RegistryUrlOption = None,
) -> None:
    """Every hub sharing the PostgreSQL registry: address, start, last heartbeat, live
    connections, and whether its lease is live."""
    settings = settings_from(config, state_dir=state_dir, registry_url=registry_url)
    nodes = with_registry(settings, lambda registry: registry.nodes())
    rows = [
        {
            "node": node.node_id,
            "address": node.address,
            "started_at": when(node.started_at),
            "last_heartbeat": when(node.heartbeat_at),
            "lease_expires_at": when(node.lease_expires_at),
            "live_connections": node.live_connections,
            "live": node.live,
        }
        for node in nodes
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not settings.registry_url:
        typer.echo(
            "the registry is SQLite (one hub); nodes are the hubs sharing a PostgreSQL "
            "registry (registry_url)",
            err=True,
        )
        return
    typer.echo(
        f"{'NODE':<32} {'ADDRESS':<24} {'STARTED':<21} {'LAST HEARTBEAT':<21} "
        f"{'CONNECTIONS':>11} LIVE"
    )
    for row in rows:
        typer.echo(
            f"{row['node']:<32} {row['address']:<24} {row['started_at']:<21} "
            f"{row['last_heartbeat']:<21} {row['live_connections']:>11} "
            f"{'yes' if row['live'] else 'no'}"
        )
