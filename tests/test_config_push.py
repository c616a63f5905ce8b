"""Config push, labels, revocation and presence, end to end against real processes.

`hub serve` runs as a subprocess on a real InfluxDB; operator commands are `python -m hub`
subprocesses started with `asyncio.create_subprocess_exec`, so the devices, which are
`DeviceClient`s on the test's event loop, keep running while a command works. Waits are
bounded (a hang fails the test), never timed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from device_sim.client import ConfigHandler, DeviceClient, pack
from device_sim.local_servers import LocalServer
from schemas.codes import CloseCode
from schemas.messages import Config
from tests.support import HubProcess, points

pytestmark = pytest.mark.e2e

T = TypeVar("T")

CLI_TIMEOUT_S = 30.0
WAIT_S = 5.0
"""Bound for what the hub does within about a second: long enough not to flake, short
enough that a hang fails fast."""
POLL_S = 0.05
CONNECTION_MEASUREMENT = "hub_device_connection"


@dataclass(frozen=True)
class Run:
    """A finished operator command."""

    returncode: int
    stdout: str
    stderr: str


async def run_cli(state_dir: Path, *args: str) -> Run:
    """Run `python -m hub ARGS --state-dir STATE_DIR` without blocking the event loop."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub",
        *args,
        "--state-dir",
        str(state_dir),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(
            f"`hub {' '.join(args)}` did not finish in {CLI_TIMEOUT_S} s"
        ) from None
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


@pytest.fixture
async def hub(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> AsyncIterator[HubProcess]:
    """A running `hub serve` writing to a fresh database; must exit 0 on SIGTERM at the end."""
    process = HubProcess(tmp_path / "state", influxdb, influx_db_name)
    await process.start()
    try:
        yield process
    finally:
        returncode = await process.stop()
    assert returncode == 0, f"hub exited {returncode}:\n{process.log}"


async def cli(hub: HubProcess, *args: str) -> Run:
    """An operator command on the hub's state dir."""
    return await run_cli(hub.state_dir, *args)


# --- Helpers -------------------------------------------------------------------------------------


async def add_device(hub: HubProcess, device_id: str, *options: str) -> str:
    """`hub token add DEVICE [OPTIONS]`; returns the token."""
    result = await cli(hub, "token", "add", device_id, *options)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


async def config_get(hub: HubProcess, device_id: str) -> dict[str, Any]:
    """`hub config get DEVICE --json`."""
    result = await cli(hub, "config", "get", device_id, "--json")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


async def devices(hub: HubProcess) -> dict[str, dict[str, Any]]:
    """`hub devices --json`, by device id."""
    result = await cli(hub, "devices", "--json")
    assert result.returncode == 0, result.stderr
    return {row["device"]: row for row in json.loads(result.stdout)}


@asynccontextmanager
async def device(
    hub: HubProcess, token: str, on_config: ConfigHandler | None = None
) -> AsyncIterator[DeviceClient]:
    """A connected device, closed on exit."""
    client = DeviceClient(hub.url, token, on_config=on_config)
    await asyncio.wait_for(client.connect(), WAIT_S)
    try:
        yield client
    finally:
        await asyncio.wait_for(client.close(), WAIT_S)


def received(client: DeviceClient) -> list[tuple[int, dict[str, Any]]]:
    """The configs a device was sent, as (version, config)."""
    return [(c.version, c.config) for c in client.configs]


def address(client: DeviceClient) -> str:
    """The device's end of its connection, as the hub reports it."""
    host, port = client.connection.local_address[:2]
    return f"{host}:{port}"


async def round_trip(client: DeviceClient) -> None:
    """Store one reading and wait for its ack.

    The hub handles a connection's frames in order and sends a pending config before it
    reads any: once this ack is in, every earlier frame was handled both ways.
    """
    ack = await asyncio.wait_for(client.store([{"name": "probe", "fields": {"n": 1.0}}]), WAIT_S)
    assert ack.accepted == 1


async def eventually(
    probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], what: str
) -> T:
    """Probe until `accept` says yes; fail after WAIT_S with the last value seen."""
    deadline = time.monotonic() + WAIT_S
    while True:
        value = await probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {value!r} after {WAIT_S} s")
        await asyncio.sleep(POLL_S)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait until `condition()` holds; fail after WAIT_S."""

    async def probe() -> bool:
        return condition()

    await eventually(probe, bool, what)


async def refuse_short_intervals(config: Config) -> str | None:
    """A device that will not sample faster than once a second."""
    return "interval below 1 s" if config.config.get("interval_s", 1) < 1 else None


# --- Live push and acks --------------------------------------------------------------------------


async def test_connected_device_receives_a_change_promptly(hub: HubProcess) -> None:
    """A connected device is sent the new config shortly after the CLI commits it."""
    token = await add_device(hub, "dev-1")
    async with device(hub, token) as client:
        result = await cli(hub, "config", "set", "dev-1", "interval_s=5", "unit=C")
        assert result.returncode == 0, result.stderr
        await until(lambda: bool(client.configs), "config pushed to the device")
        assert received(client) == [(1, {"interval_s": 5, "unit": "C"})]


async def test_live_device_acks_and_config_get_shows_it(hub: HubProcess) -> None:
    """`config set --wait` ends 0 once the device applied it, and `config get` says so."""
    token = await add_device(hub, "dev-1")
    async with device(hub, token) as client:
        result = await cli(hub, "config", "set", "dev-1", "interval_s=5", "--wait", "10")
        assert result.returncode == 0, result.stderr
        assert "applied by all 1 device(s)" in result.stderr
        assert received(client) == [(1, {"interval_s": 5})]
        report = await config_get(hub, "dev-1")
    assert report["desired"] == {"interval_s": 5}
    assert (report["desired_version"], report["acknowledged_version"]) == (1, 1)
    assert (report["pending"], report["last_answer"], report["last_error"]) == (False, "ok", None)


async def test_file_replaces_the_whole_config_on_the_device(
    hub: HubProcess, tmp_path: Path
) -> None:
    """`config set --file` sends exactly the file's object, dropping keys set before."""
    new_config = tmp_path / "config.json"
    new_config.write_text(json.dumps({"mode": "eco", "interval_s": 30}))
    token = await add_device(hub, "dev-1")
    async with device(hub, token) as client:
        first = await cli(hub, "config", "set", "dev-1", "unit=C", "--wait", "10")
        assert first.returncode == 0, first.stderr
        second = await cli(hub, "config", "set", "dev-1", "--file", str(new_config), "--wait", "10")
        assert second.returncode == 0, second.stderr
    assert received(client) == [(1, {"unit": "C"}), (2, {"mode": "eco", "interval_s": 30})]


async def test_refusal_fails_wait_naming_only_the_refusing_device(hub: HubProcess) -> None:
    """`--wait` exits non-zero and names the device that refused, with its reason."""
    good = await add_device(hub, "good-1", "--label", "site=lab")
    bad = await add_device(hub, "bad-1", "--label", "site=lab")
    async with (
        device(hub, good),
        device(hub, bad, on_config=refuse_short_intervals),
    ):
        result = await cli(
            hub, "config", "set", "--label", "site=lab", "interval_s=0.5", "--wait", "10"
        )
    assert result.returncode == 1
    assert "refused by bad-1: interval below 1 s" in result.stderr
    assert "good-1" not in result.stderr


async def test_refusal_reaches_config_get(hub: HubProcess) -> None:
    """A device's refusal and its reason show in `config get`, JSON and text."""
    token = await add_device(hub, "dev-1")
    async with device(hub, token, on_config=refuse_short_intervals):
        result = await cli(hub, "config", "set", "dev-1", "interval_s=0.5", "--wait", "10")
        assert result.returncode == 1
    report = await config_get(hub, "dev-1")
    assert (report["acknowledged_version"], report["pending"]) == (1, False)
    assert (report["last_answer"], report["last_error"]) == ("refused", "interval below 1 s")
    text = await cli(hub, "config", "get", "dev-1")
    assert text.returncode == 0, text.stderr
    assert "last_error:" in text.stdout and "interval below 1 s" in text.stdout


async def test_wait_names_a_device_that_never_answers(hub: HubProcess) -> None:
    """`--wait` on a device that is not connected ends non-zero naming it."""
    await add_device(hub, "dev-1")
    result = await cli(hub, "config", "set", "dev-1", "x=1", "--wait", "1")
    assert result.returncode == 1
    assert "no answer within 1 s from: dev-1" in result.stderr


async def test_stale_config_ack_changes_nothing(hub: HubProcess) -> None:
    """An ack of an older version, sent after the latest was answered, is ignored."""
    token = await add_device(hub, "dev-1")
    async with device(hub, token) as client:
        for value in ("1", "2"):
            result = await cli(hub, "config", "set", "dev-1", f"x={value}", "--wait", "10")
            assert result.returncode == 0, result.stderr
        before = await config_get(hub, "dev-1")
        stale = {"type": "config_ack", "version": 1, "ok": False, "error": "late"}
        await client.send_raw(pack(stale))
        await round_trip(client)
        after = await config_get(hub, "dev-1")
    assert before["acknowledged_version"] == 2
    assert after == before


async def test_duplicate_config_ack_changes_nothing(hub: HubProcess) -> None:
    """A second answer to the already answered version is ignored."""
    token = await add_device(hub, "dev-1")
    async with device(hub, token) as client:
        result = await cli(hub, "config", "set", "dev-1", "x=1", "--wait", "10")
        assert result.returncode == 0, result.stderr
        before = await config_get(hub, "dev-1")
        duplicate = {"type": "config_ack", "version": 1, "ok": False, "error": "changed my mind"}
        await client.send_raw(pack(duplicate))
        await round_trip(client)
        after = await config_get(hub, "dev-1")
    assert (before["acknowledged_version"], before["last_answer"]) == (1, "ok")
    assert after == before


async def test_config_devices_cannot_receive_is_refused(tmp_path: Path) -> None:
    """Values msgpack or JSON cannot carry (2**64, NaN) fail `config set` cleanly, version kept."""
    state = tmp_path / "state"
    assert (await run_cli(state, "token", "add", "dev-1")).returncode == 0
    for value in (str(2**64), "NaN"):
        result = await run_cli(state, "config", "set", "dev-1", f"x={value}")
        assert result.returncode == 2, result.stderr
        assert "error: config of 'dev-1' cannot be sent" in result.stderr
        assert "Traceback" not in result.stderr
    report = json.loads((await run_cli(state, "config", "get", "dev-1", "--json")).stdout)
    assert report["desired_version"] == 0


# --- Offline devices and restarts ----------------------------------------------------------------


async def test_offline_device_gets_only_the_latest_version_on_connect(hub: HubProcess) -> None:
    """Changes made while a device is away arrive as one config: the latest version."""
    token = await add_device(hub, "dev-1")
    witness = await add_device(hub, "witness")
    async with device(hub, witness):
        for step in (1, 2, 3):
            result = await cli(hub, "config", "set", "dev-1", f"step={step}")
            assert result.returncode == 0, result.stderr
            assert result.stdout == f"dev-1\tversion {step}\n"
        # Once the hub pushed this later change, it has seen dev-1's changes too: only the
        # push on connect can deliver them now.
        later = await cli(hub, "config", "set", "witness", "x=1", "--wait", "10")
        assert later.returncode == 0, later.stderr
    async with device(hub, token) as client:
        await round_trip(client)
        assert received(client) == [(3, {"step": 3})]


async def test_answered_config_is_not_sent_again_on_reconnect(hub: HubProcess) -> None:
    """A device that already answered the latest version is not sent it again."""
    token = await add_device(hub, "dev-1")
    async with device(hub, token) as client:
        result = await cli(hub, "config", "set", "dev-1", "x=1", "--wait", "10")
        assert result.returncode == 0, result.stderr
        assert received(client) == [(1, {"x": 1})]
    async with device(hub, token) as again:
        await round_trip(again)
        assert received(again) == []


async def test_versions_keep_growing_across_hub_restarts(hub: HubProcess) -> None:
    """After a hub restart on the same state dir, the next change gets the next version."""
    token = await add_device(hub, "dev-1")
    async with device(hub, token) as client:
        first = await cli(hub, "config", "set", "dev-1", "x=1", "--wait", "10")
        assert first.returncode == 0, first.stderr
        assert await hub.stop() == 0, hub.log
    await hub.start()
    async with device(hub, token) as client:
        await round_trip(client)
        second = await cli(hub, "config", "set", "dev-1", "x=2", "--wait", "10")
        assert second.returncode == 0, second.stderr
        assert second.stdout == "dev-1\tversion 2\n"
        assert received(client) == [(2, {"x": 2})]


# --- Fleet selection ------------------------------------------------------------------------------


async def test_label_push_reaches_exactly_the_labelled_devices(hub: HubProcess) -> None:
    """`--label room=kitchen` reaches the devices labelled so, by `token add` or `device label`."""
    kitchen_1 = await add_device(hub, "kitchen-1", "--label", "room=kitchen")
    hall_1 = await add_device(hub, "hall-1", "--label", "room=hall")
    kitchen_2 = await add_device(hub, "kitchen-2")
    labelled = await cli(hub, "device", "label", "kitchen-2", "room=kitchen")
    assert (labelled.returncode, labelled.stdout) == (0, "room=kitchen\n"), labelled.stderr
    async with (
        device(hub, kitchen_1) as k1,
        device(hub, hall_1) as h1,
        device(hub, kitchen_2) as k2,
    ):
        result = await cli(
            hub, "config", "set", "--label", "room=kitchen", "unit=C", "--wait", "10"
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "kitchen-1\tversion 1\nkitchen-2\tversion 1\n"
        assert received(k1) == received(k2) == [(1, {"unit": "C"})]
        await round_trip(h1)
        assert received(h1) == []
    assert (await config_get(hub, "hall-1"))["desired_version"] == 0


async def test_all_push_reaches_every_active_device_only(hub: HubProcess) -> None:
    """`--all` reaches every active device and leaves a revoked one alone."""
    token_a = await add_device(hub, "a")
    token_b = await add_device(hub, "b")
    await add_device(hub, "c")
    assert (await cli(hub, "token", "revoke", "c")).returncode == 0
    async with device(hub, token_a) as a, device(hub, token_b) as b:
        result = await cli(hub, "config", "set", "--all", "unit=C", "--wait", "10")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "a\tversion 1\nb\tversion 1\n"
        assert received(a) == received(b) == [(1, {"unit": "C"})]
    assert (await config_get(hub, "c"))["desired_version"] == 0


# --- Revocation ----------------------------------------------------------------------------------


async def test_revocation_closes_a_live_connection_with_4001(hub: HubProcess) -> None:
    """`hub token revoke` closes the device's open connection with code 4001."""
    token = await add_device(hub, "dev-1")
    async with device(hub, token) as client:
        result = await cli(hub, "token", "revoke", "dev-1")
        assert result.returncode == 0, result.stderr
        code, _ = await asyncio.wait_for(client.wait_closed(), WAIT_S)
    assert code == CloseCode.REVOKED


# --- Presence ------------------------------------------------------------------------------------


async def test_devices_json_matches_the_live_connection(hub: HubProcess) -> None:
    """`hub devices --json` shows who is online, from where, what was stored, and config state."""
    token = await add_device(hub, "a")
    await add_device(hub, "b")
    async with device(hub, token) as client:
        readings = [{"name": "env", "fields": {"t": float(n)}} for n in range(3)]
        ack = await asyncio.wait_for(client.store(readings), WAIT_S)
        assert ack.accepted == 3
        result = await cli(hub, "config", "set", "a", "x=1", "--wait", "10")
        assert result.returncode == 0, result.stderr
        rows = await eventually(
            lambda: devices(hub),
            lambda rows: rows["a"]["online"] and rows["a"]["readings_stored"] == 3,
            "device a online with 3 readings stored",
        )
        expected_address = address(client)
    a, b = rows["a"], rows["b"]
    assert (a["status"], a["remote_address"]) == ("active", expected_address)
    assert (a["config_desired"], a["config_acknowledged"]) == (1, 1)
    assert a["connected_since"] is not None and a["last_seen"] is not None
    assert (b["online"], b["remote_address"], b["readings_stored"]) == (False, None, 0)
    assert (b["config_desired"], b["config_acknowledged"], b["last_seen"]) == (0, None, None)


async def test_devices_json_shows_a_closed_connection_offline(hub: HubProcess) -> None:
    """After a device disconnects it is offline, without an address, its count kept."""
    token = await add_device(hub, "dev-1")
    async with device(hub, token) as client:
        await round_trip(client)
        await round_trip(client)
    rows = await eventually(
        lambda: devices(hub),
        lambda rows: rows["dev-1"]["readings_stored"] == 2 and not rows["dev-1"]["online"],
        "dev-1 offline with 2 readings stored",
    )
    row = rows["dev-1"]
    assert (row["remote_address"], row["connected_since"]) == (None, None)
    assert row["last_seen"] is not None


async def test_devices_table_matches_the_live_connection(hub: HubProcess) -> None:
    """The `hub devices` table shows online, address, readings stored and config versions."""
    token = await add_device(hub, "a")
    await add_device(hub, "b")
    async with device(hub, token) as client:
        ack = await asyncio.wait_for(client.store([{"name": "env", "fields": {"t": 1.0}}]), WAIT_S)
        assert ack.accepted == 1
        result = await cli(hub, "config", "set", "a", "x=1", "--wait", "10")
        assert result.returncode == 0, result.stderr
        await eventually(
            lambda: devices(hub),
            lambda rows: rows["a"]["online"] and rows["a"]["readings_stored"] == 1,
            "device a online with 1 reading stored",
        )
        table = await cli(hub, "devices")
        expected_address = address(client)
    assert table.returncode == 0, table.stderr
    lines = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert lines["a"][:3] == ["a", "yes", expected_address]
    assert lines["a"][-2:] == ["1", "1/1"]
    assert lines["b"] == ["b", "no", "-", "-", "-", "0", "0/0"]


async def test_connection_events_are_points_with_a_disconnect_reason(
    hub: HubProcess, influxdb: LocalServer, influx_db_name: str
) -> None:
    """Connecting and disconnecting write `hub_device_connection` points, with the reason."""
    token = await add_device(hub, "dev-1")
    async with device(hub, token) as client:
        expected_address = address(client)
    rows = await eventually(
        lambda: asyncio.to_thread(points, influxdb, influx_db_name, CONNECTION_MEASUREMENT),
        lambda rows: len(rows) == 2,
        "a connect and a disconnect point",
    )
    connected, disconnected = sorted(rows, key=lambda row: int(row["time"]))
    assert (connected["device"], connected["event"]) == ("dev-1", "connected")
    assert (connected["online"], connected["remote"]) == (True, expected_address)
    assert (disconnected["device"], disconnected["event"]) == ("dev-1", "disconnected")
    assert disconnected["online"] is False
    assert disconnected["reason"].startswith("1000")


async def test_connection_events_name_the_hub_even_with_line_protocol_characters(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """The `hub` tag of both events is the hub's node id, which is operator-set text: commas,
    equals signs, quotes and backslashes are escaped, and read back as they were set."""
    node_id = 'site=north,rack"2\\a'
    process = HubProcess(tmp_path / "state", influxdb, influx_db_name, env={"HUB_NODE_ID": node_id})
    await process.start()
    try:
        token = await add_device(process, "dev-1")
        async with device(process, token):
            pass
        rows = await eventually(
            lambda: asyncio.to_thread(points, influxdb, influx_db_name, CONNECTION_MEASUREMENT),
            lambda rows: len(rows) == 2,
            "a connect and a disconnect point",
        )
    finally:
        assert await process.stop() == 0, process.log
    assert sorted((row["event"], row["hub"], row["device"]) for row in rows) == [
        ("connected", node_id, "dev-1"),
        ("disconnected", node_id, "dev-1"),
    ]


async def test_revocation_is_the_recorded_disconnect_reason(
    hub: HubProcess, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A connection closed by revocation is charted with 4001 as its disconnect reason."""
    token = await add_device(hub, "dev-1")
    async with device(hub, token) as client:
        assert (await cli(hub, "token", "revoke", "dev-1")).returncode == 0
        await asyncio.wait_for(client.wait_closed(), WAIT_S)
    rows = await eventually(
        lambda: asyncio.to_thread(points, influxdb, influx_db_name, CONNECTION_MEASUREMENT),
        lambda rows: any(row["event"] == "disconnected" for row in rows),
        "a disconnect point",
    )
    (disconnected,) = [row for row in rows if row["event"] == "disconnected"]
    assert disconnected["reason"].startswith("4001")
