"""The hub's pure core per reading: decode a frame, validate, format line protocol.

    python benchmarks/bench_core.py [--batch 50] [--seconds 2] [--no-schema] [--no-field-types]

Prints microseconds of thread CPU per reading for each step and for the whole core (the best
of many short rounds, interleaved, so that other work on the machine inflates it least), for
messages of `--batch` readings with four float fields and one tag, as the simulator sends,
validated against the simulator's measurement schema (what `device-sim bench` gives the
hub), or with `--no-schema` by the general rules alone. "whole core" takes the session's
path: `decode_device_frame` (frames over 16 KiB, from about 120 readings, are scanned and
prepared a slice at a time, `hub.frames` and `hub.slices`), then the ack. Formatting
includes the check of field types against the hub-wide catalog (`hub.fieldtypes`), as when
the hub writes to InfluxDB; `--no-field-types` leaves it out, as for VictoriaMetrics. The
last line is what the check adds per reading, measured the same way with and without it.
"""

from __future__ import annotations

import argparse
import time
import tomllib
from collections.abc import Callable

import msgpack

from device_sim.sensors import SCHEMA_TOML
from hub.core.dialects import Dialect
from hub.core.fieldtypes import FieldTypes
from hub.core.frames import FrameLimits, SlicedReadings, decode_device_frame
from hub.core.measurements import MeasurementSchemas, SchemaFile
from hub.core.protocol import DEFAULT_MAX_DEPTH, ReadingsFrame, decode_frame, encode_ack
from hub.core.readings import PreparedReadings, prepare_readings
from hub.core.slices import prepare_in_slices
from hub.options import time_limits
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


def cpu_us(step: Callable[[], object], per_call: int, seconds: float) -> float:
    """Thread-CPU microseconds per reading over one round of `step` calls."""
    calls, started = 0, time.thread_time()
    while (elapsed := time.thread_time() - started) < seconds:
        step()
        calls += 1
    return elapsed / (calls * per_call) * 1e6


def best_cpu_us(steps: list[Callable[[], object]], per_call: int, seconds: float) -> list[float]:
    """The best thread-CPU microseconds per reading of each of `steps`, over rounds of
    0.05 s taking turns for about `seconds` in all."""
    best = [float("inf")] * len(steps)
    for _ in range(max(1, int(seconds / 0.05 / len(steps)))):
        for n, step in enumerate(steps):
            best[n] = min(best[n], cpu_us(step, per_call, 0.05))
    return best


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--no-schema", action="store_true", help="no measurement schema")
    parser.add_argument("--no-field-types", action="store_true", help="no field type check")
    args = parser.parse_args()
    frame = message(args.batch)
    source = (
        SchemaFile() if args.no_schema else SchemaFile.model_validate(tomllib.loads(SCHEMA_TOML))
    )
    validator = MeasurementSchemas(source).validator(10**6)
    decoded = decode_frame(frame, 5000)
    assert isinstance(decoded, ReadingsFrame)
    readings = decoded.readings
    field_types = None if args.no_field_types else FieldTypes()
    # As the hub runs against InfluxDB 1.x with default settings: its dialect and time limits.
    dialect, limits = Dialect.INFLUXDB_1, time_limits(Settings())

    def decode() -> object:
        return decode_frame(frame, 5000)

    def validate() -> object:
        return validator.validate(readings)

    def prepare() -> object:
        return prepare_readings(
            readings,
            validator,
            "dev-1",
            10**6,
            time.time_ns(),
            dialect,
            DEFAULT_MAX_DEPTH,
            limits,
            field_types,
        )

    frame_limits = FrameLimits(max_readings=5000)

    def whole() -> object:
        arrival_ns = time.time_ns()
        event = decode_device_frame(frame, frame_limits)

        def part(items: list[object], first: int) -> PreparedReadings:
            return prepare_readings(
                items,
                validator,
                "dev-1",
                10**6,
                arrival_ns + first,
                dialect,
                DEFAULT_MAX_DEPTH,
                limits,
                field_types,
            )

        if isinstance(event, ReadingsFrame):
            prepared = part(event.readings, 0)
        else:
            assert isinstance(event, SlicedReadings)
            steps = prepare_in_slices(event.readings, part, frame_limits)
            while True:
                try:
                    next(steps)
                except StopIteration as done:
                    prepared = done.value
                    break
        return encode_ack(1, prepared.accepted, prepared.reasons)

    schema = "no schema" if args.no_schema else "the simulator's schema"
    checked = "without" if field_types is None else "with"
    print(f"{args.batch} readings a message, {len(frame)} bytes, {schema}, {checked} field types")
    steps = [
        ("decode (msgpack + envelope)", decode),
        ("validate (pydantic)", validate),
        ("validate + format (prepare_readings)", prepare),
        ("whole core", whole),
    ]
    for (name, _), us in zip(
        steps, best_cpu_us([s for _, s in steps], args.batch, args.seconds), strict=True
    ):
        print(f"{name:<40} {1e6 / us:>12,.0f} readings/s  {us:6.2f} us/reading")
    if field_types is not None:
        catalog = field_types

        def without_check() -> object:
            return prepare_readings(readings, validator, "dev-1", 10**6, time.time_ns())

        def with_check() -> object:
            return prepare_readings(
                readings, validator, "dev-1", 10**6, time.time_ns(), field_types=catalog
            )

        best = best_cpu_us([without_check, with_check], args.batch, args.seconds)
        print(
            f"{'field type check (best thread CPU)':<40} {best[0]:.2f} -> {best[1]:.2f} "
            f"us/reading ({best[1] - best[0]:+.2f})"
        )


if __name__ == "__main__":
    main()
