"""`hub top`: the numbers (hub/ops/top.py, pure) and the screen, driving a real `hub serve`
with devices and reading the terminal through tmux (installed with apt-get if missing)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer, free_port
from hub.cli.top import read_presence
from hub.ops.top import (
    Scrape,
    build_frame,
    busiest_devices,
    histogram_quantile,
    increase,
    parse_scrape,
    silent_devices,
)
from hub.registry.sqlite import Presence
from tests.packages import install_missing
from tests.support import HubProcess, add_device, hub_settings

WAIT_S = 30.0

# --- The numbers, pure ----------------------------------------------------------------------

EXPOSITION = """\
# TYPE hub_connections gauge
hub_connections 3.0
# TYPE hub_readings_received counter
hub_readings_received_total {received}
# TYPE hub_readings_rejected counter
hub_readings_rejected_total{{reason="fields"}} {rejected}
hub_readings_rejected_total{{reason="name"}} 0.0
# TYPE hub_ack_latency_seconds histogram
hub_ack_latency_seconds_bucket{{le="0.01"}} {fast}
hub_ack_latency_seconds_bucket{{le="0.1"}} {slow}
hub_ack_latency_seconds_bucket{{le="+Inf"}} {slow}
hub_ack_latency_seconds_count {slow}
hub_ack_latency_seconds_sum 1.0
"""


def scrape(at: float, received: float, rejected: float, fast: float, slow: float) -> Scrape:
    """A scrape of a hub with these counts."""
    text = EXPOSITION.format(received=received, rejected=rejected, fast=fast, slow=slow)
    return parse_scrape(text, at)


def seen(device: str, online: bool, last_seen: float, stored: int) -> Presence:
    """A presence row."""
    return Presence(device, online, "127.0.0.1:1" if online else None, 0.0, last_seen, stored)


@pytest.mark.unit
def test_a_scrape_reads_samples_by_name_and_label() -> None:
    """Values by name and labels; a sample the hub does not export reads as 0."""
    parsed = scrape(0.0, 10, 2, 1, 1)
    assert parsed.value("hub_connections") == 3
    assert parsed.value("hub_readings_rejected_total", reason="fields") == 2
    assert parsed.by_label("hub_readings_rejected_total", "reason") == {"fields": 2, "name": 0}
    assert parsed.value("hub_nothing_total") == 0


@pytest.mark.unit
def test_a_counter_that_went_down_was_reset() -> None:
    """After a restart the increase is the new count."""
    assert increase(10, 15) == 5
    assert increase(10, 3) == 3


@pytest.mark.unit
def test_quantiles_interpolate_within_buckets_as_promql_does() -> None:
    """Half the observations under 10 ms, all under 100 ms: p50 = 10 ms, p99 inside the
    second bucket; none observed: no value."""
    buckets = {"0.01": 50.0, "0.1": 100.0, "+Inf": 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.01 + 0.09 * 49 / 50)
    assert histogram_quantile(0.5, {"0.01": 0.0, "+Inf": 0.0}) is None
    assert histogram_quantile(0.99, {"0.01": 0.0, "+Inf": 10.0}) == 0.01


@pytest.mark.unit
def test_rates_and_latency_are_over_the_interval() -> None:
    """Two scrapes 2 s apart: rates are the increases over 2 s, and the latency is that of
    the acks in between only (all fast), not since start."""
    before = scrape(100.0, received=1000, rejected=10, fast=0, slow=100)
    after = scrape(102.0, received=1400, rejected=14, fast=50, slow=150)
    frame = build_frame(before, after, {}, {}, 0.0)
    assert frame.interval_s == 2.0
    assert frame.connections == 3
    assert frame.received_per_s == 200.0
    assert frame.rejected_per_s == {"fields": 2.0, "name": 0.0}
    assert frame.rejected_total == {"fields": 14.0, "name": 0.0}
    assert frame.ack_latency.p99 is not None and frame.ack_latency.p99 <= 0.01


@pytest.mark.unit
def test_the_first_frame_has_totals_and_no_rates() -> None:
    """Without an earlier scrape: no rates, latency since the hub started."""
    frame = build_frame(None, scrape(5.0, 100, 1, 0, 100), {}, {}, 0.0)
    assert (frame.interval_s, frame.received_per_s) == (0.0, 0.0)
    assert frame.ack_latency.p50 is not None and frame.ack_latency.p50 > 0.01


@pytest.mark.unit
def test_busiest_devices_by_readings_stored_in_the_interval() -> None:
    """Busiest first; offline devices and devices that stored nothing meanwhile are out."""
    before = {"a": seen("a", True, 0, 100), "b": seen("b", True, 0, 0), "c": seen("c", True, 0, 5)}
    after = {
        "a": seen("a", True, 0, 110),
        "b": seen("b", True, 0, 50),
        "c": seen("c", True, 0, 5),
        "d": seen("d", False, 0, 500),
    }
    after["new"] = seen("new", True, 0, 8)  # first seen meanwhile: all it stored is new
    lines = busiest_devices(before, after, 2.0, top=10)
    assert [(d.device_id, d.readings_per_s) for d in lines] == [
        ("b", 25.0),
        ("a", 5.0),
        ("new", 4.0),
    ]
    assert [d.device_id for d in busiest_devices({}, after, 0.0, top=2)] == ["a", "b"]


@pytest.mark.unit
def test_silent_devices_quiet_longer_than_the_threshold_within_the_lookback() -> None:
    """Online but quiet, or gone: listed when last seen between the threshold and the
    lookback ago, the longest silent first."""
    now = 10_000.0
    rows = [
        seen("talking", True, now - 5, 1),
        seen("quiet", True, now - 120, 1),
        seen("gone", False, now - 600, 1),
        seen("long-gone", False, now - 90_000, 1),
    ]
    lines = silent_devices(rows, now, silent_after_s=60, lookback_s=3600, top=10)
    assert [(d.device_id, d.online, d.quiet_s) for d in lines] == [
        ("gone", False, 600.0),
        ("quiet", True, 120.0),
    ]


# --- Against a real hub -----------------------------------------------------------------------


@dataclass
class Traffic:
    """A running hub with a busy device streaming, a quiet one, a rejection and a refusal."""

    hub: HubProcess
    health_url: str
    state: Path

    def top_argv(self, *args: str) -> list[str]:
        """`hub top` against this hub."""
        return [
            sys.executable, "-m", "hub", "top", "--url", self.health_url,
            "--state-dir", str(self.state), "--silent-after", "1s", *args,
        ]  # fmt: skip


@pytest.fixture
async def traffic(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> AsyncIterator[Traffic]:
    """`busy-1` stores 10 readings a message without pause while the test runs; `quiet-1`
    stored one and is connected but silent; one reading was rejected (NaN) and one
    handshake refused (bad token)."""
    state = tmp_path / "state"
    busy = add_device(hub_settings(state, None), "busy-1")
    quiet = add_device(hub_settings(state, None), "quiet-1")
    health_port = free_port()
    hub = HubProcess(state, influxdb, influx_db_name, "--health-port", str(health_port))
    async with hub:
        with pytest.raises(InvalidStatus):
            await DeviceClient(hub.url, "hubt_not-a-token").connect()
        async with DeviceClient(hub.url, quiet) as still, DeviceClient(hub.url, busy) as client:
            reading = {"name": "environment", "fields": {"temperature": 21.0}}
            assert (await asyncio.wait_for(still.store([reading]), WAIT_S)).accepted == 1
            nan = {"name": "environment", "fields": {"temperature": float("nan")}}
            assert len((await asyncio.wait_for(client.store([nan]), WAIT_S)).rejected) == 1
            stop = asyncio.Event()

            async def stream() -> None:
                while not stop.is_set():
                    await asyncio.wait_for(client.store([reading] * 10), WAIT_S)

            streaming = asyncio.create_task(stream())
            try:
                yield Traffic(hub, f"http://127.0.0.1:{health_port}", state)
            finally:
                stop.set()
                await streaming
        assert await hub.stop() == 0


def number_after(label: str, screen: str) -> float:
    """The number under `label` in the traffic table (header line, then the values)."""
    lines = screen.splitlines()
    for index, line in enumerate(lines):
        if label in line and index + 1 < len(lines):
            headers = re.split(r"\s{2,}", line.strip())
            values = lines[index + 1].split()
            if len(headers) == len(values):
                return float(values[headers.index(label)])
    raise AssertionError(f"no {label!r} in:\n{screen}")


def check_screen(screen: str) -> None:
    """What a frame of this traffic must show."""
    assert "accepting devices" in screen and "InfluxDB ok" in screen, screen
    assert number_after("connections", screen) == 2
    assert number_after("readings in/s", screen) > 0
    assert number_after("stored/s", screen) > 0
    assert re.search(r"ack latency\s+p50 \d+\.\d ms\s+p99 \d+\.\d ms", screen), screen
    assert re.search(r"InfluxDB write\s+p50 \d+\.\d ms", screen), screen
    assert re.search(r"^fields\s+\S+\s+1\b", screen, re.M), screen  # rejected: 1 in total
    assert re.search(r"unauthorized\s+\S+\s+1\b", screen), screen  # refused: 1 in total
    busiest = screen.split("busiest devices", 1)[1]
    assert re.search(r"^busy-1\s+\d+\.\d\s+\d+", busiest, re.M), screen
    assert re.search(r"quiet-1\s+online, quiet\s+\d+s", screen), screen
    assert "spool" in screen and "dead letters    0 points" in screen


@pytest.mark.e2e
async def test_once_prints_one_frame_of_the_running_hub(traffic: Traffic) -> None:
    """`hub top --once` prints a frame with the hub's traffic and exits 0."""
    await asyncio.sleep(0)  # let the stream start
    result = await asyncio.to_thread(
        subprocess.run,
        traffic.top_argv("--once", "--interval", "1"),
        capture_output=True, text=True, timeout=WAIT_S, env={**os.environ, "COLUMNS": "120"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    check_screen(result.stdout)


@pytest.mark.e2e
def test_once_fails_clearly_when_the_hub_is_not_there(tmp_path: Path) -> None:
    """No hub at the URL: exit 2 with the reason."""
    url = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "hub", "top", "--once", "--url", url, "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=WAIT_S, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"cannot read {url}/metrics" in result.stderr


@pytest.mark.unit
def test_presence_from_a_missing_registry_is_empty_and_makes_none(tmp_path: Path) -> None:
    """A state directory without a registry: no devices, and no registry created there."""
    assert read_presence(hub_settings(tmp_path, None)) == {}
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tmux() -> Iterator[list[str]]:
    """tmux on a server of this test's own (`-L`), killed at the end."""
    install_missing({"tmux": "tmux"})
    command = ["tmux", "-L", f"hub-top-{uuid.uuid4().hex[:8]}"]
    try:
        yield command
    finally:
        subprocess.run([*command, "kill-server"], capture_output=True, check=False)


@pytest.mark.e2e
async def test_the_live_view_follows_the_hub_in_a_terminal(
    traffic: Traffic, tmux: list[str]
) -> None:
    """In a 120x50 terminal `hub top` redraws with the hub's traffic; Ctrl-C ends it."""
    argv = " ".join(traffic.top_argv("--interval", "0.5"))
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "top", "-x", "120", "-y", "50", argv + "; sleep 60"],
        check=True,
    )

    def screen() -> str:
        captured = subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True, text=True, check=True
        )
        return captured.stdout

    deadline = time.monotonic() + WAIT_S
    while True:
        shown = await asyncio.to_thread(screen)
        try:
            check_screen(shown)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    assert "rates over 0.5s" in shown or re.search(r"rates over 0\.\ds", shown), shown
    subprocess.run([*tmux, "send-keys", "-t", "top", "C-c"], check=True)
    # Back at the shell's `sleep`: the view left the alternate screen.
    deadline = time.monotonic() + WAIT_S
    while "readings in/s" in (shown := await asyncio.to_thread(screen)):
        assert time.monotonic() < deadline, shown
        await asyncio.sleep(0.1)


SUPERVISOR_EXPOSITION = """\
# TYPE hub_connections gauge
hub_connections{worker="1"} 3.0
hub_connections{worker="2"} 5.0
hub_connections{worker="10"} 0.0
# TYPE hub_worker_up gauge
hub_worker_up{worker="1"} 1.0
hub_worker_up{worker="2"} 1.0
hub_worker_up{worker="10"} 0.0
# TYPE hub_worker_restarts counter
hub_worker_restarts_total{worker="1"} 0.0
hub_worker_restarts_total{worker="2"} 0.0
hub_worker_restarts_total{worker="10"} 4.0
"""


@pytest.mark.unit
def test_a_hub_of_workers_is_one_hub_and_each_worker_a_line() -> None:
    """The supervisor's samples fold into the hub's totals; each worker keeps its state,
    in the order of their numbers; a hub of one process has no worker lines."""
    found = parse_scrape(SUPERVISOR_EXPOSITION, 1.0)
    assert found.value("hub_connections") == 8.0
    assert [(w.worker, w.up, w.connections, w.restarts) for w in found.workers] == [
        ("1", True, 3, 0),
        ("2", True, 5, 0),
        ("10", False, 0, 4),
    ]
    assert scrape(1.0, 0, 0, 0, 0).workers == ()


@pytest.mark.e2e
async def test_once_shows_each_worker_of_a_hub_of_workers(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Against `hub serve --workers 2`, a frame names both workers, up, with the devices
    each holds adding up to the hub's connections."""
    state = tmp_path / "state"
    tokens = [add_device(hub_settings(state, None), f"w-{n}") for n in range(4)]
    health_port = free_port()
    hub = HubProcess(
        state, influxdb, influx_db_name, "--health-port", str(health_port), "--workers", "2"
    )
    async with hub:
        clients = [DeviceClient(hub.url, token) for token in tokens]
        for client in clients:
            await asyncio.wait_for(client.connect(), WAIT_S)
        try:
            traffic = Traffic(hub, f"http://127.0.0.1:{health_port}", state)
            deadline = time.monotonic() + WAIT_S
            while True:
                result = await asyncio.to_thread(
                    subprocess.run, traffic.top_argv("--once"), capture_output=True, text=True,
                    timeout=WAIT_S, env={**os.environ, "COLUMNS": "120"},
                )  # fmt: skip
                assert result.returncode == 0, result.stderr
                held = [int(n) for n in re.findall(r"\b[12]: up, (\d+) conn", result.stdout)]
                if len(held) == 2 and sum(held) == len(tokens):
                    break
                assert time.monotonic() < deadline, result.stdout
                await asyncio.sleep(0.2)
            print(result.stdout)
            assert number_after("connections", result.stdout) == len(tokens)
        finally:
            for client in clients:
                await asyncio.wait_for(client.close(), WAIT_S)
    assert await hub.stop() == 0
