"""The supervisor's decisions (hub.workers.policy), driven by the times they are given."""

from __future__ import annotations

import pytest

from hub.workers.policy import (
    DEFAULT_WORKER_WATCHDOG_S,
    MAX_RESTART_DELAY_S,
    STABLE_AFTER_S,
    START_TIMEOUT_S,
    SlotState,
    all_alive,
    all_ready,
    restart_delay_s,
    worker_watchdog_s,
)

pytestmark = pytest.mark.unit


def test_restart_delay_doubles_from_half_a_second_up_to_its_cap() -> None:
    """0.5, 1, 2, 4 ... seconds, never more than MAX_RESTART_DELAY_S."""
    assert [restart_delay_s(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert restart_delay_s(50) == MAX_RESTART_DELAY_S


def test_worker_watchdog_is_half_of_systemds_period() -> None:
    """A frozen worker is replaced before systemd gives up on the hub; without systemd's
    watchdog the default applies."""
    assert worker_watchdog_s(30.0) == 15.0
    assert worker_watchdog_s(None) == DEFAULT_WORKER_WATCHDOG_S


def test_a_crash_loop_backs_off_and_a_stable_worker_restarts_at_once() -> None:
    """Deaths in a row lengthen the wait; a worker that listened for STABLE_AFTER_S before
    dying starts again after the first delay, its count reset."""
    slot = SlotState(1)
    slot.spawned(100, now=0.0)
    assert slot.died(1.0, expected=False) == 0.5
    slot.spawned(101, now=2.0)
    assert slot.died(3.0, expected=False) == 1.0
    slot.spawned(102, now=4.0)
    slot.became_ready(5.0, health_port=9000)
    assert slot.died(4.0 + STABLE_AFTER_S, expected=False) == 0.5
    assert slot.restarts == 3


def test_an_expected_exit_schedules_no_restart() -> None:
    """A rolling restart or the hub stopping ends a worker on purpose: not counted, not due."""
    slot = SlotState(2)
    slot.spawned(100, now=0.0)
    assert slot.died(1.0, expected=True) is None
    assert slot.restarts == 0 and not slot.due(100.0)


def test_a_dead_slot_is_due_after_its_delay() -> None:
    """Not before the backoff has passed, then yes; once restarted, no longer."""
    slot = SlotState(1)
    slot.spawned(100, now=0.0)
    slot.died(10.0, expected=False)
    assert not slot.due(10.4) and slot.due(10.5)
    slot.spawned(101, now=10.5)
    assert not slot.due(11.0)


def test_a_worker_that_stops_notifying_is_hung_not_alive() -> None:
    """Once it listened: alive while it showed life within the watchdog period; then hung
    (to be killed)."""
    slot = SlotState(1)
    slot.spawned(100, now=0.0)
    slot.became_ready(1.0, health_port=9001)
    assert slot.alive(5.0, 10.0) and not slot.hung(5.0, 10.0)
    slot.showed_life(8.0)
    assert slot.alive(17.0, 10.0)
    assert slot.hung(18.5, 10.0) and not slot.alive(18.5, 10.0)


def test_a_starting_worker_has_until_the_start_timeout() -> None:
    """A worker says nothing while it starts: silence is not a hang until START_TIMEOUT_S."""
    slot = SlotState(1)
    slot.spawned(100, now=0.0)
    assert slot.alive(START_TIMEOUT_S - 1, 2.0)
    assert slot.hung(START_TIMEOUT_S + 1, 2.0)


def test_a_slot_without_a_process_is_neither_alive_nor_hung() -> None:
    """Waiting for its restart, a slot is not alive (no watchdog ping) and not killed."""
    slot = SlotState(1)
    assert not slot.alive(0.0, 10.0) and not slot.hung(100.0, 10.0)


def test_ready_and_alive_need_every_slot() -> None:
    """READY=1 to systemd once all listen; WATCHDOG=1 only while all are alive."""
    one, two = SlotState(1), SlotState(2)
    one.spawned(100, now=0.0)
    two.spawned(101, now=0.0)
    one.became_ready(1.0, health_port=9001)
    assert not all_ready([one, two])
    two.became_ready(1.5, health_port=9002)
    assert all_ready([one, two]) and all_alive([one, two], 2.0, 10.0)
    two.died(3.0, expected=False)
    assert not all_ready([one, two]) and not all_alive([one, two], 3.0, 10.0)


def test_a_reload_ready_keeps_the_health_port() -> None:
    """READY=1 after a reload carries no port: the one from the start stays."""
    slot = SlotState(1)
    slot.spawned(100, now=0.0)
    slot.became_ready(1.0, health_port=9001)
    slot.became_ready(2.0, health_port=None)
    assert slot.health_port == 9001
