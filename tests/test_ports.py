"""Ports for the suite's parallel runners (tests/ports.py) and `free_port` within a range."""

from __future__ import annotations

import itertools
import os
import socket

import pytest

from device_sim import local_servers
from device_sim.local_servers import PORTS_ENV, ServerError, free_port
from tests.ports import (
    FIRST_PORT,
    PORTS_PER_RUNNER,
    ephemeral_low,
    runner_index,
    runner_port_range,
)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("worker", "index"), [(None, 0), ("", 0), ("gw0", 0), ("gw3", 3), ("master", 0), ("gwx", 0)]
)
def test_runner_index(worker: str | None, index: int) -> None:
    assert runner_index(worker) == index


@pytest.mark.unit
def test_runners_have_disjoint_ranges_below_the_ephemeral_ones() -> None:
    ranges = [runner_port_range(index, 32_768) for index in range(10)]
    assert ranges[0] == (FIRST_PORT, FIRST_PORT + PORTS_PER_RUNNER - 1)
    for (_, high), (low, _) in itertools.pairwise(ranges):
        assert high < low
    assert ranges[-1][1] < 32_768
    with pytest.raises(RuntimeError, match="fewer runners"):
        runner_port_range(10, 32_768)


@pytest.mark.integration
def test_this_runner_takes_its_ports_from_its_own_range() -> None:
    low, high = runner_port_range(runner_index(os.environ.get("PYTEST_XDIST_WORKER")), 32_768)
    assert os.environ[PORTS_ENV] == f"{low}-{high}"
    assert high < ephemeral_low()
    ports = [free_port() for _ in range(5)]
    assert all(low <= port <= high for port in ports)
    assert len(set(ports)) == 5


@pytest.mark.integration
def test_free_port_passes_over_a_bound_port_and_wraps(monkeypatch: pytest.MonkeyPatch) -> None:
    # Three ports just below every runner's range: no test's server is on them.
    first, high = FIRST_PORT - 3, FIRST_PORT - 1
    monkeypatch.setenv(PORTS_ENV, f"{first}-{high}")
    monkeypatch.setattr(local_servers, "_next_port", {(first, high): first})
    with socket.socket() as held:
        held.bind(("127.0.0.1", first + 1))
        held.listen()
        assert [free_port(), free_port(), free_port()] == [first, high, first]
        with socket.socket() as also:
            also.bind(("127.0.0.1", first))
            with socket.socket() as third:
                third.bind(("127.0.0.1", high))
                with pytest.raises(ServerError, match="no free port"):
                    free_port()


@pytest.mark.unit
@pytest.mark.parametrize("text", ["12000", "a-b", "20000-10000", "0-10", "1-70000"])
def test_a_malformed_range_is_refused(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv(PORTS_ENV, text)
    with pytest.raises(ServerError, match=PORTS_ENV):
        free_port()
