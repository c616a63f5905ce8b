"""The write pipeline's own cost per message: submit, seal, write to a sink that does nothing,
settle the futures.

    python benchmarks/bench_pipeline.py [--messages 200000] [--readings 1] [--rounds 5]

Prints the best thread-CPU microseconds per message (and per reading) of `--rounds` rounds
of `--messages` messages of `--readings` readings each, submitted as a session does
(`has_room`, then `submit_nowait`, else `submit`) and drained. The sink answers at once, so
this is the hub's pipeline alone: no InfluxDB, no sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from hub.core.dialects import Dialect
from hub.ingest.deadletters import DeadLetterFile
from hub.ingest.pipeline import Pipeline
from hub.options import BatchOptions
from hub.settings import Settings


class NullSink:
    """Takes every write at once."""

    name = "null"
    dialect = Dialect.VICTORIA_METRICS  # no field types: nothing asked of a server

    async def detect(self) -> None:
        """Nothing to learn."""

    async def write(self, body: bytes) -> None:
        """Store nothing."""

    async def close(self) -> None:
        """Nothing to release."""


async def one_round(state: Path, messages: int, readings: int) -> float:
    """Thread-CPU seconds to push `messages` messages through a fresh pipeline."""
    settings = Settings(state_dir=state, influx_url="http://null.invalid")
    pipeline = Pipeline(
        NullSink(), DeadLetterFile(state / "dead.jsonl", 2**20), BatchOptions.of(settings)
    )
    pipeline.start()
    lines = "\n".join(f"m,device=d1 v={n} {n + 1}" for n in range(readings))
    started = time.thread_time()
    for _ in range(messages):
        if pipeline.has_room(readings):
            pipeline.submit_nowait(lines, readings)
        else:
            await pipeline.submit(lines, readings)
    await pipeline.drain()
    spent = time.thread_time() - started
    await pipeline.close()
    return spent


def main() -> None:
    """Run the rounds and print the best."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--readings", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        best = min(
            asyncio.run(one_round(Path(directory), args.messages, args.readings))
            for _ in range(args.rounds)
        )
    per_message = best / args.messages * 1e6
    print(
        f"pipeline, {args.readings} readings a message: {per_message:.2f} us/message, "
        f"{per_message / args.readings:.3f} us/reading (best thread CPU of {args.rounds})"
    )


if __name__ == "__main__":
    main()
