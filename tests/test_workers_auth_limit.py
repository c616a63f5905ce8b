"""The failed-handshake limit holds per host under `hub serve --workers 2`, not per worker:
a guesser's connections are spread over the workers by the kernel (SO_REUSEPORT), and each
worker allows its share of the burst, so the host lets through about the burst, not twice
it. The pure split, then a real supervisor and two workers, a real guesser (printed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from device_sim.client import DeviceClient, device_url
from device_sim.hub_process import provision
from device_sim.local_servers import LocalServer
from hub.gateway.handshakes import worker_share
from tests.workers_support import WorkersHub

BURST = 6
WORKERS = 2
GUESSES = 40
WAIT_S = 30.0
READING = [{"name": "env", "fields": {"t": 1.0}}]


@pytest.mark.unit
def test_each_worker_takes_its_share_of_the_burst_and_the_rate() -> None:
    """1/N of burst and rate per worker; one process keeps the whole; a burst too small to
    split leaves each worker one; 0 (off) stays off."""
    assert worker_share(10, 6.0, 1) == (10, 6.0)
    assert worker_share(10, 6.0, 2) == (5, 3.0)
    assert worker_share(10, 6.0, 3) == (3, 2.0)  # 9 in all: never more than the setting
    assert worker_share(1, 6.0, 4) == (1, 1.5)
    assert worker_share(0, 6.0, 4) == (0, 6.0)


async def answer_to_wrong_token(url: str) -> int:
    """The HTTP status a handshake with a wrong token gets (fails the test on an upgrade)."""
    try:
        connection = await asyncio.wait_for(
            connect(device_url(url, token="not-a-real-token"), open_timeout=WAIT_S), WAIT_S
        )
    except InvalidStatus as refused:
        return refused.response.status_code
    await connection.close()
    pytest.fail("a wrong token was let in")


@pytest.mark.e2e
async def test_a_guesser_gets_the_hosts_burst_not_one_per_worker(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """40 wrong tokens, each on a new connection, from one address to two workers with
    `auth_failures_burst` 6: at most 6 + 2 are answered 401 (each worker's 3, and the one
    that blocks it) before every worker says 429; with each worker allowing the whole burst
    that was up to 14. The address's good token is still let in."""
    config = tmp_path / "hub.toml"
    config.write_text(
        f"auth_failures_burst = {BURST}\nauth_failures_per_min = 0.01\nauth_block_s = 300\n"
    )
    hub = WorkersHub(tmp_path / "state", influxdb, influx_db_name, WORKERS, "--config", str(config))
    (good,) = await asyncio.to_thread(provision, hub.state_dir, 1, "good-")
    await hub.start()
    try:
        await hub.until("every worker listening", hub.all_listening)
        answers = [await answer_to_wrong_token(hub.url) for _ in range(GUESSES)]
        for _ in range(2 * WORKERS):  # the blocked address's good token: let in anywhere
            async with DeviceClient(hub.url, good.token) as device:
                assert (await asyncio.wait_for(device.store(READING), WAIT_S)).accepted == 1
    finally:
        assert await hub.stop() == 0, hub.log
    let_through = answers.count(401)
    print(
        f"failed-handshake limit over {WORKERS} workers, burst {BURST}: {let_through} of "
        f"{GUESSES} guesses answered 401 before the block (one process: {BURST + 1}; "
        f"each worker with the whole burst: up to {WORKERS * (BURST + 1)})"
    )
    assert set(answers) == {401, 429}, answers
    assert let_through <= BURST + WORKERS, answers
    assert answers[-5:] == [429] * 5, answers  # blocked on every worker by then
