"""Each hub process's RSS over a chaos run, and whether it stayed flat: pure.

A hub that is killed and started again is a new process: its RSS starts over, so every
process incarnation (a hub or worker name and a process id) has its own series and its own
verdict. The rule, stated in every report:

* An incarnation is judged only if it lived at least `min_life_s` with at least
  `MIN_SAMPLES` samples; a shorter one is "too short to judge" (it cannot show a trend).
* Its life is cut in quarters. The first is warm-up (connections arriving, buffers and
  caches filling). The *floor* of a quarter is its lowest RSS: a leak raises the floor,
  while a burst (a spool replayed after an InfluxDB outage, devices moving in after another
  hub died) only raises peaks.
* Flat: the floor of the last quarter is at most `FLAT_RATIO` times the floor of the second
  quarter plus `FLAT_SLACK_BYTES`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MIN_SAMPLES = 8
FLAT_RATIO = 1.25
FLAT_SLACK_BYTES = 16 * 1024 * 1024
MIB = 1024 * 1024
RULE = (
    f"per process incarnation living >= {{min_life_s:g}} s: the lowest RSS of the last "
    f"quarter of its life <= {FLAT_RATIO:g} x the lowest of the second quarter + "
    f"{FLAT_SLACK_BYTES // MIB} MiB (the first quarter is warm-up)"
)


@dataclass(slots=True)
class Incarnation:
    """One process's RSS samples: (seconds since the run started, bytes)."""

    name: str
    """`hub-2`, or `hub-4/supervisor`, `hub-4/worker` for the processes of a `--workers` hub."""
    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)

    @property
    def life_s(self) -> float:
        """Seconds from its first sample to its last."""
        return self.samples[-1][0] - self.samples[0][0] if self.samples else 0.0

    def quarter_floor(self, quarter: int) -> int:
        """The lowest RSS in quarter 0..3 of its sampled life."""
        start = self.samples[0][0]
        life = self.life_s
        values = [
            rss
            for at, rss in self.samples
            if quarter * life / 4 <= at - start <= (quarter + 1) * life / 4
        ]
        return min(values)

    def verdict(self, min_life_s: float) -> bool | None:
        """True when flat, False when it grew, None when too short to judge."""
        if len(self.samples) < MIN_SAMPLES or self.life_s < min_life_s:
            return None
        early, late = self.quarter_floor(1), self.quarter_floor(3)
        return late <= early * FLAT_RATIO + FLAT_SLACK_BYTES

    def summary(self, min_life_s: float) -> dict[str, Any]:
        """First, last and highest RSS (MiB), its life, and the verdict, JSON-friendly."""
        values = [rss for _, rss in self.samples]
        data: dict[str, Any] = {
            "name": self.name,
            "pid": self.pid,
            "samples": len(values),
            "from_s": round(self.samples[0][0], 1),
            "life_s": round(self.life_s, 1),
            "first_mib": round(values[0] / MIB, 1),
            "last_mib": round(values[-1] / MIB, 1),
            "max_mib": round(max(values) / MIB, 1),
        }
        verdict = self.verdict(min_life_s)
        if verdict is not None:
            data["floor_q2_mib"] = round(self.quarter_floor(1) / MIB, 1)
            data["floor_q4_mib"] = round(self.quarter_floor(3) / MIB, 1)
        data["flat"] = {True: "flat", False: "grew", None: "too short to judge"}[verdict]
        return data


class MemoryLog:
    """Every incarnation's samples, in the order they first appeared."""

    def __init__(self, min_life_s: float) -> None:
        self.min_life_s = min_life_s
        self._by_key: dict[tuple[str, int], Incarnation] = {}

    def add(self, at_s: float, name: str, pid: int, rss_bytes: int) -> None:
        """Record one sample of process `pid`, known as `name`."""
        key = (name, pid)
        incarnation = self._by_key.get(key)
        if incarnation is None:
            incarnation = self._by_key[key] = Incarnation(name, pid)
        incarnation.samples.append((at_s, rss_bytes))

    @property
    def incarnations(self) -> list[Incarnation]:
        """Every incarnation seen, oldest first."""
        return list(self._by_key.values())

    def latest(self) -> dict[str, int]:
        """Each name's most recent RSS sample (bytes), for the progress line."""
        newest: dict[str, tuple[float, int]] = {}
        for incarnation in self._by_key.values():
            at, rss = incarnation.samples[-1]
            if incarnation.name not in newest or at >= newest[incarnation.name][0]:
                newest[incarnation.name] = (at, rss)
        return {name: rss for name, (_, rss) in newest.items()}

    def grew(self) -> list[Incarnation]:
        """The incarnations judged to have grown."""
        return [i for i in self._by_key.values() if i.verdict(self.min_life_s) is False]

    def judged(self) -> int:
        """How many incarnations lived long enough to be judged."""
        return sum(1 for i in self._by_key.values() if i.verdict(self.min_life_s) is not None)

    def summary(self) -> dict[str, Any]:
        """The rule, and per name every incarnation's summary."""
        by_name: dict[str, list[dict[str, Any]]] = {}
        for incarnation in self._by_key.values():
            by_name.setdefault(incarnation.name, []).append(incarnation.summary(self.min_life_s))
        return {
            "rule": RULE.format(min_life_s=self.min_life_s),
            "judged": self.judged(),
            "grew": [f"{i.name} pid {i.pid}" for i in self.grew()],
            "processes": by_name,
        }


def format_rss(latest: Iterable[tuple[str, int]]) -> str:
    """`hub-1 61M hub-2 58M ...` for the progress line."""
    return " ".join(f"{name} {rss / MIB:.0f}M" for name, rss in latest)
