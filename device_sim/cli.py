"""The `device-sim` command."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from device_sim.fleet import read_tokens, run_fleet

app = typer.Typer(
    help="Simulated sensor devices for demos and load tests.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
def run(
    url: Annotated[str, typer.Option(help="Hub address, ws://HOST:PORT.")] = "ws://127.0.0.1:8765",
    tokens: Annotated[Path, typer.Option(help="CSV of device_id,token rows.")] = Path("tokens.csv"),
    devices: Annotated[int, typer.Option(help="How many devices (at most the file's rows).")] = 1,
    rate: Annotated[float, typer.Option(help="Messages per second per device.")] = 1.0,
    batch: Annotated[int, typer.Option(help="Readings per message.")] = 10,
    duration: Annotated[float, typer.Option(help="Seconds to run.")] = 10.0,
) -> None:
    """Run simulated devices against a hub and print what was acked."""
    creds = read_tokens(tokens)[:devices]
    if not creds:
        typer.echo(f"error: no device tokens in {tokens}", err=True)
        raise typer.Exit(2)
    stats = asyncio.run(run_fleet(url, creds, rate=rate, batch=batch, duration=duration))
    latencies = sorted(stats.latencies_ms) or [0.0]
    typer.echo(
        f"devices {len(creds)}  sent {stats.sent}  acked {stats.acked}  rejected {stats.rejected}  "
        f"failed connections {stats.failed_connections}  "
        f"ack latency p50 {latencies[len(latencies) // 2]:.1f} ms  "
        f"p99 {latencies[int(len(latencies) * 0.99)]:.1f} ms"
    )


@app.command()
def demo(
    devices: Annotated[int, typer.Option(help="Simulated devices.")] = 3,
    duration: Annotated[float, typer.Option(help="Seconds of streaming.")] = 20.0,
    rate: Annotated[float, typer.Option(help="Messages per second per device.")] = 5.0,
    batch: Annotated[int, typer.Option(help="Readings per message.")] = 20,
) -> None:
    """Start a local InfluxDB and a hub, stream from a few devices, show readings landing."""
    from device_sim.demo import demo as run_demo

    raise typer.Exit(asyncio.run(run_demo(devices, duration, rate, batch)))
