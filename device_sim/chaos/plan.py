"""Which faults a chaos run does, in which order, and for how long: pure and seeded.

The plan is a sequence of rounds; each round is every kind of fault once, in an order the
seeded generator shuffles, each with its own target and times. So every kind happens within
the first round whatever the seed, a run of any length keeps a balance of kinds, and the same
seed gives the same sequence of faults (the times between them depend on how fast the servers
come back, which no seed fixes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum


class FaultKind(StrEnum):
    """One kind of trouble the run makes (and undoes)."""

    HUB_KILL = "hub_kill"
    """SIGKILL a single-process hub; start it again on its state dir (it replays its spool)."""
    WORKER_KILL = "worker_kill"
    """SIGKILL one worker of the `--workers` hub; its supervisor starts it again."""
    HUB_DRAIN = "hub_drain"
    """SIGTERM a hub (it drains and exits 0); start it again."""
    POSTGRES_FREEZE = "postgres_freeze"
    """SIGSTOP PostgreSQL and every backend for a while, then SIGCONT."""
    POSTGRES_KILL = "postgres_kill"
    """SIGKILL PostgreSQL and every backend; start it again on its data directory."""
    INFLUX_KILL = "influx_kill"
    """SIGKILL InfluxDB; start it again on its data directory."""
    INFLUX_FREEZE = "influx_freeze"
    """SIGSTOP InfluxDB for a while, then SIGCONT."""
    CONFIG_PUSH = "config_push"
    """`hub config set --all interval_s=...`, and wait until every device applied it."""
    TAKEOVER = "takeover"
    """A second connection with one device's token: the first is closed with 4000."""


PUSH_INTERVAL_FACTORS = (1.0, 0.8, 1.25)
"""A push sets each device's message interval to its base interval times one of these."""


@dataclass(frozen=True, slots=True)
class Timing:
    """How long a fault lasts (`hold_s`) and the quiet time after it (`pause_s`): each drawn
    uniformly between half and one and a half times the given mean."""

    hold_s: float = 4.0
    pause_s: float = 10.0

    def __post_init__(self) -> None:
        if self.hold_s <= 0 or self.pause_s < 0:
            raise ValueError(f"hold must be > 0 and pause >= 0 seconds: {self}")


@dataclass(frozen=True, slots=True)
class Fault:
    """One planned fault: its kind, whom it hits, how long it lasts, the quiet after it.

    `target` is an index: of the single-process hubs for a hub kill, of all hubs for a drain,
    of the worker slots (from 0) for a worker kill, of the devices for a takeover, of
    `PUSH_INTERVAL_FACTORS` for a push; 0 otherwise."""

    number: int
    kind: FaultKind
    target: int
    hold_s: float
    pause_s: float


@dataclass(frozen=True, slots=True)
class Targets:
    """How many of each thing there is to hit."""

    single_hubs: int
    all_hubs: int
    workers: int
    devices: int

    def __post_init__(self) -> None:
        if min(self.single_hubs, self.all_hubs, self.workers, self.devices) < 1:
            raise ValueError(f"every kind of target must exist: {self}")

    def count(self, kind: FaultKind) -> int:
        """How many targets a fault of `kind` chooses from."""
        return {
            FaultKind.HUB_KILL: self.single_hubs,
            FaultKind.HUB_DRAIN: self.all_hubs,
            FaultKind.WORKER_KILL: self.workers,
            FaultKind.TAKEOVER: self.devices,
            FaultKind.CONFIG_PUSH: len(PUSH_INTERVAL_FACTORS),
        }.get(kind, 1)


class FaultPlan:
    """An endless, seeded sequence of faults in rounds of every kind once."""

    def __init__(self, seed: int, targets: Targets, timing: Timing) -> None:
        self.seed = seed
        self.targets = targets
        self.timing = timing
        self._rng = random.Random(seed)
        self._round: list[FaultKind] = []
        self._number = 0

    def next_fault(self) -> Fault:
        """The next fault of the plan."""
        if not self._round:
            self._round = list(FaultKind)
            self._rng.shuffle(self._round)
        kind = self._round.pop(0)
        self._number += 1
        rng, timing = self._rng, self.timing
        return Fault(
            number=self._number,
            kind=kind,
            target=rng.randrange(self.targets.count(kind)),
            hold_s=round(rng.uniform(0.5, 1.5) * timing.hold_s, 3),
            pause_s=round(rng.uniform(0.5, 1.5) * timing.pause_s, 3),
        )

    @property
    def round_done(self) -> bool:
        """Whether the current round is complete (every kind of it happened)."""
        return not self._round

    def take(self, count: int) -> list[Fault]:
        """The next `count` faults (a preview, for tests and for printing the plan)."""
        return [self.next_fault() for _ in range(count)]
