"""The benchmark's report: targets, ratios, the table, the JSON and the chart."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from device_sim.bench.model import BenchSizes, Scenario, as_json


@dataclass(frozen=True)
class Target:
    """A figure the issue asks for: `scenario.metric` at least or at most `limit`."""

    label: str
    scenario: str
    metric: str
    limit: float
    at_least: bool

    def verdict(self, scenarios: dict[str, Scenario]) -> tuple[Any, bool | None]:
        """The measured value, and whether it meets the target (None when not measured)."""
        scenario = scenarios.get(self.scenario)
        value = scenario.metrics.get(self.metric) if scenario else None
        if value is None:
            return None, None
        return value, value >= self.limit if self.at_least else value <= self.limit


TARGETS = [
    Target("batched: readings/s stored", "batched", "stored_per_s", 150_000, True),
    Target("batched: hub CPU µs per reading", "batched", "hub_cpu_us_per_reading", 3.0, False),
    Target("one reading a message: readings/s", "single", "stored_per_s", 20_000, True),
    Target(
        "ack p99 at half the max rate (all connected), ms",
        "batched_half",
        "ack_latency_steady_p99_ms",
        100,
        False,
    ),
    Target("idle: hub RSS per connection, KiB", "idle", "rss_per_connection_kib", 20, False),
    Target("connect storm: all connected, s", "storm", "all_connected_s", 10, False),
    Target("config round trip p99, ms", "config", "round_trip_p99_ms", 20, False),
    Target("config push to all: all acked, s", "config", "fleet_push_all_acked_s", 3, False),
    Target(
        "workers: connections max/mean (SO_REUSEPORT)",
        "workers",
        "reuseport_max_over_mean",
        1.2,
        False,
    ),
    Target(
        "PostgreSQL hubs: CPU per reading / SQLite hubs' at equal load",
        "postgres",
        "cpu_ratio_to_sqlite_three",
        1.05,
        False,
    ),
    Target("takeover across hubs p99, ms", "takeover", "takeover_p99_ms", 100, False),
    Target(
        "hub config set --all over the hubs: all acked, s",
        "cluster_push",
        "all_all_acked_s",
        3,
        False,
    ),
    Target(
        "hub config set --label over the hubs: all acked, s",
        "cluster_push",
        "label_all_acked_s",
        3,
        False,
    ),
]


def _proc_value(path: str, key: str) -> str:
    """The value after `key:` in a /proc text file, or an empty string."""
    try:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return ""


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    memory_kib = _proc_value("/proc/meminfo", "MemTotal").split(" ")[0] or "0"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _proc_value("/proc/cpuinfo", "model name"),
        "memory_gib": round(int(memory_kib) / 2**20, 1),
        "python": sys.version.split()[0],
        "kernel": platform.release(),
    }


def build(
    scenarios: dict[str, Scenario], sizes: BenchSizes, command: str, extra: dict[str, Any]
) -> dict[str, Any]:
    """The whole report as JSON-friendly data."""
    ratios: dict[str, float | None] = {}
    for hub_name in ("batched", "single"):
        for base in ("ceiling", "no_hub"):
            hub_rate = _metric(scenarios, hub_name, "stored_per_s")
            base_rate = _metric(scenarios, base, "stored_per_s")
            ratios[f"{hub_name}_to_{base}"] = (
                round(hub_rate / base_rate, 3) if hub_rate and base_rate else None
            )
    targets = []
    for target in TARGETS:
        value, met = target.verdict(scenarios)
        targets.append(
            {
                "target": target.label,
                "limit": target.limit,
                "at_least": target.at_least,
                "value": value,
                "met": met,
            }
        )
    peaks = [s.metrics.get("hub_peak_rss_mib") for s in scenarios.values()]
    return {
        "command": command,
        "machine": machine(),
        "sizes": sizes.__dict__,
        **extra,
        "hub_peak_rss_mib": max((p for p in peaks if p is not None), default=None),
        "ratios": ratios,
        "targets": targets,
        "scenarios": {name: as_json(s) for name, s in scenarios.items()},
    }


def _metric(scenarios: dict[str, Scenario], name: str, metric: str) -> float | None:
    scenario = scenarios.get(name)
    value = scenario.metrics.get(metric) if scenario else None
    return float(value) if value is not None else None


_HEADLINES = {
    "ceiling": ("stored_per_s", "points/s"),
    "no_hub": ("stored_per_s", "readings/s"),
    "batched": ("stored_per_s", "readings/s"),
    "batched_half": ("ack_latency_steady_p99_ms", "ms ack p99"),
    "single": ("stored_per_s", "readings/s"),
    "idle": ("rss_per_connection_kib", "KiB/connection"),
    "storm": ("all_connected_s", "s to connect all"),
    "config": ("round_trip_p99_ms", "ms round trip p99"),
    "workers": ("stored_per_s", "readings/s"),
    "postgres": ("stored_per_s", "readings/s"),
    "takeover": ("takeover_p99_ms", "ms p99"),
    "cluster_push": ("all_all_acked_s", "s until all acked (--all)"),
}
_DETAILS = (
    "hub_cpu_us_per_reading",
    "hub_cpu_us_per_reading_whole_run",
    "all_connected_s",
    "connect_errors",
    "ack_latency_p50_ms",
    "ack_latency_p99_ms",
    "ack_latency_steady_p99_ms",
    "hub_peak_rss_mib",
    "loadgen_cpu_s",
    "influxdb_cpu_s",
    "influxdb_cpu_us_per_point",
    "machine_busy_pct",
    "other_cpu_s",
    "all_acked_s",
    "fleet_push_all_acked_s",
    "push_p99_ms",
    "reuseport_connections_per_worker",
    "reuseport_max_over_mean",
    "shared_connections_per_worker",
    "shared_max_over_mean",
    "sqlite_stored_per_s",
    "sqlite_hub_cpu_us_per_reading",
    "postgres_one_hub_cpu_us_per_reading",
    "sqlite_three_hub_cpu_us_per_reading",
    "cpu_ratio_to_sqlite_three",
    "cpu_ratio_to_sqlite",
    "postgres_one_cpu_ratio_to_sqlite",
    "sqlite_three_cpu_ratio_to_sqlite",
    "cpu_ratio_to_sqlite_whole_run",
    "haproxy_cpu_s",
    "moves_across_hubs",
    "takeover_p50_ms",
    "from_connect_start_p99_ms",
    "devices_per_hub",
    "all_set_s",
    "label_all_acked_s",
    "all_answered",
    "label_answered",
)


def print_report(report: dict[str, Any], console: Console) -> None:
    """The scenario table, the ratios and the targets."""
    table = Table(title="device-sim bench", show_lines=False)
    table.add_column("scenario")
    table.add_column("result", justify="right")
    table.add_column("details")
    for name, data in report["scenarios"].items():
        metric, unit = _HEADLINES.get(name, ("", ""))
        value = data["metrics"].get(metric)
        shown = "-" if value is None else f"{value:,} {unit}"
        details = ", ".join(
            f"{key} {data['metrics'][key]}"
            for key in _DETAILS
            if data["metrics"].get(key) not in (None, {}) and key != metric
        )
        table.add_row(data["title"], shown, details)
    console.print(table)
    ratios = ", ".join(f"{k} {v}" for k, v in report["ratios"].items() if v is not None)
    console.print(f"ratios: {ratios or '-'}")
    console.print(f"hub peak RSS: {report['hub_peak_rss_mib']} MiB")
    targets = Table(title="targets")
    for column in ("target", "limit", "measured", "met"):
        targets.add_column(column)
    for row in report["targets"]:
        sign = ">=" if row["at_least"] else "<="
        met = {True: "yes", False: "NO", None: "not measured"}[row["met"]]
        targets.add_row(row["target"], f"{sign} {row['limit']:,}", str(row["value"]), met)
    console.print(targets)
    for name, error in report.get("failed", {}).items():
        console.print(f"[bold red]scenario {name} failed:[/] {error}")


def write_json(report: dict[str, Any], path: Path) -> None:
    """The report as indented JSON."""
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def write_chart(report: dict[str, Any], path: Path) -> bool:
    """Throughput and ack latency over time per scenario, as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (throughput, latency, cpu) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    for number, (name, data) in enumerate(report["scenarios"].items()):
        series = data["series"]
        if not series or name in ("storm",):
            continue
        style = {"label": data["title"], "color": f"C{number}"}
        times = [point["t"] for point in series]
        throughput.plot(times, [p["acked_per_s"] for p in series], **style)
        latency.plot(times, [p["ack_p99_ms"] for p in series], **style)
        if any("hub_cpu_pct" in p for p in series):
            cpu.plot(times, [p.get("hub_cpu_pct") for p in series], **style)
    throughput.set_ylabel("readings acked / s")
    throughput.set_title("throughput")
    latency.set_ylabel("ack latency p99 (ms)")
    latency.set_yscale("log")
    latency.set_title("ack latency")
    cpu.set_ylabel("hub CPU %")
    cpu.set_xlabel("seconds since the load started")
    cpu.set_title("hub CPU")
    for axes in (throughput, latency, cpu):
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True
