"""How long one hostile frame holds the event loop: before (decoded and prepared in one
call) and after (`hub.frames` scans it, `hub.slices` prepares it a slice at a time).

    python benchmarks/bench_frames.py [--rounds 5]

For each frame shape, prints the frame's size, the total CPU time of the hub's pure core for
it, and the longest stretch without a yield (the loop stall another device's ack waits
behind), best of `--rounds`. "Before" is `decode_frame` + `prepare_readings` + the ack, as
every frame was handled until the scan existed (and as frames of at most 16 KiB still are);
"after" is what `DeviceSession` does now: `decode_device_frame`, `prepare_in_slices` with a
yield between slices, then the ack in one step.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack

from hub.core.frames import FrameLimits, SlicedReadings, SlicedTelegraf, decode_device_frame
from hub.core.measurements import MeasurementSchemas, ReadingLimits
from hub.core.protocol import ReadingsFrame, TelegrafFrame, decode_frame, encode_ack
from hub.core.readings import PreparedReadings, prepare_readings
from hub.core.slices import prepare_in_slices, prepare_list_in_slices

MS = 10**6
LIMITS = FrameLimits(max_readings=5000)
VALIDATOR = MeasurementSchemas().validator(MS, ReadingLimits.defaults())


def pack(obj: object) -> bytes:
    """msgpack as a device sends it."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def readings(items: list[Any]) -> bytes:
    """A readings message."""
    return pack({"type": "readings", "seq": 1, "readings": items})


def shapes() -> dict[str, bytes]:
    """Frame shapes within every default limit (1 MiB, 5000 readings, depth 8)."""
    valid = {"name": "environment", "time": 1_700_000_000_000, "tags": {"room": "kitchen"},
             "fields": {"temperature": 21.5, "humidity": 48.25, "pressure": 1013.2}}  # fmt: skip
    junk = {"name": "m", "fields": {"x": None}, "junk": [None] * 180}
    small_junk = {"name": "m", "fields": {"x": None}, "junk": [None] * 40}
    return {
        "issue 16: 5000 arrays of 205 empty maps": readings([[{}] * 205] * 5000),
        "5000 rejected maps, 180 nils under an unknown key": readings([junk] * 5000),
        "5000 rejected maps, 40 nils (within the object cap)": readings([small_junk] * 5000),
        "5000 nil readings": readings([None] * 5000),
        "one reading, 1M nils under an unknown key": readings(
            [{"name": "m", "fields": {"x": 1.0}, "junk": [[None] * 4000] * 250}]
        ),
        "Telegraf: 5000 metrics of 180 nils": b"".join(pack(junk) for _ in range(5000)),
        "valid: 5000 readings of 3 fields": readings([valid] * 5000),
    }


def prepare(items: list[Any], first_index: int) -> PreparedReadings:
    """What a session does with a slice."""
    return prepare_readings(items, VALIDATOR, "dev", MS, first_index)


def ack(prepared: PreparedReadings) -> bytes:
    """The rest of a session's work on a message, done without a yield."""
    return encode_ack(1, prepared.accepted, prepared.reasons)


def before(frame: bytes) -> Iterator[None]:
    """The whole frame in one step."""
    try:
        event = decode_frame(frame, LIMITS.max_readings, LIMITS.max_depth)
    except Exception:  # a refused frame costs what it cost
        return
    assert isinstance(event, ReadingsFrame | TelegrafFrame)
    raw = event.readings if isinstance(event, ReadingsFrame) else event.metrics
    try:
        ack(prepare(raw, 0))
    except Exception:
        return
    del event, raw
    yield


def after(frame: bytes) -> Iterator[None]:
    """Steps as the session takes them: scan, slices, ack."""
    try:
        event = decode_device_frame(frame, LIMITS)
    except Exception:
        return
    yield
    if isinstance(event, ReadingsFrame | TelegrafFrame):  # a small frame: decoded already
        raw = event.readings if isinstance(event, ReadingsFrame) else event.metrics
        steps = prepare_list_in_slices(raw, prepare)
    else:
        assert isinstance(event, SlicedReadings | SlicedTelegraf)
        items = event.readings if isinstance(event, SlicedReadings) else event.metrics
        stream = isinstance(event, SlicedTelegraf)
        steps = prepare_in_slices(items, prepare, LIMITS, stream=stream)
    try:
        while True:
            next(steps)
            yield
    except StopIteration as done:
        ack(done.value)
    except Exception:
        return
    yield


def measure(steps: Callable[[bytes], Iterator[None]], frame: bytes) -> tuple[float, float, int]:
    """(total s, longest step s, steps) for one frame; garbage collected beforehand."""
    gc.collect()
    longest = total = 0.0
    count = 0
    iterator = steps(frame)
    while True:
        started = time.perf_counter()
        try:
            next(iterator)
        except StopIteration:
            elapsed = time.perf_counter() - started
            total += elapsed
            longest = max(longest, elapsed)
            return total, longest, count + 1
        elapsed = time.perf_counter() - started
        total += elapsed
        longest = max(longest, elapsed)
        count += 1


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{'frame shape':<52} {'bytes':>9}  {'before: stall':>13}  {'after: stall':>12}"
          f"  {'total':>8}  steps")  # fmt: skip
    for name, frame in shapes().items():
        old = min(measure(before, frame) for _ in range(args.rounds))
        new = min((measure(after, frame) for _ in range(args.rounds)), key=lambda r: r[1])
        print(
            f"{name:<52} {len(frame):>9,}  {old[1] * 1e3:>10.1f} ms  {new[1] * 1e3:>9.1f} ms"
            f"  {new[0] * 1e3:>5.1f} ms  {new[2]}"
        )


if __name__ == "__main__":
    main()
