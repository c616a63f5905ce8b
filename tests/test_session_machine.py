"""The device session's protocol state machine (`hub.core.session`), with no I/O at all.

Table-driven: each row is a sequence of events and the actions (or error) they must give.
Ack order under every order of durability, each close code with its `error` and its wait
for the acks owed (contract clarifications 3, 4 and 10), flow control, rate checks, the
config-version logic (clarification 5) and the draining signal.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest

from hub.core.frames import FrameLimits
from hub.core.readings import TimeLimits
from hub.core.session import (
    ACK_GRACE_S,
    CLOSE_REASON_CHARS,
    DRAIN_REASON,
    Close,
    RecordConfigAnswer,
    SendAck,
    SendConfig,
    SessionLimits,
    SessionMachine,
    close_for,
    config_result,
)
from hub.errors import InvalidMessage, Overloaded, ProtocolError, RateLimited, UnsupportedData
from hub.options import frame_limits, session_limits, time_limits
from schemas.codes import CloseCode, ErrorCode
from schemas.messages import ConfigAck, ErrorMessage
from tests.support import hub_settings

pytestmark = pytest.mark.unit

T0 = 1000.0
"""A monotonic clock reading to start from (the buckets start full at any time)."""


def limits(**changes: float) -> SessionLimits:
    """Session limits with small, round numbers, changed by `changes`."""
    base = SessionLimits(
        messages_per_s=10,
        readings_per_s=100,
        bytes_per_s=1000,
        burst_s=2,
        max_message_bytes=500,
        max_unacked_messages=3,
        overload_close_s=5,
        shutdown_timeout_s=7,
        frame=FrameLimits(50),
        time=TimeLimits(0, 3600 * 10**9),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def send_ready(machine: SessionMachine) -> list[int]:
    """What a driver does when woken: send every ack that may go now; their seqs."""
    sent = []
    while (ack := machine.next_ack()) is not None:
        sent.append(ack.seq)
        machine.ack_sent()
    return sent


# -- ack order -----------------------------------------------------------------------------


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_acks_go_in_read_order_whatever_order_durability_comes_in(order: tuple[int, ...]) -> None:
    """Each message's ack goes as soon as it and every message read before it are durable,
    never earlier, never out of order."""
    machine = SessionMachine(limits(max_unacked_messages=10))
    tickets = [machine.message_read(100 + n, 1, {}, pending=True) for n in range(4)]
    assert send_ready(machine) == []
    durable: set[int] = set()
    sent: list[int] = []
    for n in order:
        durable.add(n)
        woke = machine.durable(tickets[n])
        now = send_ready(machine)
        prefix = next(k for k in range(5) if k not in durable)  # messages 0..prefix-1 all durable
        assert sent + now == [100 + k for k in range(prefix)]
        assert woke == bool(now)  # the driver is woken exactly when there is work
        sent += now
    assert machine.acks_owed == 0


@pytest.mark.parametrize(
    ("pending", "events", "expected"),
    [
        # Nothing accepted (every reading refused): its ack may go at once, in its turn.
        ((False,), [], [0]),
        ((True, False), [], []),
        ((True, False), [0], [0, 1]),
        ((False, True, False), [], [0]),
        ((False, True, False), [1], [0, 1, 2]),
        ((True, True, False, True), [1, 0], [0, 1, 2]),
        ((True, True, False, True), [3, 1, 0], [0, 1, 2, 3]),
    ],
)
def test_messages_with_nothing_to_store_wait_their_turn(
    pending: tuple[bool, ...], events: list[int], expected: list[int]
) -> None:
    """A message with nothing pending is acked at once unless earlier ones are still owed."""
    machine = SessionMachine(limits(max_unacked_messages=10))
    tickets = [machine.message_read(n, 0 if not p else 1, {}, p) for n, p in enumerate(pending)]
    sent = send_ready(machine)
    for n in events:
        machine.durable(tickets[n])
        sent += send_ready(machine)
    assert sent == expected


def test_an_ack_carries_the_count_and_the_reasons() -> None:
    """`next_ack` hands out exactly what the message's ack says."""
    machine = SessionMachine(limits())
    machine.message_read(7, 2, {1: ["bad field"]}, pending=False)
    assert machine.next_ack() == SendAck(7, 2, {1: ["bad field"]})
    assert machine.acks_owed == 1  # in the sender's hand until sent
    machine.ack_sent()
    assert machine.acks_owed == 0
    assert machine.next_ack() is None


def test_repeated_seqs_are_acked_once_each_in_order() -> None:
    """`seq` may repeat (clarification 10): each message read gets its own ack."""
    machine = SessionMachine(limits())
    tickets = [machine.message_read(5, 1, {}, pending=True) for _ in range(3)]
    for ticket in reversed(tickets):
        machine.durable(ticket)
    assert send_ready(machine) == [5, 5, 5]


def test_durability_of_a_message_already_acked_or_given_up_changes_nothing() -> None:
    """A late or repeated completion is harmless (the ack already went, or never will)."""
    machine = SessionMachine(limits())
    first = machine.message_read(1, 1, {}, pending=True)
    assert machine.durable(first)
    assert send_ready(machine) == [1]
    assert not machine.durable(first)  # already acked
    assert not machine.durable(first + 5)  # never issued
    second = machine.message_read(2, 1, {}, pending=True)
    machine.acks_failed()
    assert not machine.durable(second)
    assert machine.next_ack() is None


# -- when acks stop ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failing", "durable_first", "expected_sent"),
    [
        (0, [1, 2], []),  # the oldest fails: nothing more is acked
        (1, [0, 2], [0]),  # acks before the failed one still go
        (2, [0, 1], [0, 1]),
        (1, [2], []),  # message 0 still pending: nothing may go yet
    ],
)
def test_a_message_that_can_no_longer_be_stored_stops_the_acks_in_its_turn(
    failing: int, durable_first: list[int], expected_sent: list[int]
) -> None:
    """A failed message (the hub stopping) ends the acks when its turn comes, not before:
    the device resends what it did not see acked."""
    machine = SessionMachine(limits(max_unacked_messages=10))
    tickets = [machine.message_read(n, 1, {}, pending=True) for n in range(3)]
    for n in durable_first:
        machine.durable(tickets[n])
    machine.failed(tickets[failing])
    assert send_ready(machine) == expected_sent
    if expected_sent or failing == 0:
        assert machine.acks_stopped and machine.acks_owed == 0
    else:
        assert not machine.acks_stopped  # still waiting for message 0


@pytest.mark.parametrize("how", ["failed message", "connection gone"])
def test_once_acks_stop_a_further_readings_message_gets_1013(how: str) -> None:
    """Nothing would ever ack it: the device is told to come back later (1013, no acks)."""
    machine = SessionMachine(limits())
    ticket = machine.message_read(1, 1, {}, pending=True)
    if how == "failed message":
        machine.failed(ticket)
        assert machine.next_ack() is None
    else:
        machine.acks_failed()
    assert machine.acks_stopped and machine.acks_owed == 0 and machine.has_room
    with pytest.raises(Overloaded) as refused:
        machine.message_read(2, 1, {}, pending=False)
    close = machine.refuse(refused.value)
    assert (close.code, close.acks_within) == (CloseCode.TRY_AGAIN_LATER, None)
    assert close.error is not None and close.error.code == ErrorCode.OVERLOADED


# -- flow control --------------------------------------------------------------------------


@pytest.mark.parametrize("max_unacked", [1, 3, 8])
def test_reading_pauses_beyond_max_unacked_messages_and_resumes_as_acks_go(
    max_unacked: int,
) -> None:
    """At most `max_unacked_messages` owed beside the one in the sender's hand; the pause is
    flow control (no error) and ends with the next ack sent."""
    machine = SessionMachine(limits(max_unacked_messages=max_unacked))
    tickets: list[int] = []
    while machine.has_room:
        tickets.append(machine.message_read(len(tickets), 1, {}, pending=True))
    assert len(tickets) == max_unacked + 2  # the read that filled it, then the pause
    machine.durable(tickets[0])
    ack = machine.next_ack()
    assert ack is not None and ack.seq == 0
    assert not machine.has_room  # handed out, not sent yet: still owed
    machine.ack_sent()
    assert machine.has_room


# -- closes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code", "error_code", "acks_within"),
    [
        (InvalidMessage("bad envelope"), 1007, ErrorCode.INVALID_MESSAGE, ACK_GRACE_S),
        (UnsupportedData("text frame"), 1003, None, ACK_GRACE_S),
        (RateLimited("too fast"), 1008, ErrorCode.RATE_LIMITED, ACK_GRACE_S),
        (Overloaded("full"), 1013, ErrorCode.OVERLOADED, None),
    ],
)
def test_each_protocol_error_closes_with_its_code_its_error_and_its_acks(
    error: ProtocolError, code: int, error_code: ErrorCode | None, acks_within: float | None
) -> None:
    """`error` precedes 1007, 1008 and 1013, not 1003 (clarification 4); the acks owed are
    awaited, bounded, before every close but 1013, whose acks wait on the full pipeline."""
    close = SessionMachine(limits()).refuse(error)
    expected_error = None
    if error_code is not None:
        expected_error = ErrorMessage(code=error_code, message=error.message)
    assert close == Close(code, error.message, expected_error, acks_within)


def test_a_long_error_is_cut_in_the_close_frame_and_whole_in_the_error_message() -> None:
    """The close frame's reason must fit in 123 bytes; the `error` message says it all."""
    text = "x" * 500
    close = close_for(InvalidMessage(text))
    assert close.reason == text[:CLOSE_REASON_CHARS]
    assert close.error is not None and close.error.message == text


def test_draining_closes_with_1001_after_the_acks_within_the_shutdown_timeout() -> None:
    """Before 1001 every message read is acked (clarification 3), bounded by the shutdown
    timeout; no `error` message."""
    machine = SessionMachine(limits(shutdown_timeout_s=7))
    assert machine.closing is None
    assert machine.drain() == Close(CloseCode.GOING_AWAY, DRAIN_REASON, None, 7)
    assert machine.closing == machine.drain()


def test_the_first_close_decided_stands() -> None:
    """A protocol error while already closing for a drain does not change the close."""
    machine = SessionMachine(limits())
    drained = machine.drain()
    assert machine.refuse(InvalidMessage("late")) == drained
    other = SessionMachine(limits())
    refused = other.refuse(RateLimited("fast"))
    assert other.drain() == refused


# -- rates ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "refusal"),
    [
        # (size, items, seconds after T0) per frame; the refusal of the last one, if any
        ([(10, 1, 0.0)] * 20, None),  # 10 messages/s with a 2 s burst: 20 pass at once
        ([(10, 1, 0.0)] * 21, "more than 10 messages a second"),
        ([(10, 1, 0.0)] * 20 + [(10, 1, 0.1)], None),  # a tenth of a second refills one
        ([(500, 0, 0.0)] * 4, None),  # bytes: 1000/s, 2 s burst
        ([(500, 0, 0.0)] * 5, "more than 1000 bytes a second"),
        ([(10, 50, 0.0)] * 4, None),  # readings: 100/s, 2 s burst
        ([(10, 50, 0.0)] * 4 + [(10, 1, 0.0)], "more than 100 readings a second"),
        ([(10, 50, 0.0)] * 4 + [(10, 0, 0.0)], None),  # a config_ack carries no readings
        ([(10, 50, 0.0)] * 4 + [(10, 10, 0.1)], None),
    ],
)
def test_rate_checks(frames: list[tuple[int, int, float]], refusal: str | None) -> None:
    """Messages, bytes and readings each have their bucket; over one is 1008."""
    machine = SessionMachine(limits())
    for size, items, at in frames[:-1]:
        machine.check_rate(size, items, T0 + at)
    size, items, at = frames[-1]
    if refusal is None:
        machine.check_rate(size, items, T0 + at)
    else:
        with pytest.raises(RateLimited, match=refusal):
            machine.check_rate(size, items, T0 + at)


def test_one_frame_of_max_message_bytes_always_fits_the_byte_bucket() -> None:
    """A byte rate below one frame a burst would refuse every large frame for ever."""
    machine = SessionMachine(limits(bytes_per_s=10, burst_s=1, max_message_bytes=500))
    machine.check_rate(500, 0, T0)
    with pytest.raises(RateLimited, match="bytes"):
        machine.check_rate(1, 0, T0)
    machine.check_rate(500, 0, T0 + 50)


def test_reloaded_rates_apply_at_once_and_a_smaller_burst_drops_tokens() -> None:
    """`apply_limits` (SIGHUP) changes the rates of an open connection from now on."""
    machine = SessionMachine(limits())
    machine.apply_limits(limits(messages_per_s=1, burst_s=1))
    machine.check_rate(1, 0, T0)
    with pytest.raises(RateLimited, match="more than 1 messages a second"):
        machine.check_rate(1, 0, T0)
    machine.apply_limits(limits(messages_per_s=100, burst_s=1))
    for _ in range(100):
        machine.check_rate(1, 0, T0 + 1)
    assert machine.limits.messages_per_s == 100


# -- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        # (version, pending) the store says at each push; what is sent (version or None)
        ([(0, False)], [None]),  # no desired config
        ([(3, False)], [None]),  # answered already (ok or not: clarification 5)
        ([(3, True)], [3]),
        ([(3, True), (3, True)], [3, None]),  # once per connection
        ([(3, True), (4, True)], [3, 4]),
        ([(4, True), (3, True)], [4, None]),  # versions only grow
        ([(3, True), (4, False), (5, True)], [3, None, 5]),
    ],
)
def test_config_is_sent_once_per_version_and_only_newer(
    states: list[tuple[int, bool]], expected: list[int | None]
) -> None:
    """The desired config goes when unanswered and newer than what this connection sent."""
    machine = SessionMachine(limits())
    sent = []
    for version, pending in states:
        action = machine.config_to_send(version, pending, {"v": version})
        sent.append(None if action is None else action.version)
        if action is not None:
            assert action == SendConfig(version, {"v": version})
    assert sent == expected
    assert machine.config_sent == max([v for v in expected if v is not None], default=0)


@pytest.mark.parametrize(
    ("answer", "recorded", "result"),
    [
        (ConfigAck(type="config_ack", version=3, ok=True), True, "applied"),
        (ConfigAck(type="config_ack", version=3, ok=False, error="no such key"), True, "refused"),
        (ConfigAck(type="config_ack", version=3, ok=False), True, "refused"),
        # never sent, or answered already
        (ConfigAck(type="config_ack", version=9, ok=True), False, "ignored"),
        (ConfigAck(type="config_ack", version=9, ok=False, error="x"), False, "ignored"),
    ],
)
def test_a_config_answer_is_recorded_and_labelled(
    answer: ConfigAck, recorded: bool, result: str
) -> None:
    """Every answer goes to the store, which ignores the stale; `ok: false` is an answer."""
    action = SessionMachine(limits()).config_answered(answer)
    assert action == RecordConfigAnswer(answer.version, answer.ok, answer.error)
    assert config_result(recorded, answer.ok) == result


# -- limits from the settings --------------------------------------------------------------


def test_session_limits_come_from_the_settings(tmp_path: Path) -> None:
    """Every limit a session applies is the setting of the same meaning."""
    settings = hub_settings(
        tmp_path,
        None,
        device_messages_per_s=3,
        device_readings_per_s=30,
        device_bytes_per_s=300,
        device_burst_s=4,
        max_message_bytes=2000,
        max_unacked_messages=9,
        overload_close_s=11,
        shutdown_timeout_s=13,
        max_readings_per_message=17,
    )
    got = session_limits(settings)
    assert (got.messages_per_s, got.readings_per_s, got.bytes_per_s, got.burst_s) == (
        3,
        30,
        300,
        4,
    )
    assert (got.max_message_bytes, got.max_unacked_messages) == (2000, 9)
    assert (got.overload_close_s, got.shutdown_timeout_s) == (11, 13)
    assert got.frame == frame_limits(settings) and got.frame.max_readings == 17
    assert got.time == time_limits(settings)
    assert got.byte_burst == 2000  # 300 * 4 is less than one frame


@pytest.mark.parametrize("window", [2, 5, 30])
def test_a_long_stream_with_acks_always_owed_keeps_order_and_bounded_state(window: int) -> None:
    """Hundreds of messages, `window` always owed, each window durable newest first: every
    ack in order, and the owed list stays bounded (it is compacted as it is handed out)."""
    machine = SessionMachine(limits(max_unacked_messages=window + 1))
    sent: list[int] = []
    tickets = [machine.message_read(n, 1, {}, pending=True) for n in range(window)]
    for n in range(window, 600 + window, window):
        for ticket in reversed(tickets):
            machine.durable(ticket)
        tickets = [machine.message_read(n + k, 1, {}, pending=True) for k in range(window)]
        sent += send_ready(machine)
        assert machine.acks_owed == window
        assert len(machine._owed) <= 64 + 2 * window  # the internal list, compacted
    assert sent == list(range(len(sent))) and len(sent) >= 600
