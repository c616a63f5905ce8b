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
