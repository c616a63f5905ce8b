"""The layers of the test pyramid, and what keeps the unit layer free of servers and networks.

* `unit`: pure code, fast. No server, no subprocess, no network: it passes in a fresh network
  namespace where not even loopback is up (`unshare -n`, see scripts/test.sh). While a unit
  test runs, `UnitGuard` refuses inet sockets and new processes, so a test that opens one
  fails on any machine, not only inside the namespace. Like Google's "small" tests, a unit
  test is also quick: a pure test that runs for seconds (the fuzz run of tests/test_fuzz.py,
  1500 generated frames) sits a layer up, so that the whole unit layer stays well under 30 s.
* `integration`: real servers (InfluxDB, VictoriaMetrics, the hub's listeners in-process)
  over real loopback sockets.
* `e2e`: real processes end to end: `hub serve`, the CLI, systemd, tmux, a MicroPython port.

Every test carries exactly one of them (tests/test_architecture.py checks it by collecting).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

LAYERS = frozenset({"unit", "integration", "e2e"})
SERVER_FIXTURES = frozenset(
    {"influxdb", "own_influxdb", "victoria_metrics", "influx_db_name"}
    | {"postgres", "postgres_db", "pg", "own_postgres", "haproxy"}  # tests/servers/fixtures.py
)
"""Session fixtures that start a real server: never for a unit test."""
_INET = frozenset({socket.AF_INET, socket.AF_INET6})
# Audit events (docs.python.org/3/library/audit_events.html) that start a process.
_PROCESS_EVENTS = frozenset(
    {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork"}
)


def layers_of(item: pytest.Item) -> list[str]:
    """The layer marks of a collected test, one entry per mark (so duplicates show)."""
    return [mark.name for mark in item.iter_markers() if mark.name in LAYERS]


class UnitGuard:
    """An audit hook that, while armed, refuses inet sockets and new processes.

    Audit hooks cannot be removed, so one is installed per process and armed around each
    unit test. AF_UNIX sockets stay allowed: asyncio's event loop wakes itself through a
    socket pair, and a network namespace has them too.
    """

    def __init__(self) -> None:
        self.armed_for: str | None = None
        self.refusals: list[str] = []
        """What was refused since armed: the test fails even if the code under test
        swallowed the error (a broad `except Exception` around a write, say)."""
        self._installed = False

    def arm(self, test: str) -> None:
        """Refuse from now on, on behalf of `test`."""
        self.armed_for = test
        self.refusals = []

    def disarm(self) -> list[str]:
        """Stop refusing; return what was refused while armed."""
        self.armed_for = None
        refusals, self.refusals = self.refusals, []
        return refusals

    def install(self) -> None:
        """Install the hook once per process."""
        if not self._installed:
            sys.addaudithook(self._audit)
            self._installed = True

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        test = self.armed_for
        if test is None:
            return
        refusal = None
        if event in _PROCESS_EVENTS:
            refusal = f"unit test {test} started a process ({event}): mark it e2e"
        elif event in {"socket.connect", "socket.bind", "socket.sendto"}:
            sock = args[0]
            if isinstance(sock, socket.socket) and sock.family in _INET:
                refusal = (
                    f"unit test {test} used the network ({event} {args[1]!r}): mark it integration"
                )
        if refusal is not None:
            self.refusals.append(refusal)
            raise RuntimeError(refusal)


UNIT_GUARD = UnitGuard()
"""The one guard of this process (tests/conftest.py arms it around each unit test)."""


def check_unit_item(item: pytest.Item) -> None:
    """Fail a unit test at setup if it asks for a fixture that starts a server."""
    servers = sorted(SERVER_FIXTURES & set(getattr(item, "fixturenames", ())))
    if servers:
        pytest.fail(
            f"{item.nodeid} is marked unit but uses {', '.join(servers)}: mark it integration",
            pytrace=False,
        )


class LayerRecorder:
    """A pytest plugin that records the layer marks of every collected test."""

    NAME = "layer-recorder"

    def __init__(self) -> None:
        self.layers: dict[str, list[str]] = {}

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: Iterable[pytest.Item]) -> None:
        """Record before `-m` deselects anything."""
        for item in items:
            self.layers[item.nodeid] = layers_of(item)


def collect_layers(
    tests_dir: Path, basetemp: Path, config: pytest.Config | None = None
) -> dict[str, list[str]]:
    """Every test under `tests_dir` and its layer marks, by node id.

    When this session (`config`) collected every test file already, as `pytest -m unit`
    does before deselecting, its record is used; otherwise the files are collected here,
    in-process (no subprocess: this runs in the unit layer).
    """
    recorder = config.pluginmanager.get_plugin(LayerRecorder.NAME) if config else None
    files = {str(p.relative_to(tests_dir.parent)) for p in tests_dir.glob("test_*.py")}
    if isinstance(recorder, LayerRecorder):
        seen = {nodeid.split("::")[0] for nodeid in recorder.layers}
        if files <= seen:
            return {k: v for k, v in recorder.layers.items() if k.split("::")[0] in files}
    recorder = LayerRecorder()
    code = pytest.main(
        [
            "--collect-only",
            "-qq",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            f"--basetemp={basetemp}",
            str(tests_dir),
        ],
        plugins=[recorder],
    )
    if code != pytest.ExitCode.OK:
        raise AssertionError(f"collecting {tests_dir} failed with {code!r}")
    return recorder.layers
