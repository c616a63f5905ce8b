"""How the hub's processes run: the event loop they use, and the garbage collector's pace.

Both are set for a process that streams many small messages, and both are used by `hub
serve`, `device-sim run` and the benchmark's load generators alike.

* **uvloop** replaces asyncio's default event loop when it is installed (it is a dependency
  on Linux and macOS). Measured with `device-sim bench --only batched --only single`: ack
  latency p99 at half the maximum rate (65k readings/s then) 92-125 ms -> 60-63 ms, and
  about 5 % less hub CPU per message with one reading a message. Without it (Windows),
  asyncio's own loop runs the same code.
* **The cyclic garbage collector** ran every few messages at CPython's default threshold of
  700 allocations: every readings message makes a few hundred short-lived containers
  (decoded maps, validated copies) that reference counting frees anyway, and each run walked
  what was alive at the time. With `tune_garbage_collector`: hub CPU per reading 7.8 ->
  6.2 us, and SensorProfile.reading left the top of the load generator's profile.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

YOUNG_GENERATION_THRESHOLD = 50_000
"""Allocations between collections of the youngest generation (CPython's default: 700)."""


def tune_garbage_collector() -> None:
    """Move everything allocated so far out of the collector's sight, and collect the young
    generation every `YOUNG_GENERATION_THRESHOLD` allocations. Call once start-up is done."""
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *gc.get_threshold()[1:])


def event_loop_name() -> str:
    """The event loop `run_event_loop` uses: "uvloop" when it is installed, else "asyncio"."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on uvloop's event loop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
