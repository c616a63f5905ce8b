"""The device port the workers share: systemd's sockets, or one to bind with SO_REUSEPORT.

Under systemd with `hub.socket`, the supervisor takes the sockets passed (one for all the
workers, or one per worker: `ReusePort=yes` and a `ListenStream=` each) and holds them at
descriptors of its own; fd 3 stays open for good, as the place where each worker's socket
is put (dup2) just before that worker is started, since sd_listen_fds starts at 3. Without
systemd, it keeps the port bound (not listening) for the workers to bind beside it.
"""

from __future__ import annotations

import os
import socket

from hub.errors import ConfigError
from hub.gateway.activation import SD_LISTEN_FDS_START, take_device_sockets


def take_passed_sockets(workers: int) -> list[socket.socket]:
    """systemd's device sockets for `workers` workers, held at fresh descriptors; empty
    without socket activation. A `ConfigError` unless there is one, or one per worker."""
    passed = take_device_sockets()
    if len(passed) not in (0, 1, workers):
        for taken in passed:
            taken.close()
        raise ConfigError(
            f"socket activation: {len(passed)} device sockets passed for {workers} workers: "
            "give one for all, or one per worker"
        )
    held = [socket.socket(fileno=os.dup(s.fileno())) for s in passed]
    for taken in passed:
        if taken.fileno() == SD_LISTEN_FDS_START:
            taken.detach()  # never free: no other file may take fd 3
        else:
            taken.close()
    return held


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port` with SO_REUSEPORT, not listening: it keeps the port for
    the workers (and names it, for port 0) but takes no connection. An `OSError` when
    something already listens there: workers must not join another server's port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))  # without SO_REUSEPORT: fails if anyone holds the port
        port = probe.getsockname()[1]
    reserved = socket.socket(family, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reserved.bind((host, port))
    except OSError:
        reserved.close()
        raise
    return reserved
