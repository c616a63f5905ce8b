"""The servers a benchmark runs against: InfluxDB, and `hub serve` as its own process."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from device_sim.bench.procstat import ProcessSample, tree_sample
from device_sim.hub_process import HubProcess
from device_sim.local_servers import LocalServer, create_database, influxql
from device_sim.sensors import MEASUREMENT, SCHEMA_TOML


def hub_arguments(work_dir: Path) -> list[str]:
    """`hub serve` options of every benchmarked hub: the v1 API and the simulator's
    measurement schema (written into `work_dir`)."""
    schemas = work_dir / "schemas.toml"
    schemas.write_text(SCHEMA_TOML)
    return ["--influx-api", "v1", "--schemas", str(schemas)]


def start_hub(
    state_dir: Path,
    influx: LocalServer,
    database: str,
    *args: str,
    env: Mapping[str, str] | None = None,
) -> HubProcess:
    """A (not yet started) `hub serve` writing to a new `database`, with the simulator's
    measurement schema, on the v1 API; `args` go to `hub serve` after those."""
    create_database(influx.url, database)
    hub = HubProcess(state_dir, influx, database, *hub_arguments(state_dir.parent), *args, env=env)
    hub.log_path = state_dir.parent / f"hub-{database}.log"
    return hub


def hub_sample(hub: HubProcess) -> ProcessSample:
    """The hub's CPU seconds and memory now: with `--workers N`, the supervisor's and every
    worker's together."""
    return tree_sample(hub.pid)


def stored_readings(influx: LocalServer, database: str) -> int:
    """Readings InfluxDB holds in `database`."""
    query = f'SELECT count("temperature") FROM "{MEASUREMENT}"'  # noqa: S608 (constants)
    rows = influxql(influx.url, database, query)
    return int(rows[0]["count"]) if rows else 0
