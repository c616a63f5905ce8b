"""Shared pytest fixtures, one section per concern; add new sections at the end."""

from __future__ import annotations

import importlib
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_sim.local_servers import (
    LocalServer,
    create_database,
    drop_database,
    start_influxdb,
    start_victoria_metrics,
)
from hub.registry import sqlite as registry_module
from tests.layers import UNIT_GUARD, LayerRecorder, check_unit_item
from tests.packages import ensure_database_servers
from tests.ports import claim_runner_ports
from tests.token_leaks import LeakWatch

# Before any fixture picks a port: this runner's own range (tests/ports.py).
claim_runner_ports()

# A test that leaks a token on purpose, for tests/test_leak_watch_run.py alone.
collect_ignore = [] if os.environ.get("SENSOR_HUB_LEAK_PROBE") else ["leak_probe"]

# PostgreSQL and HAProxy fixtures (tests/servers/fixtures.py), for every test module.
pytest_plugins = ["tests.servers.fixtures"]

# --- Real database servers ------------------------------------------------------------------
# One of each per test session, on free loopback ports, files under pytest's tmp dir (kept
# for the last few runs, so a failed run's server.log can still be read). Installed with
# apt-get when missing (tests/packages.py); only tests that ask for one start it.


@pytest.fixture(scope="session")
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A real InfluxDB 1.6.7 for the whole session."""
    ensure_database_servers()
    server = start_influxdb(tmp_path_factory.mktemp("influxdb"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_influxdb(tmp_path: Path) -> Iterator[LocalServer]:
    """An InfluxDB 1.6.7 for this test alone, to freeze, kill and restart; stopped after it."""
    ensure_database_servers()
    server = start_influxdb(tmp_path / "own-influxdb")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def victoria_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A real VictoriaMetrics for the whole session; write with `?db=<unique>` to isolate."""
    ensure_database_servers()
    server = start_victoria_metrics(tmp_path_factory.mktemp("victoria-metrics"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def influx_db_name(influxdb: LocalServer) -> Iterator[str]:
    """A new, empty database on the `influxdb` server, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    create_database(influxdb.url, name)
    yield name
    if influxdb.running:
        drop_database(influxdb.url, name)


# --- No device token in any log (hostile input and hardening) -----------------------------
# For the whole session every log record, at DEBUG, goes through `LeakWatch` (see
# tests/token_leaks.py), and the logs of hub processes the tests start are read at the end.
# A token found in any of them fails the run. Tests that swap the root logger's handlers
# themselves (test_log_lines.py, to check its own formatter and redaction) are not watched
# while they do.

_leak_watch = LeakWatch()


def pytest_configure(config: pytest.Config) -> None:
    """Watch every log record; remember every token the registry issues."""
    UNIT_GUARD.install()
    # Its import probes for IPv6 by binding ::1 (caught when it fails, as in `unshare -n`):
    # done here, before any unit test, so that the guard does not count it against one.
    importlib.import_module("urllib3.util.connection")
    config.pluginmanager.register(LayerRecorder(), LayerRecorder.NAME)
    issue = registry_module.new_token
    if getattr(issue, "watched", False):
        return  # a nested in-process session (tests/test_architecture.py collects the suite)

    def new_token() -> str:
        token = issue()
        _leak_watch.token_issued(token)
        return token

    new_token.watched = True  # type: ignore[attr-defined]
    registry_module.new_token = new_token
    logging.getLogger().addHandler(_leak_watch)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before each test: DEBUG everywhere, websockets included, and the watch in place; a
    unit test that asks for a server fails here, before the server starts."""
    if item.get_closest_marker("unit") is not None:
        check_unit_item(item)
        UNIT_GUARD.arm(item.nodeid)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    logging.getLogger("websockets").setLevel(logging.NOTSET)
    if _leak_watch not in root.handlers:
        root.addHandler(_leak_watch)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the run if a token reached a log. Under pytest-xdist each runner checks its own
    records and files (it knows the tokens it issued) and hands what it found to the
    controller, whose exit status is the run's (`pytest_testnodedown`)."""
    config = session.config
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is not None and not _is_xdist_controller(config):
        _leak_watch.check_files(sorted(factory.getbasetemp().glob("**/hub-*.log")))
    output = getattr(config, "workeroutput", None)
    if output is not None:
        output["token_leaks"] = list(_leak_watch.leaks)
        output["log_records"] = _leak_watch.records
    if _leak_watch.leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """On the xdist controller: what a runner's leak watch found."""
    output = getattr(node, "workeroutput", {})
    _leak_watch.leaks.extend(output.get("token_leaks", []))
    _leak_watch.records += output.get("log_records", 0)


def _is_xdist_controller(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say what leaked, masked, or how many records were checked."""
    if _leak_watch.leaks:
        terminalreporter.section("device tokens in logs", red=True)
        for leak in _leak_watch.leaks[:20]:
            terminalreporter.line(leak)
        terminalreporter.line(f"{len(_leak_watch.leaks)} log lines hold a device token")
    else:
        terminalreporter.line(f"token leak watch: {_leak_watch.records} log records, no token")


# --- The unit layer: no server, no process, no network (tests/layers.py) -------------------
# From a unit test's setup to its teardown, inet sockets and new processes are refused (and a
# test fails for a refusal even if the code under test caught it); asking for a server
# fixture fails at setup. So `pytest -m unit` starts no server (the session fixtures above
# only run when a test asks for them) and passes under `unshare -n` (scripts/test.sh).


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail a unit test for anything the guard refused during its setup or call."""
    result = yield
    refusals = UNIT_GUARD.refusals if UNIT_GUARD.armed_for == item.nodeid else []
    if refusals:
        pytest.fail("; ".join(refusals[:3]), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """Disarm the guard once a unit test's fixtures are torn down."""
    try:
        return (yield)
    finally:
        UNIT_GUARD.disarm()
