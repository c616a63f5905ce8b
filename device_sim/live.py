"""The live view of a running fleet, and its end-of-run summary, drawn with rich."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from device_sim.stats import FleetStats

REFRESH_S = 0.5


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def live_table(stats: FleetStats, elapsed_s: float, acked_per_s: float, recent: Any) -> Table:
    """One frame of the live view: a narrow two-column table, readable in any terminal."""
    table = Table(title=f"device-sim  {elapsed_s:6.1f} s", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = {
        "connected": f"{stats.connected:,}",
        "sent": f"{stats.sent:,}",
        "acked": f"{stats.acked:,}",
        "acked / s": f"{acked_per_s:,.0f}",
        "rejected": f"{stats.rejected:,}",
        "in flight": f"{stats.in_flight:,}",
        "resent": f"{stats.resent:,}",
        "reconnects": f"{stats.reconnects:,}",
        "ack latency p50": _ms(recent.percentile(0.5)),
        "ack latency p99": _ms(recent.percentile(0.99)),
    }
    for what, value in rows.items():
        table.add_row(what, value)
    return table


async def show_live(stats: FleetStats, console: Console | None = None) -> None:
    """Redraw the counters until cancelled; latencies are those of the last refresh."""
    started = last_at = time.monotonic()
    last_acked = stats.acked
    recent = stats.take_recent()
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            await asyncio.sleep(REFRESH_S)
            now = time.monotonic()
            window = stats.take_recent()
            if window.total:
                recent = window
            rate = (stats.acked - last_acked) / max(1e-9, now - last_at)
            last_acked, last_at = stats.acked, now
            live.update(live_table(stats, now - started, rate, recent), refresh=True)


def summary_table(summary: dict[str, Any]) -> Table:
    """The end-of-run summary as a two-column table."""
    table = Table(title="device-sim summary", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    latency = summary.get("ack_latency_ms", {})
    for key, value in summary.items():
        if key == "ack_latency_ms":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, int):
            value = f"{value:,}"
        table.add_row(key.replace("_", " "), str(value))
    for name in ("p50", "p99", "max"):
        table.add_row(f"ack latency {name}", _ms(latency.get(name)))
    return table
