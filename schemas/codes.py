"""Close codes, error codes and handshake answers of device protocol v1."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class CloseCode(IntEnum):
    """WebSocket close codes the hub uses, and what each tells a device to do."""

    GOING_AWAY = 1001  # hub shutting down: reconnect later, resend what is unacked
    UNSUPPORTED_DATA = 1003  # a text frame: fix the firmware
    INVALID_PAYLOAD = 1007  # not msgpack, not a map, bad envelope: fix the firmware
    POLICY_VIOLATION = 1008  # over this device's rate limit: slow down
    MESSAGE_TOO_BIG = 1009  # frame over max_message_bytes: send smaller messages
    TRY_AGAIN_LATER = 1013  # hub overloaded: back off and reconnect
    REPLACED = 4000  # a newer connection with the same token took over
    REVOKED = 4001  # token revoked: do not reconnect with it


class ErrorCode(StrEnum):
    """`code` values of the `error` message."""

    INVALID_MESSAGE = "invalid_message"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"


QUERY_PRECISIONS: dict[str, int] = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}
"""`precision` query parameter -> nanoseconds per unit of an integer `time`."""
DEFAULT_PRECISION = "ms"
WEBSOCKET_PATH = "/v1/ws"
