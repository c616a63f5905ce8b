"""What a device does after a connection ends: the reconnect policy, without I/O.

The same table as the MicroPython client's (clients/micropython/sensorhub/policy.py); a
test checks that the two agree on every close code and HTTP status.
"""

from __future__ import annotations

import random
from enum import StrEnum

from schemas.codes import CloseCode


class Action(StrEnum):
    """What to do with the unacked readings before reconnecting."""

    RETRY = "retry"  # reconnect with backoff, resend everything unacked
    DROP_OLDEST = "drop_oldest"  # 1007: the oldest unacked message is the one refused
    SPLIT = "split"  # 1009: the hub's frame limit is below ours: halve unacked messages
    STOP = "stop"  # do not reconnect: token revoked or refused, or the URL is wrong


SHORT_S = 1.0
"""At least this long after 1000 and 1001 (the hub restarts)."""
LONG_S = 60.0
"""After 4000 (someone else uses the token) and 1002/1003 (a bug in the client)."""
BUSY_S = 5.0
"""After 1008 and 1013: the hub's close frame carries no Retry-After."""

CLOSE_POLICY: dict[int, tuple[Action, float]] = {
    1000: (Action.RETRY, SHORT_S),
    CloseCode.GOING_AWAY: (Action.RETRY, SHORT_S),
    1002: (Action.RETRY, LONG_S),
    CloseCode.UNSUPPORTED_DATA: (Action.RETRY, LONG_S),
    CloseCode.INVALID_PAYLOAD: (Action.DROP_OLDEST, 0.0),
    CloseCode.POLICY_VIOLATION: (Action.RETRY, BUSY_S),
    CloseCode.MESSAGE_TOO_BIG: (Action.SPLIT, 0.0),
    1011: (Action.RETRY, 0.0),
    CloseCode.TRY_AGAIN_LATER: (Action.RETRY, BUSY_S),
    CloseCode.REPLACED: (Action.RETRY, LONG_S),
    CloseCode.REVOKED: (Action.STOP, 0.0),
}
"""Close code -> action and the least wait in seconds; any other code: retry."""

STOP_STATUSES = frozenset({400, 401, 403, 404})
"""Handshake refusals that retrying cannot fix; 429 and 503 wait for their Retry-After."""


def after_close(code: int) -> tuple[Action, float]:
    """The action and least wait in seconds after the hub closed with `code`."""
    return CLOSE_POLICY.get(code, (Action.RETRY, 0.0))


def after_refusal(status: int, retry_after_s: float | None) -> tuple[Action, float]:
    """The action and least wait in seconds after the handshake got HTTP `status`."""
    if status in STOP_STATUSES:
        return Action.STOP, 0.0
    return Action.RETRY, retry_after_s or 0.0


def reconnect_delay(
    attempt: int,
    rng: random.Random,
    base_s: float,
    cap_s: float,
    retry_after_s: float | None = None,
) -> float:
    """Seconds to wait before reconnect `attempt` (0 = the first after a failure).

    Exponential backoff with full jitter: uniform over [0, min(cap, base * 2**attempt)], so a
    fleet that lost the hub at the same moment does not come back in lock step. A
    `Retry-After` (or a close code's least wait) is a minimum: the jitter is added on top.
    """
    ceiling = min(cap_s, base_s * 2 ** min(attempt, 32))
    return (retry_after_s or 0.0) + rng.uniform(0, ceiling)


def retry_after_seconds(value: str | None) -> float | None:
    """A `Retry-After` header given in seconds (the hub sends seconds); None otherwise."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
