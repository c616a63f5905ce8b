"""The hub's pure core per reading: decode a frame, validate, format line protocol.

    python benchmarks/bench_core.py [--batch 50] [--seconds 2] [--no-schema]

Prints readings/s and microseconds per reading for each step and for the whole core, for
messages of `--batch` readings with four float fields and one tag, as the simulator sends,
validated against the simulator's measurement schema (what `device-sim bench` gives the
hub), or with `--no-schema` by the general rules alone.
"""

from __future__ import annotations

import argparse
import time
import tomllib
from collections.abc import Callable

import msgpack

from device_sim.sensors import SCHEMA_TOML
from hub.dialects import Dialect
from hub.measurements import MeasurementSchemas, SchemaFile
from hub.protocol import DEFAULT_MAX_DEPTH, ReadingsFrame, decode_frame
from hub.readings import TimeLimits, prepare_readings
from hub.settings import Settings


def message(batch: int) -> bytes:
    """A readings message like a simulated environment sensor's."""
    base = 1_700_000_000_000
    readings = [
        {
            "name": "environment",
            "time": base + n,
            "tags": {"room": "kitchen"},
            "fields": {
                "temperature": 21.5 + n / 100,
                "humidity": 48.25,
                "pressure": 1013.2,
                "battery": 3.91,
            },
        }
        for n in range(batch)
    ]
    packed: bytes = msgpack.packb({"type": "readings", "seq": 1, "readings": readings})
    return packed


def rate(step: Callable[[], object], seconds: float) -> float:
    """Calls per second of `step`, best of three rounds."""
    best = 0.0
    for _ in range(3):
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds / 3:
            step()
            calls += 1
        best = max(best, calls / elapsed)
    return best


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--no-schema", action="store_true", help="no measurement schema")
    args = parser.parse_args()
    frame = message(args.batch)
    source = (
        SchemaFile() if args.no_schema else SchemaFile.model_validate(tomllib.loads(SCHEMA_TOML))
    )
    validator = MeasurementSchemas(source).validator(10**6)
    decoded = decode_frame(frame, 5000)
    assert isinstance(decoded, ReadingsFrame)
    readings = decoded.readings
    # As the hub runs against InfluxDB 1.x with default settings: its dialect and time limits.
    dialect, limits = Dialect.INFLUXDB_1, TimeLimits.of(Settings())

    def decode() -> object:
        return decode_frame(frame, 5000)

    def validate() -> object:
        return validator.validate(readings)

    def prepare() -> object:
        return prepare_readings(
            readings, validator, "dev-1", 10**6, time.time_ns(), dialect, DEFAULT_MAX_DEPTH, limits
        )

    def whole() -> object:
        event = decode_frame(frame, 5000)
        assert isinstance(event, ReadingsFrame)
        return prepare_readings(
            event.readings,
            validator,
            "dev-1",
            10**6,
            time.time_ns(),
            dialect,
            DEFAULT_MAX_DEPTH,
            limits,
        )

    schema = "no schema" if args.no_schema else "the simulator's schema"
    print(f"{args.batch} readings a message, {len(frame)} bytes, {schema}")
    for name, step in [
        ("decode (msgpack + envelope)", decode),
        ("validate (pydantic)", validate),
        ("validate + format (prepare_readings)", prepare),
        ("whole core", whole),
    ]:
        per_s = rate(step, args.seconds) * args.batch
        print(f"{name:<40} {per_s:>12,.0f} readings/s  {1e6 / per_s:6.2f} us/reading")


if __name__ == "__main__":
    main()
