"""The servers a benchmark runs against: InfluxDB, and `hub serve` as its own process."""

from __future__ import annotations

from pathlib import Path

from device_sim.bench.procstat import ProcessSample, sample
from device_sim.hub_process import HubProcess
from device_sim.local_servers import LocalServer, create_database
from device_sim.sensors import SCHEMA_TOML


def start_hub(
    state_dir: Path, influx: LocalServer, database: str, environment: dict[str, str] | None = None
) -> HubProcess:
    """A (not yet started) `hub serve` writing to a new `database`, with the simulator's
    measurement schema, on the v1 API."""
    schemas = state_dir.parent / "schemas.toml"
    schemas.write_text(SCHEMA_TOML)
    create_database(influx.url, database)
    hub = HubProcess(
        state_dir,
        influx,
        database,
        "--influx-api", "v1",
        "--schemas", str(schemas),
        env=environment,
    )  # fmt: skip
    hub.log_path = state_dir.parent / f"hub-{database}.log"
    return hub


def hub_sample(hub: HubProcess) -> ProcessSample:
    """The hub's CPU seconds and memory now."""
    return sample(hub.pid)
