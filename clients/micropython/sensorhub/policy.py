"""What to do after a connection ends: the reconnect policy as a table, without I/O.

The Python client (`sensorhub_client.policy`) holds the same table; a test checks that the
two agree on every close code and HTTP status.
"""

from . import compat

# What to do with the unacked readings, and how long to wait before reconnecting.
RETRY = "retry"  # reconnect with backoff, resend everything unacked
DROP_OLDEST = "drop_oldest"  # 1007: the oldest unacked message is the one the hub refused
SPLIT = "split"  # 1009: the hub's frame limit is below ours: halve the unacked messages
STOP = "stop"  # do not reconnect: the token was revoked or refused, or the URL is wrong

_SHORT_S = 1  # after 1001 (hub restart) and 1000
_LONG_S = 60  # someone else uses our token (4000); our own firmware bug (1002, 1003)
_BUSY_S = 5  # 1013: the hub is overloaded; its close frame carries no Retry-After

# close code -> (action, seconds to wait at least)
CLOSE_POLICY = {
    1000: (RETRY, _SHORT_S),
    1001: (RETRY, _SHORT_S),
    1002: (RETRY, _LONG_S),
    1003: (RETRY, _LONG_S),
    1007: (DROP_OLDEST, 0),
    1008: (RETRY, _BUSY_S),
    1009: (SPLIT, 0),
    1011: (RETRY, 0),
    1013: (RETRY, _BUSY_S),
    4000: (RETRY, _LONG_S),
    4001: (STOP, 0),
}

# HTTP status of a refused handshake -> action (429 and 503 wait for their Retry-After)
STATUS_POLICY = {
    400: STOP,  # a bug in the URL or headers: retrying cannot help
    401: STOP,  # the token is wrong or revoked: wait for a new one
    403: STOP,  # an Origin the operator has not allowed
    404: STOP,  # the URL's path is wrong
}

STOP_REASONS = {4001: "revoked", 401: "unauthorized"}  # any other STOP: "refused"


def after_close(code: int) -> tuple[str, int]:
    """The action and minimum wait in seconds after the hub closed with `code`."""
    return CLOSE_POLICY.get(code, (RETRY, 0))


def after_refusal(status: int, retry_after_s: int | None) -> tuple[str, int]:
    """The action and minimum wait in seconds after the handshake got HTTP `status`."""
    action = STATUS_POLICY.get(status)
    if action is not None:
        return action, 0
    return RETRY, retry_after_s or 0


def backoff_ms(attempt: int, base_ms: int, cap_ms: int, floor_s: int = 0) -> int:
    """Milliseconds before reconnect `attempt` (0 = the first after a failure).

    Full jitter: uniform over [0, min(cap, base * 2**attempt)], on top of `floor_s` (a
    Retry-After or a close code's minimum), so that a fleet that lost the hub at once does
    not come back in lock step.
    """
    ceiling = min(cap_ms, base_ms << min(attempt, 20))
    return floor_s * 1000 + compat.random_below(ceiling + 1)
