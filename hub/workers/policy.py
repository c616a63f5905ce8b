"""The supervisor's decisions, apart from its processes: pure, driven by times it is given.

Per slot it knows whether a process runs, when that process last showed life (its start,
or any notification: READY=1, WATCHDOG=1, ...), whether it said READY=1, and how often in a
row the slot has died. From these:

* a dead slot is restarted after `restart_delay_s(failures)`: 0.5 s, doubling, at most
  `MAX_RESTART_DELAY_S`; a worker that stayed up `STABLE_AFTER_S` resets the count, so a
  crash once a day restarts at once while a crash loop backs off;
* a slot is *alive* while its process runs and, once it listened, showed life within the
  worker watchdog period (before that: within `START_TIMEOUT_S` of its start, since a
  worker says nothing while it starts); a process that stops showing life (frozen, a hung
  loop) is killed and restarted;
* the hub is *ready* (READY=1 to systemd) once every slot's process has said READY=1, and
  the supervisor pings systemd's watchdog only while every slot is alive.
"""

from __future__ import annotations

from dataclasses import dataclass

FIRST_RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 15.0
STABLE_AFTER_S = 30.0
DEFAULT_WORKER_WATCHDOG_S = 20.0
"""Without systemd's watchdog: a worker that shows no life for this long is restarted."""
START_TIMEOUT_S = 120.0
"""A worker that has not listened this long after its start is restarted."""


def restart_delay_s(failures: int) -> float:
    """Seconds to wait before restarting a slot that died `failures` times in a row (>= 1)."""
    return min(MAX_RESTART_DELAY_S, FIRST_RESTART_DELAY_S * 2.0 ** max(0, failures - 1))


def worker_watchdog_s(systemd_watchdog_s: float | None) -> float:
    """How long a worker may show no life: half of systemd's watchdog period (`WatchdogSec`),
    so that a frozen worker is replaced before systemd gives up on the whole hub; without
    systemd's watchdog, the default."""
    if systemd_watchdog_s is None:
        return DEFAULT_WORKER_WATCHDOG_S
    return systemd_watchdog_s / 2


@dataclass(slots=True)
class SlotState:
    """What the supervisor knows of one slot."""

    number: int
    pid: int | None = None
    started_at: float = 0.0
    last_life: float = 0.0
    ready: bool = False
    """Listening, and not reloading."""
    listened: bool = False
    """The process said READY=1 at least once."""
    health_port: int | None = None
    failures: int = 0
    restarts: int = 0
    restart_at: float | None = None
    """When a dead slot is due to start again; None while a process runs (or none is due)."""

    def spawned(self, pid: int, now: float) -> None:
        """A new process took the slot."""
        self.pid, self.started_at, self.last_life = pid, now, now
        self.ready, self.listened, self.health_port, self.restart_at = False, False, None, None

    def showed_life(self, now: float) -> None:
        """The process sent a notification."""
        self.last_life = now

    def became_ready(self, now: float, health_port: int | None) -> None:
        """The process listens (READY=1)."""
        self.ready, self.listened, self.last_life = True, True, now
        if health_port is not None:
            self.health_port = health_port

    def died(self, now: float, *, expected: bool) -> float | None:
        """The process ended. Unless `expected` (a rolling restart, the hub stopping), the
        slot is due again after the backoff: returns the delay, and counts the restart."""
        stable = self.listened and now - self.started_at >= STABLE_AFTER_S
        self.pid, self.ready, self.listened, self.health_port = None, False, False, None
        if expected:
            self.restart_at = None
            return None
        self.failures = 1 if stable else self.failures + 1
        delay = restart_delay_s(self.failures)
        self.restart_at = now + delay
        self.restarts += 1
        return delay

    def alive(self, now: float, watchdog_s: float) -> bool:
        """Whether a process holds the slot and showed life recently enough."""
        return self.pid is not None and not self.hung(now, watchdog_s)

    def hung(self, now: float, watchdog_s: float) -> bool:
        """Whether the slot's process runs but stopped showing life (or never started to
        listen): kill it."""
        if self.pid is None:
            return False
        if not self.listened:
            return now - self.started_at > START_TIMEOUT_S
        return now - self.last_life > watchdog_s

    def due(self, now: float) -> bool:
        """Whether a dead slot should be started now."""
        return self.pid is None and self.restart_at is not None and now >= self.restart_at


def all_ready(slots: list[SlotState]) -> bool:
    """Every slot's process listens."""
    return all(slot.ready for slot in slots)


def all_alive(slots: list[SlotState], now: float, watchdog_s: float) -> bool:
    """Every slot's process runs and showed life: the supervisor may ping systemd."""
    return all(slot.alive(now, watchdog_s) for slot in slots)
