"""Who a worker is: its slot K of N, its node id, and the directory only it uses.

The supervisor starts each worker as the same `hub serve` command line with one more
environment variable, `SENSOR_HUB_WORKER=K/N` (not a `HUB_` setting: an operator never sets
it). The worker reads the same settings from the same sources as the supervisor, so a
SIGHUP reload reads them again exactly as a single hub does, and then takes its slot:

    STATE_DIR/workers/K/spool/               its spool, locked (hub.ingest.spoollock)
    STATE_DIR/workers/K/dead-letters.jsonl   its dead letters

The registry (`STATE_DIR/registry.sqlite3`) is shared by all. Pure, but for `socket.gethostname`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from hub.errors import ConfigError, SpoolInUse
from hub.ingest.spool import SEGMENT_SUFFIX, move_segments
from hub.settings import Settings

log = logging.getLogger("hub.workers")

WORKER_VARIABLE = "SENSOR_HUB_WORKER"
WORKERS_DIR = "workers"
WORKER_HEALTH_HOST = "127.0.0.1"
"""A worker's own /healthz and /metrics: loopback, for the supervisor only."""
HEALTH_PORT_KEY = "HUB_HEALTH_PORT"
"""Sent with a worker's READY=1: where its /healthz and /metrics listen."""


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Worker `number` (from 1) of `count`, in `state_dir`."""

    number: int
    count: int
    state_dir: Path
    node_id: str

    @property
    def directory(self) -> Path:
        """What only this slot's process uses."""
        return slot_directory(self.state_dir, self.number)

    @property
    def spool_dir(self) -> Path:
        """The slot's spool, replayed by whichever process takes the slot next."""
        return self.directory / "spool"

    @property
    def dead_letter_path(self) -> Path:
        """The slot's dead letters (rotated files are not shared between processes)."""
        return self.directory / "dead-letters.jsonl"

    @property
    def name(self) -> str:
        """`worker K/N`, for log lines."""
        return f"worker {self.number}/{self.count}"


def slot_directory(state_dir: Path, number: int) -> Path:
    """`STATE_DIR/workers/K`."""
    return state_dir / WORKERS_DIR / str(number)


def slot_numbers(state_dir: Path) -> list[int]:
    """The slots that have a directory in `state_dir`, in order (for a dead hub's spools)."""
    found = []
    root = state_dir / WORKERS_DIR
    if root.is_dir():
        for entry in root.iterdir():
            if entry.is_dir() and entry.name.isdigit() and int(entry.name) > 0:
                found.append(int(entry.name))
    return sorted(found)


def spool_directories(state_dir: Path) -> list[tuple[str, Path]]:
    """Every spool a state directory holds, named: `hub` (`STATE_DIR/spool`, a hub of its
    own) and `worker K` (`STATE_DIR/workers/K/spool`), those that exist, in that order."""
    found = [("hub", state_dir / "spool")] if (state_dir / "spool").is_dir() else []
    for number in slot_numbers(state_dir):
        spool = WorkerSlot(number, number, state_dir, "").spool_dir
        if spool.is_dir():
            found.append((f"worker {number}", spool))
    return found


def orphan_spools(state_dir: Path, workers: int) -> list[Path]:
    """The spools in `state_dir` that no process of a hub with `workers` workers takes:
    the single hub's (`spool/`) when there are several workers, and every slot's past
    `workers` (each slot's when there is one process)."""
    orphans = []
    for name, directory in spool_directories(state_dir):
        if name == "hub":
            if workers > 1:
                orphans.append(directory)
        elif workers == 1 or int(name.split()[1]) > workers:
            orphans.append(directory)
    return orphans


def adopt_orphan_spools(state_dir: Path, into: Path, workers: int) -> None:
    """Move what waits in orphan spools (`orphan_spools`) into the spool at `into`, which
    replays it: after `workers` changed, nothing acked is left behind. A spool another
    process holds (`hub spool replay`) is left, with a warning."""
    for orphan in orphan_spools(state_dir, workers):
        if not any(orphan.glob("*" + SEGMENT_SUFFIX)):
            continue
        try:
            moved = move_segments(orphan, into)
        except SpoolInUse as exc:
            log.warning("left %s: %s", orphan, exc)
            continue
        log.warning(
            "moved %d spool segments from %s (not used with workers = %d) to %s: they are "
            "written to InfluxDB from there",
            moved, orphan, workers, into,
        )  # fmt: skip


def node_id(settings: Settings) -> str:
    """This hub's name among hubs: the `node_id` setting, or HOSTNAME:PORT."""
    return settings.node_id or f"{socket.gethostname()}:{settings.port}"


def worker_node_id(hub_node_id: str, number: int) -> str:
    """Worker K's node id: `NODE_ID/K`."""
    return f"{hub_node_id}/{number}"


def slot_variable(number: int, count: int) -> str:
    """The value of `SENSOR_HUB_WORKER` for worker `number` of `count`."""
    return f"{number}/{count}"


def worker_slot(environ: Mapping[str, str], settings: Settings) -> WorkerSlot | None:
    """The slot the supervisor gave this process, or None for a hub of its own.

    A malformed value is a `ConfigError`: only the supervisor sets it."""
    value = environ.get(WORKER_VARIABLE)
    if value is None:
        return None
    number_text, _, count_text = value.partition("/")
    if not (number_text.isdigit() and count_text.isdigit()):
        raise ConfigError(f"{WORKER_VARIABLE}={value!r}: expected K/N, like 2/4")
    number, count = int(number_text), int(count_text)
    if not 1 <= number <= count:
        raise ConfigError(f"{WORKER_VARIABLE}={value!r}: K must be from 1 to N")
    return WorkerSlot(number, count, settings.state_dir, worker_node_id(node_id(settings), number))


def worker_settings(settings: Settings) -> Settings:
    """What a worker runs with: the hub's settings, its health listener on a free loopback
    port (the supervisor's listener is the operator's; it asks the workers)."""
    return settings.model_copy(update={"health_host": WORKER_HEALTH_HOST, "health_port": 0})


def adopt_passed_socket(environ: MutableMapping[str, str], pid: int) -> None:
    """In a worker: the socket its supervisor passed (`LISTEN_FDS`, systemd's own, handed
    on) is this process's. sd_listen_fds wants `LISTEN_PID` to name the process, which the
    supervisor cannot know before the worker exists; the worker names itself."""
    if WORKER_VARIABLE in environ and "LISTEN_FDS" in environ and "LISTEN_PID" not in environ:
        environ["LISTEN_PID"] = str(pid)
