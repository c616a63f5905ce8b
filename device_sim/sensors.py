"""Realistic sensor values: smooth random walks with a little noise, like a real room sensor.

Walks are precomputed, a cycle of values per quantity, so a simulated device spends
nanoseconds, not microseconds, per reading: a load generator must stay cheaper than the hub
it measures. A process computes `VARIANTS` walks once and each device starts at its own
point of one of them, so ten thousand devices start in milliseconds.

Readings are also prepacked (`SensorProfile.packed_reading`): the msgpack bytes of the same
map, spliced from bytes packed once per device and per step of a walk, so that a load
generator spends its CPU on the connection, not on packing the same maps again; the frame
around them is `readings_frame`. They are byte for byte what `msgpack.packb` makes of the
maps (tests/test_simulator.py).

`invalid_ratio` makes some readings out of range (a humidity above 100 %), the kind of
value a broken sensor sends and the hub's measurement schema should reject.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import msgpack

from schemas.messages import Reading

MEASUREMENT = "environment"
QUANTITIES = ("temperature", "humidity", "pressure", "battery")
CYCLE = 997
"""Steps of a precomputed walk; a prime, so devices' cycles rarely line up."""
VARIANTS = 32
OUT_OF_RANGE_HUMIDITY = 140.0
"""What a broken humidity sensor reports: above the 0-100 % the measurement schema allows."""

SCHEMA_TOML = """\
accept_unknown_measurements = true

[measurements.environment]
tags = ["room"]
[measurements.environment.fields]
temperature = { type = "float", min = -40, max = 85, required = true }
humidity    = { type = "float", min = 0, max = 100 }
pressure    = { type = "float", min = 800, max = 1100 }
battery     = { type = "float", min = 0, max = 5 }
"""
"""A measurement schema for the hub that accepts these readings and rejects invalid ones."""


def _walk(rng: random.Random, start: float, step: float, low: float, high: float) -> list[float]:
    """A bounded random walk that comes back to its start, so the cycle has no jump."""
    values, value = [], start
    for _ in range(CYCLE):
        value = min(high, max(low, value + rng.gauss(0, step)))
        values.append(value)
    drift = (values[-1] - start) / CYCLE
    return [v - drift * (i + 1) for i, v in enumerate(values)]


@functools.cache
def _variant(number: int) -> list[dict[str, float]]:
    """One precomputed cycle of all four quantities, the same in every process."""
    rng = random.Random(number)
    temperature = _walk(rng, rng.uniform(18, 24), 0.05, -10, 40)
    humidity = _walk(rng, rng.uniform(35, 55), 0.1, 5, 95)
    pressure = _walk(rng, rng.uniform(990, 1030), 0.02, 950, 1050)
    battery = _walk(rng, rng.uniform(3.6, 4.2), 0.001, 3.0, 4.2)
    return [
        {
            "temperature": round(t + rng.uniform(-0.02, 0.02), 3),
            "humidity": round(h, 2),
            "pressure": round(p, 2),
            "battery": round(b, 3),
        }
        for t, h, p, b in zip(temperature, humidity, pressure, battery, strict=True)
    ]


@functools.cache
def _packed_variant(number: int) -> list[bytes]:
    """`_variant(number)`'s field maps, each packed."""
    return [_pack(fields) for fields in _variant(number)]


def _pack(value: object) -> bytes:
    packed: bytes = msgpack.packb(value)
    return packed


_READINGS_HEAD = _pack("type") + _pack("readings") + _pack("seq")
_READINGS_KEY = _pack("readings")


def readings_frame(seq: int, packed_readings: list[bytes]) -> bytes:
    """The frame of a `readings` message of already packed readings: the bytes
    `msgpack.packb({"type": "readings", "seq": seq, "readings": [...]})` gives."""
    packer = msgpack.Packer()
    return b"".join(
        (
            packer.pack_map_header(3),
            _READINGS_HEAD,
            packer.pack(seq),
            _READINGS_KEY,
            packer.pack_array_header(len(packed_readings)),
            *packed_readings,
        )
    )


class SensorProfile:
    """One device's sensors: temperature, humidity, pressure and battery voltage."""

    def __init__(self, rng: random.Random, room: str, invalid_ratio: float = 0.0) -> None:
        self.room = room
        self.invalid_ratio = invalid_ratio
        self._rng = rng
        self._variant_number = rng.randrange(VARIANTS)
        self._fields = _variant(self._variant_number)
        self._tags = {"room": room}
        self._step = rng.randrange(CYCLE)
        self._packed_fields = _packed_variant(self._variant_number)
        # The map of `reading` is {name, time, tags, fields}: before the time, and after it.
        self._head = b"\x84" + _pack("name") + _pack(MEASUREMENT) + _pack("time")
        self._middle = _pack("tags") + _pack(self._tags) + _pack("fields")

    def reading(self, time: int) -> Reading:
        """The next reading, stamped `time` (in the connection's precision)."""
        self._step = (self._step + 1) % CYCLE
        fields: dict[str, Any] = self._fields[self._step]
        if self.invalid_ratio and self._rng.random() < self.invalid_ratio:
            fields = {**fields, "humidity": OUT_OF_RANGE_HUMIDITY}
        return {"name": MEASUREMENT, "time": time, "tags": self._tags, "fields": fields}

    def packed_reading(self, time: int) -> bytes:
        """The next reading as msgpack: what `msgpack.packb(self.reading(time))` gives, at a
        fraction of the cost (the same walk, the same invalid readings)."""
        self._step = (self._step + 1) % CYCLE
        if self.invalid_ratio and self._rng.random() < self.invalid_ratio:
            fields = {**self._fields[self._step], "humidity": OUT_OF_RANGE_HUMIDITY}
            return self._head + _pack(time) + self._middle + _pack(fields)
        return self._head + _pack(time) + self._middle + self._packed_fields[self._step]
