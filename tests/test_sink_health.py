"""The sink-health state machine and the backoff policy, alone: no I/O, no clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.ingest.sinkhealth import SinkHealth, SinkState, backoff_s
from hub.options import BatchOptions
from tests.support import hub_settings

pytestmark = pytest.mark.unit


def test_a_configured_server_starts_healthy_and_none_starts_without_one() -> None:
    assert SinkHealth.for_sink(True).state is SinkState.HEALTHY
    assert SinkHealth.for_sink(True).healthy
    assert SinkHealth.for_sink(False).state is SinkState.NONE
    assert not SinkHealth.for_sink(False).healthy


def test_the_first_failure_turns_failing_and_says_so_once() -> None:
    health = SinkHealth.for_sink(True)
    assert health.failed() is True
    assert health.state is SinkState.FAILING
    assert health.failed() is False  # already failing: no second warning
    assert not health.healthy


def test_a_success_after_failures_recovers_and_forgets_a_full_buffer() -> None:
    health = SinkHealth.for_sink(True)
    health.failed()
    health.buffered(False)
    assert health.buffer_full
    assert health.succeeded() is True
    assert health.healthy and not health.buffer_full
    assert health.succeeded() is False  # healthy already: nothing to announce


def test_a_success_while_healthy_keeps_the_buffer_state() -> None:
    health = SinkHealth.for_sink(True)
    health.buffered(False)
    health.succeeded()
    assert health.buffer_full


def test_the_buffer_taking_a_batch_clears_full() -> None:
    health = SinkHealth.for_sink(True)
    health.buffered(False)
    health.buffered(True)
    assert not health.buffer_full


@pytest.mark.parametrize(
    ("state", "has_buffer", "buffer_refused", "expected"),
    [
        (SinkState.HEALTHY, True, False, True),
        (SinkState.HEALTHY, False, False, True),
        (SinkState.FAILING, True, False, False),  # the replayer probes; batches go to buffer
        (SinkState.FAILING, True, True, True),  # the buffer refused it: nobody else would try
        (SinkState.FAILING, False, False, True),  # no buffer: the writer keeps trying
        (SinkState.NONE, True, False, False),
        (SinkState.NONE, True, True, False),
        (SinkState.NONE, False, False, False),
    ],
)
def test_which_batches_try_the_server_first(
    state: SinkState, has_buffer: bool, buffer_refused: bool, expected: bool
) -> None:
    assert SinkHealth(state).try_sink(has_buffer, buffer_refused) is expected


def test_backoff_grows_exponentially_up_to_the_cap(tmp_path: Path) -> None:
    settings = hub_settings(tmp_path, None, retry_initial_s=0.1, retry_max_s=1.0)
    upper = [
        backoff_s(n, None, BatchOptions.of(settings), lambda low, high: high) for n in range(6)
    ]
    assert upper == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    lower = [backoff_s(n, None, BatchOptions.of(settings), lambda low, high: low) for n in range(6)]
    assert lower == pytest.approx([0.05] * 6)  # jitter never below half the first wait


def test_backoff_jitter_stays_within_its_bounds(tmp_path: Path) -> None:
    settings = hub_settings(tmp_path, None, retry_initial_s=0.1, retry_max_s=1.0)
    waits = [backoff_s(3, None, BatchOptions.of(settings)) for _ in range(200)]
    assert all(0.05 <= wait <= 0.8 for wait in waits)
    assert len(set(waits)) > 1


def test_retry_after_is_obeyed_up_to_six_times_the_cap(tmp_path: Path) -> None:
    settings = hub_settings(tmp_path, None, retry_initial_s=0.1, retry_max_s=1.0)
    assert backoff_s(0, 2.5, BatchOptions.of(settings)) == 2.5
    assert backoff_s(7, 0.0, BatchOptions.of(settings)) == 0.0
    assert backoff_s(0, 3600.0, BatchOptions.of(settings)) == 6.0
