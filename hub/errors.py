"""Exceptions of the hub.

HubError
├── ProtocolError            a device broke the wire contract; carries the close code
│   ├── InvalidMessage       not msgpack, not a map, no/unknown type, bad envelope (1007)
│   ├── UnsupportedData      a text frame (1003)
│   └── RateLimited          over the device's message or reading rate (1008)
│       └── Overloaded       more than the hub can take: its write pipeline stays full (1013)
├── ConfigError              a settings or measurement schema file is wrong
├── SpoolInUse               another live process holds a spool directory; `path`, `pid`
├── RegistryError            the device registry refused an operation
│   ├── UnknownDevice
│   ├── DeviceExists
│   └── RegistryUnavailable  the PostgreSQL registry cannot be reached or used (`registry_url`)
└── WriteError               InfluxDB did not take a batch
    ├── TransientWriteError  retrying can fix it (connection, 5xx, 429); `retry_after` seconds
    └── PermanentWriteError  retrying cannot (400, 401, 403, 404, 413, 422); `reason`,
                             and `dropped` when the server stored the rest (a partial write)
"""

from __future__ import annotations

from schemas.codes import CloseCode, ErrorCode


class HubError(Exception):
    """Base class of every error the hub raises on purpose."""


class ProtocolError(HubError):
    """A device broke the protocol; the connection is closed with `close_code`."""

    close_code: CloseCode = CloseCode.INVALID_PAYLOAD
    error_code: ErrorCode = ErrorCode.INVALID_MESSAGE
    acks_first: bool = True
    """Whether acks of earlier messages are awaited (bounded) before the close."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidMessage(ProtocolError):
    """The frame is not a valid protocol message."""


class UnsupportedData(ProtocolError):
    """The frame is a text frame."""

    close_code = CloseCode.UNSUPPORTED_DATA


class RateLimited(ProtocolError):
    """The device sends faster than its limit."""

    close_code = CloseCode.POLICY_VIOLATION
    error_code = ErrorCode.RATE_LIMITED


class Overloaded(RateLimited):
    """The device keeps sending while the hub cannot take more; not the device's fault."""

    close_code = CloseCode.TRY_AGAIN_LATER
    error_code = ErrorCode.OVERLOADED
    acks_first = False  # they wait on the same full pipeline


class ConfigError(HubError):
    """A configuration or schema file cannot be used."""


class SpoolInUse(HubError):
    """Another live process holds the lock of a spool directory (a second hub on the same
    state directory and worker slot, or a replay of a spool its hub still writes)."""

    def __init__(self, path: str, pid: int | None) -> None:
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"the spool at {path} is in use by {holder}: two processes never share a spool "
            "(is another hub running on this state directory?)"
        )
        self.path = path
        self.pid = pid


class RegistryError(HubError):
    """The device registry refused an operation."""


class UnknownDevice(RegistryError):
    """No device with that id."""

    def __init__(self, device_id: str) -> None:
        super().__init__(f"no device {device_id!r}")
        self.device_id = device_id


class DeviceExists(RegistryError):
    """A device with that id is already registered."""

    def __init__(self, device_id: str) -> None:
        super().__init__(f"device {device_id!r} already exists")
        self.device_id = device_id


class RegistryUnavailable(RegistryError):
    """The PostgreSQL registry cannot be reached, or refuses the hub's role."""


class WriteError(HubError):
    """InfluxDB did not take a batch."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason if status is None else f"HTTP {status}: {reason}")
        self.reason = reason
        self.status = status


class TransientWriteError(WriteError):
    """Retrying later can succeed; `retry_after` is the server's hint in seconds, if any."""

    def __init__(
        self, reason: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(reason, status)
        self.retry_after = retry_after


class PermanentWriteError(WriteError):
    """Retrying cannot succeed: the server refused the data itself.

    `dropped` is how many points the server refused when it says so (InfluxDB's "partial
    write: ... dropped=N"): it stored the others. None means it did not say.
    """

    def __init__(self, reason: str, status: int | None = None, dropped: int | None = None) -> None:
        super().__init__(reason, status)
        self.dropped = dropped
