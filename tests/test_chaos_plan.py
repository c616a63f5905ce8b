"""The chaos run's pure parts: the seeded fault plan, the RSS rule, the checks."""

from __future__ import annotations

from typing import Any

import pytest

from device_sim.chaos.fleet import parse_versions
from device_sim.chaos.memory import FLAT_SLACK_BYTES, MIB, MemoryLog
from device_sim.chaos.plan import PUSH_INTERVAL_FACTORS, FaultKind, FaultPlan, Targets, Timing
from device_sim.chaos.report import checks, faults_by_kind, reconnect_figures
from device_sim.device import DeviceReport, DeviceState

pytestmark = pytest.mark.unit

TARGETS = Targets(single_hubs=3, all_hubs=4, workers=2, devices=50)


def test_every_round_holds_every_kind_once() -> None:
    """Each run of len(FaultKind) faults is every kind exactly once, whatever the seed."""
    for seed in range(20):
        plan = FaultPlan(seed, TARGETS, Timing())
        for _ in range(3):
            kinds = [fault.kind for fault in plan.take(len(FaultKind))]
            assert sorted(kinds) == sorted(FaultKind)
            assert plan.round_done


def test_the_same_seed_gives_the_same_faults_and_another_seed_others() -> None:
    """A printed seed repeats the sequence."""
    first = FaultPlan(7, TARGETS, Timing()).take(30)
    assert FaultPlan(7, TARGETS, Timing()).take(30) == first
    assert FaultPlan(8, TARGETS, Timing()).take(30) != first


def test_targets_and_times_stay_in_range() -> None:
    """Targets index what exists; holds and pauses lie within half to 1.5 times the mean."""
    timing = Timing(hold_s=2.0, pause_s=6.0)
    limits = {
        FaultKind.HUB_KILL: 3,
        FaultKind.HUB_DRAIN: 4,
        FaultKind.WORKER_KILL: 2,
        FaultKind.TAKEOVER: 50,
        FaultKind.CONFIG_PUSH: len(PUSH_INTERVAL_FACTORS),
    }
    for fault in FaultPlan(1, TARGETS, timing).take(900):
        assert 0 <= fault.target < limits.get(fault.kind, 1)
        assert 1.0 <= fault.hold_s <= 3.0
        assert 3.0 <= fault.pause_s <= 9.0
    numbers = [f.number for f in FaultPlan(1, TARGETS, timing).take(5)]
    assert numbers == [1, 2, 3, 4, 5]


def test_bad_timing_and_missing_targets_are_refused() -> None:
    """A zero hold or a fleet without workers is an error, not a plan."""
    with pytest.raises(ValueError, match="hold"):
        Timing(hold_s=0)
    with pytest.raises(ValueError, match="target"):
        Targets(single_hubs=3, all_hubs=4, workers=0, devices=5)


def _memory(values_mib: list[float], life_s: float = 100.0) -> MemoryLog:
    log = MemoryLog(min_life_s=60)
    step = life_s / (len(values_mib) - 1)
    for index, value in enumerate(values_mib):
        log.add(index * step, "hub-1", 42, int(value * MIB))
    return log


def test_a_steady_process_with_bursts_is_flat() -> None:
    """Peaks (a replayed spool) do not count; only the floor does."""
    values = [40.0] * 5 + [60, 60, 300, 62, 61] * 3 + [61.0] * 5
    log = _memory(values)
    assert log.grew() == [] and log.judged() == 1
    assert log.summary()["processes"]["hub-1"][0]["flat"] == "flat"


def test_a_rising_floor_is_growth() -> None:
    """The last quarter's floor past 1.25x the second's plus the slack: grew."""
    values = [60.0 + index * 4 for index in range(40)]  # 60 MiB to 216 MiB
    log = _memory(values)
    assert [i.pid for i in log.grew()] == [42]
    summary = log.summary()
    assert summary["grew"] == ["hub-1 pid 42"]
    assert summary["processes"]["hub-1"][0]["flat"] == "grew"


def test_growth_within_the_slack_is_flat() -> None:
    """A few MiB of growth on a small process is within the stated slack."""
    slack_mib = FLAT_SLACK_BYTES / MIB
    values = [20.0] * 20 + [20.0 + slack_mib * 0.9] * 20
    assert _memory(values).grew() == []


def test_a_short_life_is_not_judged() -> None:
    """An incarnation shorter than min_life_s is reported, not judged."""
    log = _memory([50.0, 500.0] * 10, life_s=30.0)
    assert log.grew() == [] and log.judged() == 0
    assert log.summary()["processes"]["hub-1"][0]["flat"] == "too short to judge"


def test_each_restart_is_its_own_incarnation() -> None:
    """The same name with a new pid starts a new series; `latest` shows the newest."""
    log = MemoryLog(min_life_s=60)
    log.add(0, "hub-1", 1, 50 * MIB)
    log.add(1, "hub-1", 1, 51 * MIB)
    log.add(2, "hub-1", 2, 30 * MIB)
    assert [(i.pid, len(i.samples)) for i in log.incarnations] == [(1, 2), (2, 1)]
    assert log.latest() == {"hub-1": 30 * MIB}


def test_versions_are_read_from_config_set_output() -> None:
    """`DEVICE<TAB>version N` lines, anything else ignored."""
    text = "chaos-00001\tversion 3\nchaos-00002\tversion 12\nnoise\n"
    assert parse_versions(text) == {"chaos-00001": 3, "chaos-00002": 12}


def _device(state: DeviceState = DeviceState.DONE) -> DeviceReport:
    return DeviceReport("d", state, "us", 10, 0, 10, 0, 0, 0, 1, 0, {}, [], [], [], [], None, None)


def _fault(kind: FaultKind, **details: Any) -> dict[str, Any]:
    return {"number": 1, "kind": str(kind), "ok": True, **details}


def _checks(faults: list[dict[str, Any]], lost: int = 0, **kwargs: Any) -> dict[str, bool]:
    found = checks(
        lost=lost,
        acked=100,
        faults=faults,
        memory=MemoryLog(60),
        devices=kwargs.pop("devices", [_device()]),
        reconnect_bound_s=10.0,
        stop_problems=kwargs.pop("stop_problems", []),
        tracebacks=kwargs.pop("tracebacks", []),
        crashed=kwargs.pop("crashed", {}),
    )
    return {c.name: c.ok for c in found}


def test_checks_fail_on_loss_missing_kinds_slow_reconnects_and_leftovers() -> None:
    """Each check fails on its own cause and holds otherwise."""
    pushed = {"all_applied": True, "applied_in_s": 0.4}
    every = [
        _fault(kind, **(pushed if kind is FaultKind.CONFIG_PUSH else {})) for kind in FaultKind
    ]
    assert all(_checks(every).values())
    assert _checks(every, lost=1)["acked_readings_stored"] is False
    assert _checks(every[1:])["every_kind"] is False
    slow = [*every, _fault(FaultKind.HUB_KILL, devices_cut=3, reconnected=3, reconnect_max_s=11)]
    assert _checks(slow)["reconnect_after_kill"] is False
    stuck = [*every, _fault(FaultKind.HUB_KILL, devices_cut=3, reconnected=2, reconnect_max_s=1)]
    assert _checks(stuck)["reconnect_after_kill"] is False
    failed = [*every, {"number": 9, "kind": "hub_kill", "ok": False, "error": "boom"}]
    assert _checks(failed)["faults_undone"] is False
    unpushed = [*every, _fault(FaultKind.CONFIG_PUSH, all_applied=False)]
    assert _checks(unpushed)["pushes_applied"] is False
    unreplaced = [*every, _fault(FaultKind.TAKEOVER, was_connected=True, replaced=False)]
    assert _checks(unreplaced)["takeover_replaced"] is False
    assert _checks(every, devices=[_device(DeviceState.REVOKED)])["devices_done"] is False
    assert _checks(every, crashed={"d": "EOFError: stream ends"})["devices_done"] is False
    assert _checks(every, stop_problems=["hub-2 exited 1"])["clean_stop"] is False
    assert _checks(every, tracebacks=["hub-3: 1"])["no_tracebacks"] is False


def test_figures_count_kinds_and_the_slowest_reconnect() -> None:
    """Kinds with no fault show 0; the slowest reconnect is over hub and worker kills."""
    faults = [
        _fault(FaultKind.HUB_KILL, devices_cut=4, reconnected=4, reconnect_max_s=0.5),
        _fault(FaultKind.WORKER_KILL, devices_cut=2, reconnected=2, reconnect_max_s=1.5),
    ]
    kinds = faults_by_kind(faults)
    assert kinds["hub_kill"] == 1 and kinds["takeover"] == 0 and len(kinds) == len(FaultKind)
    figures = reconnect_figures(faults)
    assert figures["max_s"] == 1.5 and figures["devices_cut"] == 6
