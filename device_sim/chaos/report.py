"""The chaos run's verdict: its checks and figures from what the run recorded (pure).

Every check is a name, whether it held, and what was measured; the run fails (exit status 1)
when any does not hold. The JSON report holds the checks, the seed and options (to repeat the
run), the faults one by one, the fleet's totals, each hub process's memory, and the machine's
load while it ran.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from device_sim.chaos.memory import MemoryLog
from device_sim.chaos.plan import FaultKind
from device_sim.device import DeviceReport, DeviceState


@dataclass(frozen=True, slots=True)
class Check:
    """One thing the run must show."""

    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly."""
        return {"ok": self.ok, "detail": self.detail}


def faults_by_kind(faults: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many faults of each kind happened (every kind listed, 0 when none)."""
    counts = Counter(str(f["kind"]) for f in faults)
    return {str(kind): counts.get(str(kind), 0) for kind in FaultKind}


def reconnect_figures(faults: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """After hub and worker kills: the slowest reconnect, and any device left out."""
    kills = [f for f in faults if f["kind"] in (FaultKind.HUB_KILL, FaultKind.WORKER_KILL)]
    times = [f["reconnect_max_s"] for f in kills if f.get("reconnect_max_s") is not None]
    return {
        "kills": len(kills),
        "devices_cut": sum(int(f.get("devices_cut", 0)) for f in kills),
        "not_reconnected": sum(
            int(f.get("devices_cut", 0)) - int(f.get("reconnected", 0)) for f in kills
        ),
        "max_s": max(times) if times else None,
        "per_kill_max_s": times,
    }


def push_figures(faults: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Config pushes: how many, how many every device applied, the slowest."""
    pushes = [f for f in faults if f["kind"] == FaultKind.CONFIG_PUSH and f.get("ok")]
    times = [f["applied_in_s"] for f in pushes if f.get("all_applied")]
    return {
        "pushes": len(pushes),
        "all_applied": sum(1 for f in pushes if f.get("all_applied")),
        "slowest_s": max(times) if times else None,
    }


def checks(
    *,
    lost: int,
    acked: int,
    faults: Sequence[dict[str, Any]],
    memory: MemoryLog,
    devices: Sequence[DeviceReport],
    reconnect_bound_s: float,
    stop_problems: Sequence[str],
    tracebacks: Sequence[str],
    crashed: Mapping[str, str],
) -> list[Check]:
    """Every check of a finished run."""
    failed = [
        f"#{f['number']} {f['kind']}: {f.get('error', '')[:200]}" for f in faults if not f["ok"]
    ]
    kinds = faults_by_kind(faults)
    reconnects = reconnect_figures(faults)
    pushes = push_figures(faults)
    takeovers = [f for f in faults if f["kind"] == FaultKind.TAKEOVER and f.get("ok")]
    unreplaced = [f for f in takeovers if f.get("was_connected") and not f.get("replaced")]
    states = Counter(str(d.state) for d in devices)
    max_s = reconnects["max_s"]
    return [
        Check("acked_readings_stored", lost == 0 and acked > 0, f"{acked} acked, {lost} missing"),
        Check(
            "faults_undone", not failed, "; ".join(failed) or f"{len(faults)} faults, all undone"
        ),
        Check(
            "every_kind",
            all(kinds.values()),
            ", ".join(f"{kind} {count}" for kind, count in kinds.items()),
        ),
        Check(
            "reconnect_after_kill",
            reconnects["not_reconnected"] == 0 and (max_s is None or max_s <= reconnect_bound_s),
            f"max {max_s} s (bound {reconnect_bound_s:g} s) over {reconnects['devices_cut']} "
            f"cut connections, {reconnects['not_reconnected']} not reconnected",
        ),
        Check(
            "pushes_applied",
            pushes["all_applied"] == pushes["pushes"],
            f"{pushes['all_applied']} of {pushes['pushes']} applied by every running device",
        ),
        Check(
            "takeover_replaced",
            not unreplaced,
            f"{len(takeovers) - len(unreplaced)} of {len(takeovers)} takeovers closed the "
            "device's own connection with 4000 (or it had none)",
        ),
        Check(
            "rss_flat",
            not memory.grew(),
            f"{memory.judged()} incarnations judged; grew: {', '.join(memory.summary()['grew'])}"
            if memory.grew()
            else f"{memory.judged()} incarnations judged, none grew",
        ),
        Check(
            "devices_done",
            states.get(str(DeviceState.DONE), 0) == len(devices) and not crashed,
            ", ".join(f"{state} {count}" for state, count in sorted(states.items()))
            + "".join(f"; {device} raised {error}" for device, error in sorted(crashed.items())),
        ),
        Check("clean_stop", not stop_problems, "; ".join(stop_problems) or "every process stopped"),
        Check(
            "no_tracebacks",
            not tracebacks,
            "; ".join(tracebacks) or "no traceback in any hub's log",
        ),
    ]


def traceback_logs(logs: Sequence[tuple[str, str]]) -> list[str]:
    """Which hub logs hold a Python traceback, and how many: `hub-2: 3`."""
    return [f"{name}: {text.count('Traceback')}" for name, text in logs if "Traceback" in text]
