"""The `device-sim` command: simulated devices, the README's demo, and the benchmark."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from device_sim.fleet import FleetReport, read_tokens, run_fleet
from device_sim.live import show_live, summary_table
from device_sim.stats import FleetStats
from hub.ops.runtime import run_event_loop, tune_garbage_collector

app = typer.Typer(
    help="Simulated sensor devices for demos and load tests.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
def run(
    url: Annotated[str, typer.Option(help="Hub address, ws://HOST:PORT.")] = "ws://127.0.0.1:8765",
    tokens: Annotated[
        Path, typer.Option(help="CSV of device_id,token rows (hub token add --count --out).")
    ] = Path("tokens.csv"),
    devices: Annotated[
        int | None, typer.Option(min=1, help="How many devices (default: every row of the file).")
    ] = None,
    rate: Annotated[float, typer.Option(min=0, help="Messages per second per device.")] = 1.0,
    batch: Annotated[int, typer.Option(min=1, help="Readings per message.")] = 10,
    duration: Annotated[float, typer.Option(min=0, help="Seconds to send.")] = 10.0,
    invalid_ratio: Annotated[
        float, typer.Option(min=0, max=1, help="Share of readings with an out-of-range value.")
    ] = 0.0,
    window: Annotated[int, typer.Option(min=1, help="Unacked messages per device, at most.")] = 16,
    final_wait: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for outstanding acks at the end.")
    ] = 10.0,
    report: Annotated[
        Path | None, typer.Option(help="Write the summary (and per-device counts) as JSON here.")
    ] = None,
    live: Annotated[bool, typer.Option(help="Show the live view while running.")] = True,
) -> None:
    """Run simulated devices against a hub: a live view, then a summary."""
    try:
        creds = read_tokens(tokens)[:devices]
    except OSError as exc:
        typer.echo(f"error: cannot read {tokens}: {exc.strerror}", err=True)
        raise typer.Exit(2) from None
    if not creds:
        typer.echo(f"error: no device tokens in {tokens}", err=True)
        raise typer.Exit(2)
    console = Console()
    tune_garbage_collector()
    fleet = run_event_loop(
        _run_with_view(
            console if live else None,
            url,
            creds,
            rate=rate,
            batch=batch,
            duration=duration,
            invalid_ratio=invalid_ratio,
            window=window,
            final_wait_s=final_wait,
        )
    )
    summary = fleet.summary()
    console.print(summary_table(summary))
    if report is not None:
        data = {
            "url": url,
            "rate": rate,
            "batch": batch,
            "duration_s": duration,
            "summary": summary,
            "devices": [d.to_json() for d in fleet.devices.values()],
        }
        report.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if fleet.acked == 0 and fleet.sent > 0:
        raise typer.Exit(1)


async def _run_with_view(
    console: Console | None, url: str, creds: Any, **kwargs: Any
) -> FleetReport:
    stats = FleetStats()
    view = asyncio.create_task(show_live(stats, console)) if console is not None else None
    try:
        return await run_fleet(url, creds, stats=stats, **kwargs)
    finally:
        if view is not None:
            view.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await view


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


@app.command()
def bench(
    out_dir: Annotated[Path, typer.Option(help="Where bench.json and bench.png go.")] = Path(
        "bench-results"
    ),
    smoke: Annotated[bool, typer.Option(help="Tiny sizes: seconds, for the test suite.")] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Scenario group to run (repeatable): ceiling, no_hub, batched, "
            "single, idle (with config), storm, workers, postgres, takeover, cluster_push."
        ),
    ] = None,
    duration: Annotated[float | None, typer.Option(help="Seconds per load scenario.")] = None,
    workers: Annotated[int | None, typer.Option(help="Load generator processes.")] = None,
    devices: Annotated[int | None, typer.Option(help="Devices in scenarios 2 and 3.")] = None,
    batched_rate: Annotated[
        float | None, typer.Option(help="Messages/s per device in scenario 3.")
    ] = None,
    single_devices: Annotated[int | None, typer.Option(help="Devices in scenario 4.")] = None,
    single_rate: Annotated[
        float | None, typer.Option(help="Messages/s per device in scenario 4.")
    ] = None,
    idle_devices: Annotated[int | None, typer.Option(help="Idle connections (5, 7).")] = None,
    storm_devices: Annotated[int | None, typer.Option(help="Devices in the storm (6).")] = None,
    takeover_moves: Annotated[
        int | None, typer.Option(min=1, help="Moves across hubs in scenario 10.")
    ] = None,
    push_devices: Annotated[
        int | None, typer.Option(min=1, help="Devices over the hubs in scenario 11.")
    ] = None,
) -> None:
    """Every scenario against a hub process and a local InfluxDB: table, JSON, PNG chart."""
    from dataclasses import replace

    from device_sim.bench.model import BenchSizes
    from device_sim.bench.report import print_report
    from device_sim.bench.run import SCENARIOS, run_bench
    from device_sim.local_servers import ServerError

    unknown = set(only or []) - set(SCENARIOS)
    if unknown:
        typer.echo(f"error: unknown scenario(s) {sorted(unknown)}; pick from {SCENARIOS}", err=True)
        raise typer.Exit(2)
    sizes = BenchSizes.smoke() if smoke else BenchSizes()
    overrides: dict[str, Any] = {
        "duration_s": duration,
        "workers": workers,
        "devices": devices,
        "batched_rate": batched_rate,
        "single_devices": single_devices,
        "single_rate": single_rate,
        "idle_devices": idle_devices,
        "storm_devices": storm_devices,
        "takeover_moves": takeover_moves,
        "push_devices": push_devices,
    }
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    try:
        result = asyncio.run(run_bench(out_dir, sizes, set(only or [])))
    except ServerError as exc:  # a server not installed: say which package, no traceback
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except asyncio.CancelledError:  # SIGTERM: what it started is stopped, nothing reported
        typer.echo("stopped by SIGTERM; no report", err=True)
        raise typer.Exit(143) from None
    print_report(result, Console(width=max(Console().width, 120)))
    typer.echo(f"report: {out_dir / 'bench.json'}, chart: {out_dir / 'bench.png'}", err=True)
    if result["failed"]:
        raise typer.Exit(1)


@app.command()
def chaos(
    duration: Annotated[
        float,
        typer.Option(min=1, help="Seconds of faults (the first round of every kind runs whole)."),
    ],
    devices: Annotated[int, typer.Option(min=1, help="Simulated devices.")] = 100,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the fault plan (default: random, printed).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Where chaos.json, logs and state go.")] = Path(
        "chaos-results"
    ),
    rate: Annotated[float, typer.Option(min=0.1, help="Messages per second per device.")] = 1.0,
    batch: Annotated[int, typer.Option(min=1, help="Readings per message.")] = 10,
    hold: Annotated[float, typer.Option(min=0.1, help="Mean seconds a fault lasts.")] = 4.0,
    pause: Annotated[float, typer.Option(min=0, help="Mean seconds between faults.")] = 10.0,
    reconnect_bound: Annotated[
        float, typer.Option(min=0, help="Seconds devices cut by a hub kill may take to return.")
    ] = 10.0,
) -> None:
    """Three hubs and a 2-worker hub on PostgreSQL behind HAProxy, devices streaming, while
    hubs, PostgreSQL and InfluxDB are killed and frozen at random; then every acked reading
    is looked for in InfluxDB. Exit 1 if anything acked was lost or a check failed."""
    import secrets

    from device_sim.chaos.plan import Timing
    from device_sim.chaos.run import ChaosOptions, run_chaos
    from device_sim.local_servers import ServerError

    options = ChaosOptions(
        duration_s=duration,
        out_dir=out,
        seed=seed if seed is not None else secrets.randbelow(2**31),
        devices=devices,
        rate=rate,
        batch=batch,
        timing=Timing(hold_s=hold, pause_s=pause),
        reconnect_bound_s=reconnect_bound,
    )
    tune_garbage_collector()
    try:
        ok, _ = run_event_loop(run_chaos(options, lambda line: typer.echo(line, err=True)))
    except ServerError as exc:  # a server not installed or not starting: no traceback
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C or SIGTERM: cleaned up
        typer.echo(f"interrupted: every process stopped; partial report in {out}", err=True)
        raise typer.Exit(130) from None
    raise typer.Exit(0 if ok else 1)
