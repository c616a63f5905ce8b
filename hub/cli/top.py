"""`hub top`: a live terminal view of a running hub for the operator (over ssh, too).

It reads the hub's `/metrics` (at `health_host:health_port` of the settings, or `--url`)
and the presence the hub records in the registry, every `--interval` seconds, and draws
one screen with rich: the hub's state, connections, readings/s in and stored, rejections
and refused handshakes by reason, ack and InfluxDB write latency, the spool, dead letters,
and the busiest and silent devices. `--once` prints a single frame (rates over one
interval) and exits, for scripts. The numbers come from `hub/ops/top.py`.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Annotated

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from hub.cli.common import (
    ConfigOption,
    RegistryUrlOption,
    StateDirOption,
    fail,
    parse_duration,
    settings_from,
)
from hub.ops.top import Frame, Latency, Scrape, build_frame, parse_scrape
from hub.registry.backends import open_operator
from hub.registry.records import Presence
from hub.settings import Settings

FETCH_TIMEOUT_S = 5.0
# The hub's listener on loopback: an http_proxy in the operator's environment must not get it.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Unreachable(Exception):
    """The hub's /metrics could not be read."""


def metrics_url(settings: Settings, url: str | None) -> str:
    """`--url`, or the health listener the settings name (a wildcard address as loopback)."""
    if url:
        return url.rstrip("/")
    host = settings.health_host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    return (
        f"http://[{host}]:{settings.health_port}"
        if ":" in host
        else (f"http://{host}:{settings.health_port}")
    )


def fetch_scrape(base: str) -> Scrape:
    """GET `base`/metrics, parsed; `Unreachable` saying why not."""
    if not base.startswith(("http://", "https://")):
        raise Unreachable(f"not an http(s) URL: {base}")
    try:
        with _OPENER.open(base + "/metrics", timeout=FETCH_TIMEOUT_S) as answer:
            text = answer.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        raise Unreachable(f"cannot read {base}/metrics: {getattr(exc, 'reason', exc)}") from None
    return parse_scrape(text, time.monotonic())


def read_presence(settings: Settings) -> dict[str, Presence]:
    """Who is connected, as the hubs last recorded it; empty if the registry cannot be read."""
    if not settings.registry_url and not settings.registry_path.exists():
        return {}  # a view must not create a registry where there was none

    async def read() -> dict[str, Presence]:
        registry = await open_operator(settings.registry_url, settings.registry_path)
        try:
            return await registry.presence()
        finally:
            await registry.close()

    try:
        return asyncio.run(read())
    except Exception:  # the view goes on without devices (no access, database down...)
        return {}


# --- Drawing ----------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _latency(latency: Latency) -> str:
    return f"p50 {_ms(latency.p50)}  p99 {_ms(latency.p99)}"


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _by_reason(title: str, per_s: Mapping[str, float], total: Mapping[str, float]) -> Table:
    table = Table(title=title, title_justify="left", box=None, pad_edge=False, min_width=30)
    table.add_column("reason")
    table.add_column("/s", justify="right")
    table.add_column("total", justify="right")
    shown = [reason for reason, count in sorted(total.items()) if count > 0]
    for reason in shown:
        table.add_row(reason, f"{per_s.get(reason, 0.0):.1f}", f"{total[reason]:.0f}")
    if not shown:
        table.add_row("none", "", "")
    return table


def render(frame: Frame | None, source: str, error: str | None = None) -> RenderableType:
    """One screen of `hub top`."""
    if frame is None:
        return Text(f"hub top: {source}\n{error or 'waiting for the first read'}")
    state = "accepting devices" if frame.accepting else "NOT ACCEPTING devices"
    influx = "InfluxDB ok" if frame.influx_healthy else "InfluxDB FAILING (spooling)"
    header = Text(f"hub top: {source}  |  {state}  |  {influx}", style="bold")
    if frame.workers:
        header.append(
            "\nworkers  "
            + "   ".join(
                f"{w.worker}: {'up' if w.up else 'DOWN'}, {w.connections} conn"
                + (f", {w.restarts} restarts" if w.restarts else "")
                for w in frame.workers
            )
        )
    if error:
        header.append(f"\nlast read failed: {error}", style="red")

    traffic = Table(box=None, pad_edge=False)
    for column in ("connections", "readings in/s", "stored/s", "acks/s", "pending"):
        traffic.add_column(column, justify="right")
    traffic.add_row(
        str(frame.connections),
        f"{frame.received_per_s:.1f}",
        f"{frame.stored_per_s:.1f}",
        f"{frame.acks_per_s:.1f}",
        str(frame.pending_readings),
    )
    errors = ", ".join(f"{s}: {n:.0f}" for s, n in sorted(frame.influx_errors_total.items()) if n)
    spool_use = (
        f"{_bytes(frame.spool_bytes)} of {_bytes(frame.spool_max_bytes)}"
        f" ({frame.spool_batches} batches, oldest {_duration(frame.spool_oldest_s)})"
        + ("  FULL" if frame.spool_full else "")
    )
    store = Text(
        f"ack latency     {_latency(frame.ack_latency)}\n"
        f"InfluxDB write  {_latency(frame.write_latency)}   errors: {errors or 'none'}\n"
        f"spool           {spool_use}\n"
        f"dead letters    {frame.dead_letter_points} points"
    )
    busiest = Table(
        title="busiest devices", title_justify="left", box=None, pad_edge=False, min_width=36
    )
    for column, justify in (("device", "left"), ("readings/s", "right"), ("stored", "right")):
        busiest.add_column(column, justify=justify)  # type: ignore[arg-type]
    for device in frame.busiest:
        busiest.add_row(
            device.device_id, f"{device.readings_per_s:.1f}", str(device.readings_stored)
        )
    silent = Table(
        title="silent devices", title_justify="left", box=None, pad_edge=False, min_width=36
    )
    for column, justify in (("device", "left"), ("state", "left"), ("silent for", "right")):
        silent.add_column(column, justify=justify)  # type: ignore[arg-type]
    for device in frame.silent:
        state_text = "online, quiet" if device.online else "offline"
        silent.add_row(device.device_id, state_text, _duration(device.quiet_s))
    reasons = Table.grid(padding=(0, 4))
    reasons.add_row(
        _by_reason("readings rejected", frame.rejected_per_s, frame.rejected_total),
        _by_reason("handshakes refused", frame.refused_per_s, frame.refused_total),
    )
    devices = Table.grid(padding=(0, 4))
    devices.add_row(busiest, silent)
    footer = Text(
        f"rates over {frame.interval_s:.1f}s" if frame.interval_s else "totals since start",
        style="dim",
    )
    return Group(header, Text(), traffic, Text(), store, Text(), reasons, Text(), devices, footer)


# --- The command ------------------------------------------------------------------------------


def top_command(
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    registry_url: RegistryUrlOption = None,
    url: Annotated[
        str | None,
        typer.Option(help="The hub's health listener (default: health_host and health_port)."),
    ] = None,
    interval: Annotated[
        str, typer.Option(help="Time between reads (90s, 2, 0.5...); rates are over it.")
    ] = "2",
    silent_after: Annotated[
        str, typer.Option(help="A device seen no longer ago than this is not silent.")
    ] = "60s",
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
) -> None:
    """A live view of the running hub: traffic, rejections, latency, spool, devices."""
    settings = settings_from(config, state_dir=state_dir, registry_url=registry_url)
    source = metrics_url(settings, url)
    every = parse_duration(interval)
    quiet = parse_duration(silent_after)
    if every <= 0:
        fail("--interval must be more than 0")

    reader = FrameReader(settings, source, quiet)
    if once:
        try:
            reader.next()
            time.sleep(every)
            frame = reader.next()
        except Unreachable as exc:
            fail(str(exc))
        Console().print(render(frame, source))
        return
    shown: Frame | None = None
    with Live(render(None, source), screen=True, auto_refresh=False) as live:
        try:
            while True:
                error = None
                try:
                    shown = reader.next()
                except Unreachable as exc:
                    error = str(exc)
                live.update(render(shown, source, error), refresh=True)
                time.sleep(every)
        except KeyboardInterrupt:
            pass


class FrameReader:
    """Reads /metrics and the registry; each frame's rates are since the previous read."""

    def __init__(self, settings: Settings, source: str, silent_after_s: float) -> None:
        self.settings = settings
        self.source = source
        self.silent_after_s = silent_after_s
        self._scrape: Scrape | None = None
        self._presence: dict[str, Presence] = {}

    def next(self) -> Frame:
        """The next frame; `Unreachable` if /metrics cannot be read (the previous read stays)."""
        scrape, presence = fetch_scrape(self.source), read_presence(self.settings)
        frame = build_frame(
            self._scrape,
            scrape,
            self._presence,
            presence,
            time.time(),
            silent_after_s=self.silent_after_s,
        )
        self._scrape, self._presence = scrape, presence
        return frame
