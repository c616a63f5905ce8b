"""systemd socket activation (the sd_listen_fds protocol): listening sockets handed over.

With `systemd/hub.socket`, systemd owns the device port and starts the hub with the socket
already open: `LISTEN_PID` (the hub's pid), `LISTEN_FDS` (how many descriptors, from 3) and
`LISTEN_FDNAMES` (their `FileDescriptorName=`, colon-separated). Because systemd keeps its
own copy of the socket, it stays open while the hub restarts: devices that connect meanwhile
wait in the kernel's backlog for the next hub instead of being refused. Without these
variables (not socket-activated) the hub binds its port itself, as it always did.

The variables are removed once read, as sd_listen_fds(3) does, so that no child process takes
them for its own.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from hub.errors import ConfigError

log = logging.getLogger("hub.activation")

SD_LISTEN_FDS_START = 3
DEVICES_FD_NAME = "devices"
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@dataclass(frozen=True, slots=True)
class PassedFd:
    """A descriptor systemd passed, with its `FileDescriptorName=`."""

    fd: int
    name: str


def passed_fds(environ: Mapping[str, str], pid: int) -> list[PassedFd]:
    """The descriptors systemd passed to process `pid`, by the sd_listen_fds rules. Pure.

    Empty when `LISTEN_PID` names another process (the variables were inherited, not meant
    for us) or is absent; a malformed value is a `ConfigError` saying which.
    """
    listen_pid = environ.get("LISTEN_PID")
    if listen_pid is None:
        return []
    try:
        if int(listen_pid) != pid:
            return []
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        raise ConfigError(
            f"socket activation: LISTEN_PID={listen_pid!r}, "
            f"LISTEN_FDS={environ.get('LISTEN_FDS')!r}: not numbers"
        ) from None
    if count < 0:
        raise ConfigError(f"socket activation: LISTEN_FDS={count} is negative")
    names = environ.get("LISTEN_FDNAMES", "").split(":") if "LISTEN_FDNAMES" in environ else []
    if names and len(names) != count:
        raise ConfigError(
            f"socket activation: LISTEN_FDNAMES names {len(names)} descriptors, "
            f"LISTEN_FDS says {count}"
        )
    return [
        PassedFd(SD_LISTEN_FDS_START + i, names[i] if names else "unknown") for i in range(count)
    ]


def choose_device_fds(fds: list[PassedFd]) -> list[PassedFd]:
    """The device ports among the passed descriptors: those named `devices`, or the only
    one there is (several for the workers of `hub serve --workers N`, one each). Pure.
    Several without that name is a `ConfigError`."""
    named = [fd for fd in fds if fd.name == DEVICES_FD_NAME]
    if named:
        return named
    if len(fds) == 1:
        return fds
    if fds:
        raise ConfigError(
            f"socket activation: {len(fds)} sockets passed "
            f"({', '.join(fd.name for fd in fds)}) and none has "
            f"FileDescriptorName={DEVICES_FD_NAME}"
        )
    return []


def choose_device_fd(fds: list[PassedFd]) -> PassedFd | None:
    """The one device port among the passed descriptors (`choose_device_fds`); several
    named `devices` are a `ConfigError` for a hub of its own. Pure."""
    chosen = choose_device_fds(fds)
    if len(chosen) > 1:
        raise ConfigError(
            f"socket activation: {len(chosen)} sockets named {DEVICES_FD_NAME!r}: one per "
            "worker is for `hub serve --workers N`; a single hub takes one"
        )
    return chosen[0] if chosen else None


def take_device_socket(environ: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The listening device socket systemd passed to this process, or None to bind one.

    Reads and removes the `LISTEN_*` variables; descriptors other than the device port are
    closed with a warning. Each process can take it once.
    """
    environ = os.environ if environ is None else environ
    chosen = choose_device_fd(passed_fds(environ, os.getpid()))
    taken = take_device_sockets(environ, only=[chosen] if chosen is not None else [])
    return taken[0] if taken else None


def take_device_sockets(
    environ: MutableMapping[str, str] | None = None, only: list[PassedFd] | None = None
) -> list[socket.socket]:
    """Every listening device socket systemd passed to this process (`choose_device_fds`,
    or `only` those), each checked to be a listening TCP socket; empty to bind one.

    Reads and removes the `LISTEN_*` variables; descriptors other than the device ports are
    closed with a warning.
    """
    environ = os.environ if environ is None else environ
    fds = passed_fds(environ, os.getpid())
    for name in _VARIABLES:
        environ.pop(name, None)
    chosen = choose_device_fds(fds) if only is None else only
    for passed in fds:
        os.set_inheritable(passed.fd, False)
        if passed not in chosen:
            log.warning(
                "socket activation: closing descriptor %d (%s): the hub listens for devices "
                "on the sockets named %s",
                passed.fd,
                passed.name,
                DEVICES_FD_NAME,
            )
            os.close(passed.fd)
    return [_listening(passed) for passed in chosen]


def _listening(chosen: PassedFd) -> socket.socket:
    listener = socket.socket(fileno=chosen.fd)
    if listener.type != socket.SOCK_STREAM or listener.family not in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        listener.close()
        raise ConfigError(
            "socket activation: the device socket must be a TCP stream (ListenStream= with "
            "an address or port)"
        )
    if not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        listener.close()
        raise ConfigError("socket activation: the device socket is not listening")
    address = listener.getsockname()
    log.info(
        "listening on %s:%d, the socket systemd passed (hub.socket; host and port settings "
        "do not apply)",
        address[0],
        address[1],
    )
    return listener
