"""What every scenario shares: its sizes (`BenchSizes`) and its result (`Scenario`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class BenchSizes:
    """How big each scenario is; `smoke()` is the test suite's tiny version."""

    duration_s: float = 20.0
    workers: int = 2
    """Load generator processes."""
    devices: int = 1000
    batch: int = 50
    batched_rate: float = 5.0
    """Messages a second per device in scenario 3: more than the hub takes, so it runs flat out."""
    window: int = 1
    """Unacked messages per device: enough in flight to keep the hub's pipeline full."""
    single_devices: int = 1000
    single_rate: float = 40.0
    single_window: int = 4
    ceiling_points: int = 1_000_000
    ceiling_concurrency: int = 4
    idle_devices: int = 10_000
    idle_connect_s: float = 10.0
    """Idle devices connect spread over this many seconds."""
    storm_devices: int = 5_000
    config_round_trips: int = 100
    final_wait_s: float = 15.0
    hub_workers: int = 2
    """`hub serve --workers N` of the workers scenario (8)."""
    spread_connections: int = 1000
    """Connections opened at once to see how they spread over the workers (8)."""
    cluster_hubs: int = 3
    """`hub serve` processes on one PostgreSQL in scenarios 9-11."""
    compare_rate: float = 0.5
    """Messages/s per device (of `devices`, `batch` readings each) in scenario 9: the same
    fixed load, below what the box can take, for one SQLite hub and for the cluster."""
    compare_connect_s: float = 5.0
    """Scenario 9's devices connect over this many seconds (1000 at once time out on
    PostgreSQL on a loaded box: docs/benchmarks.md)."""
    compare_rounds: int = 2
    """SQLite hub, cluster, SQLite hub, ...: alternating, so the machine's load is shared."""
    takeover_moves: int = 100
    push_devices: int = 10_000
    push_connects_per_s: float = 50.0
    """Scenario 11's devices connect at this rate: at 167 a second, three hubs starved of CPU
    on a loaded 2-core box took minutes to get all 10,000 in (docs/benchmarks.md)."""

    @classmethod
    def smoke(cls) -> BenchSizes:
        """Seconds, not minutes: every scenario runs, with a handful of devices."""
        return cls(
            duration_s=1.5,
            workers=1,
            devices=8,
            batch=5,
            batched_rate=5.0,
            single_devices=8,
            single_rate=5.0,
            ceiling_points=10_000,
            idle_devices=20,
            idle_connect_s=0.5,
            storm_devices=20,
            config_round_trips=3,
            final_wait_s=5.0,
            spread_connections=20,
            compare_rate=5.0,
            compare_connect_s=0.3,
            compare_rounds=1,
            takeover_moves=5,
            push_devices=20,
            push_connects_per_s=40.0,
        )


@dataclass
class Scenario:
    """One scenario's figures and time series."""

    name: str
    title: str
    metrics: dict[str, Any] = field(default_factory=dict)
    series: list[dict[str, Any]] = field(default_factory=list)


def as_json(scenario: Scenario) -> dict[str, Any]:
    """A scenario as JSON-friendly data."""
    return asdict(scenario)
