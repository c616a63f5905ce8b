"""Benchmark hub.lineprotocol.format_point: prints points/s for typical points.

Run: python benchmarks/bench_lineprotocol.py [--seconds S]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub.core.lineprotocol import FieldValue, format_point

TAGS = {"room": "kitchen", "device": "dev-0042"}
FIELDS: dict[str, FieldValue] = {
    "temperature": 21.5,
    "humidity": 48.25,
    "battery": 87,
    "door_open": False,
}
TIME_NS = 1_700_000_000_123_456_789


def _rate(func: Callable[[], object], seconds: float) -> float:
    """Call `func` in batches for about `seconds`; return the best calls/s of 5 rounds."""
    best = 0.0
    batch = 10_000
    for _ in range(5):
        deadline = time.perf_counter() + seconds / 5
        calls = 0
        start = time.perf_counter()
        while time.perf_counter() < deadline:
            for _ in range(batch):
                func()
            calls += batch
        best = max(best, calls / (time.perf_counter() - start))
    return best


def _influxdb_client_rate(seconds: float) -> float | None:
    try:
        from influxdb_client.client.write import point as point_module
    except ImportError:
        return None
    Point: Any = point_module.Point  # untyped library class

    def one() -> object:
        p = Point("climate").time(TIME_NS)
        for k, v in TAGS.items():
            p = p.tag(k, v)
        for k, f in FIELDS.items():
            p = p.field(k, f)
        return p.to_line_protocol()

    return _rate(one, seconds)


def main() -> None:
    """Print points/s for format_point (and influxdb_client.Point for comparison)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.5, help="time per case")
    args = parser.parse_args()

    # More distinct tag sets than the cache holds: every call escapes and checks anew.
    uncached = itertools.cycle([{"room": "kitchen", "device": f"dev-{i}"} for i in range(50_000)])
    cases: dict[str, Callable[[], object]] = {
        "format_point 4 fields 2 tags": lambda: format_point("climate", TAGS, FIELDS, TIME_NS),
        "format_point + escapes (space, comma, non-ASCII)": lambda: format_point(
            "Küche climate", {"room": "Küche, 2. OG", "device": "dev 1"}, FIELDS, TIME_NS
        ),
        "format_point 1 float field, no tags": lambda: format_point(
            "climate", {}, {"t": 21.5}, TIME_NS
        ),
        "format_point 4 fields 2 tags, tag set never cached": lambda: format_point(
            "climate", next(uncached), FIELDS, TIME_NS
        ),
        "format_point 4 fields 2 tags, string field": lambda: format_point(
            "climate", TAGS, {**FIELDS, "door_open": 'state "open"'}, TIME_NS
        ),
    }
    print(f"python {sys.version.split()[0]}, {args.seconds:.1f} s per case, best of 5 rounds")
    print(f"line: {format_point('climate', TAGS, FIELDS, TIME_NS)}")
    for name, func in cases.items():
        print(f"{name:52} {_rate(func, args.seconds):>12,.0f} points/s")
    reference = _influxdb_client_rate(args.seconds)
    if reference is not None:
        print(f"{'influxdb_client.Point (reference)':52} {reference:>12,.0f} points/s")


if __name__ == "__main__":
    main()
