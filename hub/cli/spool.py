"""`hub spool status` and `hub spool replay`: what waits on disk for InfluxDB, and writing it
there from any machine.

A state directory holds one spool per process that wrote it: `spool/` for a hub of its own,
`workers/K/spool/` for worker K of `hub serve --workers N` (`hub.workers.slots`). Both
commands take them all.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from hub.cli.common import ConfigOption, StateDirOption, fail, settings_from, when
from hub.errors import HubError, SpoolInUse
from hub.ingest.spool import SpoolStatus, read_status
from hub.ingest.spoollock import holder_of
from hub.options import InfluxOptions
from hub.workers.slots import spool_directories

if TYPE_CHECKING:
    from hub.ingest.spoolreplay import ReplayProgress

spool_app = typer.Typer(
    help="The disk spools of batches waiting for InfluxDB.", no_args_is_help=True
)


def _report(directory: Path, status: SpoolStatus, max_bytes: int) -> dict[str, Any]:
    return {
        "directory": str(directory),
        "segments": status.segments,
        "bytes": status.bytes,
        "max_bytes": max_bytes,
        "batches": status.batches,
        "readings": status.points,
        "oldest": when(status.oldest),
        "oldest_age_s": None if status.oldest is None else round(time.time() - status.oldest, 1),
        "damaged_bytes": status.skipped_bytes,
    }


@spool_app.command("status")
def spool_status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Segments, bytes, batches and readings waiting for InfluxDB, and the oldest one's age:
    all spools together, then each (the hub's own, each worker's) with the pid holding it."""
    settings = settings_from(config, state_dir=state_dir)
    spools = spool_directories(settings.state_dir) or [("hub", settings.spool_dir)]
    statuses = [read_status(directory) for _, directory in spools]
    each = [
        {
            "name": name,
            **_report(directory, status, settings.spool_max_bytes),
            "held_by_pid": holder_of(directory),
        }
        for (name, directory), status in zip(spools, statuses, strict=True)
    ]
    oldest = [s.oldest for s in statuses if s.oldest is not None]
    total = SpoolStatus(
        segments=sum(s.segments for s in statuses),
        bytes=sum(s.bytes for s in statuses),
        batches=sum(s.batches for s in statuses),
        points=sum(s.points for s in statuses),
        oldest=min(oldest) if oldest else None,
        skipped_bytes=sum(s.skipped_bytes for s in statuses),
    )
    report = _report(settings.state_dir, total, settings.spool_max_bytes * len(spools))
    if as_json:
        typer.echo(json.dumps({**report, "spools": each}, indent=2))
        return
    for key, value in report.items():
        typer.echo(f"{key + ':':<24}{'-' if value is None else value}")
    if len(each) > 1 or each[0]["name"] != "hub":
        for entry in each:
            holder = entry["held_by_pid"]
            typer.echo(
                f"{entry['name'] + ':':<24}{entry['readings']} readings in {entry['batches']} "
                f"batches, {entry['bytes']} bytes"
                + (f"; held by pid {holder}" if holder is not None else "; no live process")
            )


@spool_app.command("replay")
def spool_replay(
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
    influx_url: Annotated[str | None, typer.Option(help="InfluxDB base URL.")] = None,
    influx_bucket: Annotated[
        str | None, typer.Option(help="v2 bucket, or v1 database as db or db/rp [sensors].")
    ] = None,
    influx_org: Annotated[str | None, typer.Option(help="v2 organisation.")] = None,
    timeout: Annotated[
        float, typer.Option(min=1, help="Give up after this many seconds per spool.")
    ] = 600.0,
) -> None:
    """Write every spool of a state directory (a dead hub's, from its disk) to InfluxDB,
    with progress on stderr and the counts at the end. A spool a live process holds (its
    hub runs) is refused: that hub replays it itself. Exits 2 if any spool was refused or
    not emptied within --timeout; what was written is gone from the spool, the rest stays.
    The token comes as for `hub serve` (HUB_INFLUX_TOKEN, credential, config file)."""
    settings = settings_from(
        config,
        state_dir=state_dir,
        influx_url=influx_url,
        influx_bucket=influx_bucket,
        influx_org=influx_org,
    )
    if settings.influx_url is None:
        fail("no InfluxDB to replay to: give --influx-url (or HUB_INFLUX_URL, influx_url)")
    spools = spool_directories(settings.state_dir)
    if not spools:
        fail(f"no spool in {settings.state_dir} (looked for spool/ and workers/*/spool/)")
    # Imported here: the replay's InfluxDB client and pipeline cost a few hundred ms of
    # start-up that every other `hub` command would pay.
    from hub.ingest.sinks import open_sink
    from hub.ingest.spoolreplay import replay_spool
    from hub.ops.runtime import run_event_loop

    async def replay_all() -> list[str]:
        problems: list[str] = []
        for name, directory in spools:
            if read_status(directory).batches == 0:
                typer.echo(f"{name}: {directory} is empty", err=True)
                continue
            sink = await open_sink(InfluxOptions.of(settings))
            try:
                final = await replay_spool(
                    directory, settings, sink, timeout, functools.partial(_progress, name)
                )
            except SpoolInUse as exc:
                await sink.close()
                problems.append(f"{name}: {exc}")
                typer.echo(f"error: {name}: {exc}", err=True)
                continue
            if not final.done:
                problems.append(f"{name}: not empty after {timeout:g} s")
        return problems

    try:
        problems = run_event_loop(replay_all())
    except HubError as exc:
        fail(str(exc))
    if problems:
        fail("; ".join(problems))


def _progress(name: str, progress: ReplayProgress) -> None:
    state = "done" if progress.done else "replaying"
    line = (
        f"{name}: {state}: {progress.readings_written}/{progress.readings_total} readings "
        f"written, {progress.readings_dead_lettered} to the dead letters, "
        f"{progress.batches_total} batches, {progress.seconds:.1f} s"
    )
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
