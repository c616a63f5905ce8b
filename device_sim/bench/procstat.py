"""CPU time and memory of a process, from /proc/<pid>/stat and /proc/<pid>/status."""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessSample:
    """One look at a process."""

    cpu_s: float
    """User plus system CPU seconds since it started."""
    rss_bytes: int
    peak_rss_bytes: int
    """VmHWM: the highest RSS so far."""


def sample(pid: int) -> ProcessSample:
    """Read the process's CPU seconds and RSS now; raises OSError once it is gone."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        # The command name (field 2) may hold spaces: split after its closing parenthesis.
        fields = stat.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    memory = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                memory[key] = int(value.split()[0]) * 1024
    return ProcessSample(
        cpu_s=(utime + stime) / CLOCK_TICKS,
        rss_bytes=memory.get("VmRSS", 0),
        peak_rss_bytes=memory.get("VmHWM", 0),
    )


def machine_busy_s() -> tuple[float, float]:
    """CPU seconds the whole machine spent busy, and in all, summed over its CPUs (/proc/stat).

    Beside the hub's, InfluxDB's and the load generators' own CPU, this tells how much went
    to everything else on the machine.
    """
    with open("/proc/stat", encoding="ascii") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / CLOCK_TICKS, sum(ticks) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (of every one of its threads), from /proc."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as listed:
                found += [int(child) for child in listed.read().split()]
        except OSError:
            continue  # the thread ended between the listing and the read
    return found


def tree_sample(pid: int) -> ProcessSample:
    """`pid` and its live children together: `hub serve --workers N` is a supervisor and N
    worker processes. CPU and RSS are summed; the peak RSS is the sum of each one's peak
    (an upper bound of the tree's). A child that exits between the listing and its read is
    left out; `pid` itself gone raises OSError."""
    total = sample(pid)
    for child in children(pid):
        try:
            one = sample(child)
        except OSError:
            continue
        total = ProcessSample(
            cpu_s=total.cpu_s + one.cpu_s,
            rss_bytes=total.rss_bytes + one.rss_bytes,
            peak_rss_bytes=total.peak_rss_bytes + one.peak_rss_bytes,
        )
    return total


def sum_samples(samples: list[ProcessSample]) -> ProcessSample:
    """Several processes (or trees) as one: CPU, RSS and peak RSS summed."""
    return ProcessSample(
        cpu_s=sum(s.cpu_s for s in samples),
        rss_bytes=sum(s.rss_bytes for s in samples),
        peak_rss_bytes=sum(s.peak_rss_bytes for s in samples),
    )
