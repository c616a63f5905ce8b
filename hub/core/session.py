"""The device session's protocol, without I/O: what to do with each event of a connection.

Like websockets' `protocol.py` (driven by `asyncio/connection.py`) or h11's `Connection`,
`SessionMachine` holds the state of one device connection and turns events into decisions;
it never touches a socket, a task or a clock. `hub.gateway.session` drives it: it reads
frames, prepares and submits readings, waits, and carries out the actions.

Events in: a frame's size and reading count (rate checks), a readings message read (and
whether its durability is still pending), a message durable or failing, the ack sender
gone, the device's desired config, a `config_ack`, the hub draining, a protocol error.
Actions out: `SendAck` (in the order the messages were read, whatever order they became
durable in: contract clarification 10), `SendConfig`, `RecordConfigAnswer`, `Close` (which
code, whether an `error` precedes it, and how long the acks owed may take first:
clarifications 3 and 4). Errors are raised as `hub.errors.ProtocolError`, as h11 raises
its protocol errors; `close_for` turns one into its `Close`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from hub.core.frames import FrameLimits
from hub.core.ratelimit import TokenBucket
from hub.core.readings import TimeLimits
from hub.errors import Overloaded, ProtocolError, RateLimited, UnsupportedData
from schemas.codes import CloseCode
from schemas.messages import ConfigAck, ErrorMessage

ACK_GRACE_S = 10.0
"""How long acks of earlier messages may take before a protocol-error close."""

CLOSE_REASON_CHARS = 120
"""A close frame's reason must fit in 123 bytes; the `error` message carries the whole text."""

DRAIN_REASON = "hub shutting down"

_PENDING, _DURABLE, _FAILED = 0, 1, 2
"""What is known of an owed message's readings."""

_COMPACT_AFTER = 64
"""Handed-out entries at the front of the owed list before it is compacted."""

ConfigResult = Literal["applied", "refused", "ignored"]


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What one connection may do (built from the settings by `hub.options`); replaced whole
    on a reload."""

    messages_per_s: float
    readings_per_s: float
    bytes_per_s: float
    burst_s: float
    max_message_bytes: int
    max_unacked_messages: int
    overload_close_s: float
    shutdown_timeout_s: float
    frame: FrameLimits
    time: TimeLimits

    @property
    def byte_burst(self) -> float:
        """The byte bucket's size: `burst_s` of traffic, and never less than one frame of
        `max_message_bytes`, which could otherwise never pass."""
        return max(self.bytes_per_s * self.burst_s, self.max_message_bytes)


@dataclass(frozen=True, slots=True)
class SendAck:
    """Send the ack of message `seq`: `accepted` readings stored, the others' reasons."""

    seq: int
    accepted: int
    reasons: dict[int, list[str]]


@dataclass(frozen=True, slots=True)
class SendConfig:
    """Send the device its desired config."""

    version: int
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RecordConfigAnswer:
    """Record the device's answer to a config version in the config store."""

    version: int
    ok: bool
    error: str | None


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with `code`: first wait up to `acks_within` seconds (None: not at
    all) for the acks owed, then send `error` if there is one, then the close frame."""

    code: int
    reason: str
    error: ErrorMessage | None
    acks_within: float | None


def close_for(exc: ProtocolError) -> Close:
    """How a connection ends for a protocol error (contract clarifications 3 and 4).

    Every error but a text frame's (1003) is told in an `error` message first; the acks of
    the messages read before it are awaited, bounded, except before 1013: they wait on the
    same full pipeline."""
    error = None
    if not isinstance(exc, UnsupportedData):
        error = ErrorMessage(code=exc.error_code, message=exc.message)
    return Close(
        code=exc.close_code,
        reason=exc.message[:CLOSE_REASON_CHARS],
        error=error,
        acks_within=ACK_GRACE_S if exc.acks_first else None,
    )


def drain_close(limits: SessionLimits) -> Close:
    """How a connection ends when the hub drains: every message read is acked (bounded by
    `shutdown_timeout_s`), then 1001; the frame that found the hub draining is not acked."""
    return Close(CloseCode.GOING_AWAY, DRAIN_REASON, None, limits.shutdown_timeout_s)


def config_result(recorded: bool, ok: bool) -> ConfigResult:
    """The metrics label of a device's answer: `ignored` when the store did not record it
    (a version it never sent, or one already answered), else applied or refused."""
    if not recorded:
        return "ignored"
    return "applied" if ok else "refused"


class SessionMachine:
    """The protocol state of one device connection (see the module docstring).

    Acks are owed for readings messages in the order read. Each gets a ticket, numbered
    from 0 in that order; `durable(ticket)` marks one stored, `failed(ticket)` one that never
    will be, and `next_ack` hands out the ack of the oldest owed message once it is durable.
    """

    __slots__ = (
        "_acks_stopped",
        "_byte_rate",
        "_closing",
        "_first_ticket",
        "_head",
        "_in_hand",
        "_message_rate",
        "_next_ticket",
        "_owed",
        "_reading_rate",
        "config_sent",
        "limits",
    )

    def __init__(self, limits: SessionLimits) -> None:
        self.limits = limits
        self.config_sent = 0
        """The newest config version sent on this connection (0: none)."""
        # Three token buckets, held directly: an object of their own costs every idle
        # connection its size.
        self._message_rate = TokenBucket(0, 0)
        self._byte_rate = TokenBucket(0, 0)
        self._reading_rate = TokenBucket(0, 0)
        self._apply_rates(limits, full=True)
        # [ack, _PENDING | _DURABLE | _FAILED] per message read and not yet acked, oldest
        # first: a list rather than a dataclass, the cheapest mutable pair.
        # Owed from _owed[_head] on: a list and an index rather than a deque, whose empty
        # block (600 bytes) every idle connection would carry.
        self._owed: list[list[Any]] = []
        self._head = 0
        self._first_ticket = 0  # the ticket of _owed[_head]
        self._next_ticket = 0
        self._acks_stopped = False
        self._in_hand = False  # an ack handed out by next_ack and not yet sent
        self._closing: Close | None = None

    # -- limits and rates ------------------------------------------------------------------

    def apply_limits(self, limits: SessionLimits) -> None:
        """Use reloaded limits from now on (rates, frame and time limits, timeouts)."""
        self.limits = limits
        self._apply_rates(limits, full=False)

    def _apply_rates(self, limits: SessionLimits, full: bool) -> None:
        """New rates from now on; tokens beyond a smaller burst are dropped (`full`: the
        buckets start full, as on a new connection)."""
        for bucket, rate, burst in (
            (self._message_rate, limits.messages_per_s, limits.messages_per_s * limits.burst_s),
            (self._reading_rate, limits.readings_per_s, limits.readings_per_s * limits.burst_s),
            (self._byte_rate, limits.bytes_per_s, limits.byte_burst),
        ):
            bucket.rate = rate
            bucket.burst = burst
            bucket.tokens = burst if full else min(bucket.tokens, burst)

    def check_rate(self, size: int, items: int, now: float) -> None:
        """A frame of `size` bytes carrying `items` readings arrived at `now` (monotonic
        seconds). Raises `RateLimited` (1008) when it is over one of the device's rates."""
        limits = self.limits
        if not self._message_rate.take(1, now):
            raise RateLimited(f"more than {limits.messages_per_s:g} messages a second")
        if not self._byte_rate.take(size, now):
            raise RateLimited(f"more than {limits.bytes_per_s:g} bytes a second")
        if items and not self._reading_rate.take(items, now):
            raise RateLimited(f"more than {limits.readings_per_s:g} readings a second")

    # -- acks ------------------------------------------------------------------------------

    def message_read(
        self, seq: int, accepted: int, reasons: dict[int, list[str]], pending: bool
    ) -> int:
        """A readings message was read (and its accepted readings submitted); `pending`:
        its durability is still to come. Returns its ticket for `durable` and `failed`.

        Raises `Overloaded` (1013) once acks can no longer be sent: nothing would ever ack
        this message."""
        if self._acks_stopped:
            raise Overloaded("the hub cannot acknowledge readings now; retry later")
        ticket = self._next_ticket
        self._next_ticket = ticket + 1
        self._owed.append([SendAck(seq, accepted, reasons), _PENDING if pending else _DURABLE])
        return ticket

    def durable(self, ticket: int) -> bool:
        """The readings of the message with `ticket` are stored. Returns whether the sender
        has something to do now (it was the oldest owed message)."""
        return self._settle(ticket, _DURABLE)

    def failed(self, ticket: int) -> bool:
        """The readings of the message with `ticket` can no longer be stored (the hub is
        stopping). Acks of the messages before it still go; when its turn comes, acks stop
        for good. Returns whether the sender has something to do now."""
        return self._settle(ticket, _FAILED)

    def _settle(self, ticket: int, state: int) -> bool:
        index = ticket - self._first_ticket
        if self._acks_stopped or index < 0 or index >= len(self._owed) - self._head:
            return False  # answered already, or nothing will be answered any more
        self._owed[self._head + index][1] = state
        return index == 0

    def next_ack(self) -> SendAck | None:
        """The ack to send now, in the order the messages were read; None while the oldest
        owed message is not durable yet (or acks stopped). The caller calls `ack_sent` once
        it is sent, `acks_failed` if it could not be."""
        owed, head = self._owed, self._head
        if head == len(owed) or owed[head][1] == _PENDING:
            return None
        ack, state = owed[head]
        self._first_ticket += 1
        if head + 1 == len(owed):  # all handed out: the usual case when acks keep up
            owed.clear()
            self._head = 0
        elif head + 1 >= _COMPACT_AFTER:
            del owed[: head + 1]
            self._head = 0
        else:
            self._head = head + 1
        if state == _FAILED:
            self.acks_failed()
            return None
        self._in_hand = True
        return ack  # type: ignore[no-any-return]

    def ack_sent(self) -> None:
        """The ack `next_ack` handed out was sent."""
        self._in_hand = False

    def acks_failed(self) -> None:
        """Acks can no longer be sent (the connection is gone, or a message can no longer be
        stored): nothing owed will be answered, and a later message gets 1013."""
        self._acks_stopped = True
        self._in_hand = False
        self._first_ticket += len(self._owed) - self._head
        self._owed.clear()
        self._head = 0

    @property
    def awaited(self) -> int | None:
        """The ticket of the message the acks wait for (the oldest owed, not yet durable);
        None when `next_ack` has something to do, or nothing is owed."""
        owed, head = self._owed, self._head
        if head < len(owed) and owed[head][1] == _PENDING:
            return self._first_ticket
        return None

    @property
    def ready(self) -> bool:
        """Whether `next_ack` has something to do: the oldest owed message is settled."""
        owed, head = self._owed, self._head
        return head < len(owed) and owed[head][1] != _PENDING

    @property
    def acks_owed(self) -> int:
        """Messages read and neither acked nor given up on (the one being sent included)."""
        return len(self._owed) - self._head + self._in_hand

    @property
    def acks_stopped(self) -> bool:
        """Whether acks stopped for good (`acks_failed`)."""
        return self._acks_stopped

    @property
    def has_room(self) -> bool:
        """Whether the device's next frame may be read (flow control, not an error): at most
        `max_unacked_messages` owed beside the one the sender has in hand."""
        return self.acks_owed <= self.limits.max_unacked_messages + 1

    # -- config ----------------------------------------------------------------------------

    def config_to_send(
        self, version: int, pending: bool, config: dict[str, Any]
    ) -> SendConfig | None:
        """The device's desired config `version` (`pending`: not answered yet). Sent once per
        connection and version, and only when newer than what this connection sent: versions
        only grow (clarification 5)."""
        if not pending or version <= self.config_sent:
            return None
        self.config_sent = version
        return SendConfig(version, config)

    def config_answered(self, answer: ConfigAck) -> RecordConfigAnswer:
        """The device answered a config. `ok: false` answers the version too; whether the
        version was ever sent is the store's to say (it ignores one it never sent)."""
        return RecordConfigAnswer(answer.version, answer.ok, answer.error)

    # -- the end ---------------------------------------------------------------------------

    def drain(self) -> Close:
        """The hub is draining: no further frame is processed."""
        return self._close(drain_close(self.limits))

    def refuse(self, exc: ProtocolError) -> Close:
        """The device broke the protocol with `exc`: no further frame is processed."""
        return self._close(close_for(exc))

    def _close(self, close: Close) -> Close:
        if self._closing is None:
            self._closing = close
        return self._closing

    @property
    def closing(self) -> Close | None:
        """The close decided, once one is (the first decision stands)."""
        return self._closing
