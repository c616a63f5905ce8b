"""The process's open-file limit: raised to what the system allows, checked against the load.

Every device connection is a file descriptor, and so is every stranger still in its
handshake. systemd starts services with a soft limit of 1024 unless the unit sets
`LimitNOFILE=`, far below the default `max_connections`; past it, `accept` fails and every
device is refused. The soft limit may be raised up to the hard one without privileges.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("hub.filelimit")

FD_HEADROOM = 256
"""Descriptors beyond the connections: the registry, spool, InfluxDB sockets, handshakes."""


@dataclass(frozen=True, slots=True)
class FileLimit:
    """The soft and hard RLIMIT_NOFILE after `raise_file_limit`."""

    soft: int
    hard: int


def needed_descriptors(max_connections: int) -> int:
    """Descriptors a hub with `max_connections` devices may need."""
    return max_connections + FD_HEADROOM


def shortfall_warning(limit: FileLimit, max_connections: int) -> str | None:
    """What to tell the operator when `limit` cannot hold `max_connections`, or None. Pure."""
    needed = needed_descriptors(max_connections)
    if limit.soft >= needed:
        return None
    return (
        f"the open-file limit is {limit.soft} (hard {limit.hard}), but max_connections = "
        f"{max_connections} needs about {needed}: devices past it will be refused; raise "
        f"LimitNOFILE= in the unit (or ulimit -n) or lower max_connections"
    )


def raise_file_limit(max_connections: int) -> FileLimit | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit and warn if that is still short.

    None where the platform has no such limit (Windows).
    """
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = (
        hard if hard != resource.RLIM_INFINITY else max(soft, needed_descriptors(max_connections))
    )
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    limit = FileLimit(soft, hard)
    if (warning := shortfall_warning(limit, max_connections)) is not None:
        log.warning("%s", warning)
    return limit
