"""The sockets workers notify their supervisor on, in systemd's own protocol (sd_notify).

Each worker runs the same `HubService` as a single hub, whose `Notifier` tells its service
manager READY=1, WATCHDOG=1, RELOADING=1 and STOPPING=1. For a worker the supervisor is that
manager: it gives each slot a datagram socket of its own in the abstract namespace
(`NOTIFY_SOCKET=@sensor-hub-PID-K-RANDOM`), and reads each datagram with the sender's
credentials (`SO_PASSCRED`): only the slot's current process is listened to, so a stale
worker or a stranger on the host cannot make a slot look alive or ready.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import struct
from collections.abc import Callable

log = logging.getLogger("hub.workers")

_UCRED = struct.Struct("iII")  # pid, uid, gid
MAX_DATAGRAM = 4096


def parse_notification(datagram: bytes) -> dict[str, str]:
    """The `KEY=VALUE` lines of one notification; lines without `=` are ignored. Pure."""
    assignments: dict[str, str] = {}
    for line in datagram.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            assignments[key] = value
    return assignments


class NotifyRelay:
    """One slot's notification socket: calls `on_message(assignments)` for each datagram
    from the process `expected_pid`."""

    def __init__(self, number: int, on_message: Callable[[dict[str, str]], None]) -> None:
        self.address = f"@sensor-hub-{os.getpid()}-{number}-{secrets.token_hex(8)}"
        self.expected_pid: int | None = None
        self._on_message = on_message
        self._socket = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._socket.bind("\0" + self.address[1:])
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Read datagrams on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._socket.fileno(), self.read_pending)

    def read_pending(self) -> None:
        """Handle every datagram waiting (the loop calls this when the socket is readable)."""
        while True:
            try:
                data, ancillary, _, _ = self._socket.recvmsg(
                    MAX_DATAGRAM, socket.CMSG_SPACE(_UCRED.size)
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("reading a worker notification failed: %s", exc)
                return
            sender = _sender_pid(ancillary)
            if sender is None or sender != self.expected_pid:
                continue  # not from the slot's current process
            self._on_message(parse_notification(data))

    def close(self) -> None:
        """Stop reading and close the socket."""
        if self._loop is not None:
            self._loop.remove_reader(self._socket.fileno())
        self._socket.close()


def _sender_pid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid, _, _ = _UCRED.unpack(data[: _UCRED.size])
            return int(pid)
    return None
