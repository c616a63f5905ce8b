"""Debian packages the suite needs, installed with apt-get when missing: the one place for it.

The package code (device_sim/local_servers.py) only starts what is installed; the suite's
fixtures install what they need from here, and scripts/setup.sh does the same for the demo.
Not root: `sudo -n` (fails at once rather than ask for a password). `apt-get update`, slow
and networked, runs only when an install fails without it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from device_sim.local_servers import HAPROXY, INFLUXD, PACKAGES, PG_BIN, VICTORIA_METRICS

INSTALL_TIMEOUT_S = 900.0
INSTALL_LOCK = Path(tempfile.gettempdir()) / "sensor-hub-tests-apt.lock"


class InstallError(RuntimeError):
    """A package the suite needs is missing and could not be installed."""


def _which(tool: str) -> bool:
    return shutil.which(tool) is not None


def exists(path: str) -> bool:
    """Whether `path` exists: the `present` check of `install_missing` for absolute paths."""
    return Path(path).exists()


def install_missing(packages: Mapping[str, str], present: Callable[[str], bool] = _which) -> None:
    """Install the Debian package of each tool (`{tool: package}`) that `present` misses.

    `present` defaults to "on PATH"; pass `exists`-like checks for absolute paths. Raises
    `InstallError` naming what is still missing and the command that failed.
    """
    if all(present(tool) for tool in packages):
        return
    # The suite's parallel runners may all find a package missing: one apt-get at a time
    # (dpkg's own lock would fail the others), and each looks again once it has the lock.
    with _install_lock():
        _install(packages, present)


@contextmanager
def _install_lock() -> Iterator[None]:
    with INSTALL_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _install(packages: Mapping[str, str], present: Callable[[str], bool]) -> None:
    missing = sorted({pkg for tool, pkg in packages.items() if not present(tool)})
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    sudo = ["sudo", "-n", "-E"] if os.geteuid() != 0 and shutil.which("sudo") else []
    install = [*sudo, "apt-get", "install", "-y", "--no-install-recommends", *missing]

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, capture_output=True, text=True, env=env, check=False, timeout=INSTALL_TIMEOUT_S
        )

    if shutil.which("apt-get") is None:
        result = None
    else:
        result = run(install)
        if result.returncode != 0:
            run([*sudo, "apt-get", "update"])
            result = run(install)
    still = sorted(tool for tool in packages if not present(tool))
    if still:
        why = (
            "apt-get is not on PATH"
            if result is None
            else (f"`{' '.join(install)}` exited {result.returncode}: {result.stderr[-2000:]}")
        )
        raise InstallError(f"{', '.join(still)} missing ({' '.join(missing)}); {why}")


def ensure_database_servers() -> None:
    """InfluxDB 1.6.7 and VictoriaMetrics, from Debian's influxdb and victoria-metrics."""
    install_missing(
        {str(binary): PACKAGES[binary] for binary in (INFLUXD, VICTORIA_METRICS)}, exists
    )


def ensure_postgres() -> None:
    """PostgreSQL 15's initdb, postgres, psql and pg_isready, from Debian's postgresql."""
    install_missing({str(b): pkg for b, pkg in PACKAGES.items() if b.parent == PG_BIN}, exists)


def ensure_haproxy() -> None:
    """HAProxy, from Debian's haproxy."""
    install_missing({str(HAPROXY): PACKAGES[HAPROXY]}, exists)
