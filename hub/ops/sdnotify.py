"""systemd's service notification protocol (sd_notify): ready, reloading, stopping, watchdog.

A unit with `Type=notify` starts the hub with `NOTIFY_SOCKET`, a Unix datagram socket (a
path, or `@name` in the abstract namespace); each notification is one datagram of
`KEY=VALUE` lines. With `WatchdogSec=` it also sets `WATCHDOG_USEC` (and `WATCHDOG_PID`):
unless `WATCHDOG=1` arrives that often, systemd kills the hub and restarts it. The hub sends
it from a task on its event loop, so a loop that hangs stops the heartbeat. Without these
variables (not under systemd) every notification is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("hub.sdnotify")


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between `WATCHDOG=1`: half of `WATCHDOG_USEC`, if the watchdog is this process's."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        owner = int(environ.get("WATCHDOG_PID") or pid)
    except ValueError:
        return None
    if usec <= 0 or owner != pid:
        return None
    return usec / 2e6


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as `MONOTONIC_USEC=` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends notifications to the socket in `NOTIFY_SOCKET`; silent when there is none."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        # Abstract namespace: `@name` on the wire is a leading NUL byte.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        self.watchdog_s = watchdog_interval(environ, os.getpid()) if address else None

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return bool(self._address)

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` assignments in one datagram; False if nobody got it."""
        if not self._address:
            return False
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the event loop on a full queue: a lost heartbeat beats a hung hub.
            self._socket.setblocking(False)
        try:
            self._socket.sendto("\n".join(assignments).encode("utf-8"), self._address)
        except OSError as exc:
            log.debug("sd_notify %s failed: %s", assignments[0], exc)
            return False
        return True

    def ready(self, status: str, *extra: str) -> None:
        """Start-up (or a reload) is complete; `extra` assignments go in the same datagram."""
        self.notify("READY=1", f"STATUS={status}", *extra)

    def reloading(self) -> None:
        """A reload begins; `ready` ends it."""
        self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading")

    def stopping(self) -> None:
        """Shutdown begins."""
        self.notify("STOPPING=1", "STATUS=stopping: flushing what devices sent")

    async def keep_alive(self) -> None:
        """Send `WATCHDOG=1` every half watchdog period until cancelled."""
        if self.watchdog_s is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s)

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
