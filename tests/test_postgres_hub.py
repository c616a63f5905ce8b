"""`hub serve` and the operator's commands on a PostgreSQL registry, as real processes.

The hub runs with `HUB_REGISTRY_URL` on a fresh database of the suite's PostgreSQL 15;
commands get `--registry-url` or the variable. Devices are `DeviceClient`s on the test's
loop, so they keep running while a command works. Waits are bounded, never timed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer, free_port
from device_sim.servers.postgres import PostgresDatabase, PostgresServer
from schemas.codes import CloseCode
from tests.support import HubProcess, points

pytestmark = pytest.mark.e2e

T = TypeVar("T")
CLI_TIMEOUT_S = 30.0
WAIT_S = 10.0
POLL_S = 0.05


@dataclass(frozen=True)
class Run:
    """A finished command."""

    returncode: int
    stdout: str
    stderr: str


async def hub_command(*args: str, env: dict[str, str] | None = None) -> Run:
    """`python -m hub ARGS` with no HUB_ variable but those in `env`, off the event loop."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub",
        *args,
        env={**clean, **(env or {})},
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


async def eventually(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool],
    what: str,
    timeout_s: float = WAIT_S,
) -> T:
    """Probe until `accept` says yes; fail after `timeout_s` with the last value seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {value!r} after {timeout_s} s")
        await asyncio.sleep(POLL_S)


@pytest.fixture
async def pg_hub(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str, postgres_db: PostgresDatabase
) -> AsyncIterator[HubProcess]:
    """`hub serve` on a fresh PostgreSQL registry; must exit 0 on SIGTERM at the end."""
    env = {"HUB_REGISTRY_URL": postgres_db.dsn, "HUB_NODE_ID": "hub-e2e"}
    process = HubProcess(tmp_path / "state", influxdb, influx_db_name, env=env)
    await process.start()
    try:
        yield process
    finally:
        returncode = await process.stop()
    assert returncode == 0, f"hub exited {returncode}:\n{process.log}"


async def test_a_device_streams_gets_its_config_and_is_revoked_on_postgres(
    pg_hub: HubProcess,
    postgres_db: PostgresDatabase,
    influxdb: LocalServer,
    influx_db_name: str,
) -> None:
    """On PostgreSQL, end to end: a device registered by `hub token add` streams and is
    acked, receives `hub config set`, shows in `hub devices --json`, and is closed with
    4001 by `hub token revoke`; nothing goes to a SQLite file."""
    url = ["--registry-url", postgres_db.dsn]
    added = await hub_command("token", "add", "dev-1", "--label", "site=north", *url)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    env = {"HUB_REGISTRY_URL": postgres_db.dsn}

    async def devices() -> dict[str, dict[str, Any]]:
        listed = await hub_command("devices", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        return {row["device"]: row for row in json.loads(listed.stdout)}

    client = DeviceClient(pg_hub.url, token)
    await asyncio.wait_for(client.connect(), WAIT_S)
    try:
        readings = [{"name": "env", "fields": {"t": float(n)}} for n in range(3)]
        ack = await asyncio.wait_for(client.store(readings), WAIT_S)
        assert (ack.accepted, ack.rejected) == (3, [])
        assert sorted(row["t"] for row in points(influxdb, influx_db_name, "env")) == [0, 1, 2]

        pushed = await hub_command(
            "config", "set", "--label", "site=north", "interval_s=5", "--wait", "10", env=env
        )
        assert pushed.returncode == 0, pushed.stderr
        assert pushed.stdout == "dev-1\tversion 1\n"
        assert [(c.version, c.config) for c in client.configs] == [(1, {"interval_s": 5})]

        rows = await eventually(
            devices,
            lambda rows: rows["dev-1"]["online"] and rows["dev-1"]["readings_stored"] == 3,
            "dev-1 online with 3 readings stored",
        )
        host, port = client.connection.local_address[:2]
        row = rows["dev-1"]
        assert row["remote_address"] == f"{host}:{port}"
        assert row["hub"] == "hub-e2e"
        listed = await hub_command("nodes", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        (node,) = json.loads(listed.stdout)
        assert (node["node"], node["address"], node["live"]) == (
            "hub-e2e",
            f"127.0.0.1:{pg_hub.port}",
            True,
        )
        assert node["live_connections"] == 1 and node["last_heartbeat"] >= node["started_at"]
        table = await hub_command("nodes", env=env)
        assert table.stdout.splitlines()[1].split()[0] == "hub-e2e", table.stdout
        assert (row["config_desired"], row["config_acknowledged"]) == (1, 1)
        assert row["labels"] == {"site": "north"}

        revoked = await hub_command("token", "revoke", "dev-1", *url)
        assert revoked.returncode == 0, revoked.stderr
        code, _ = await asyncio.wait_for(client.wait_closed(), WAIT_S)
        assert code == CloseCode.REVOKED
    finally:
        await asyncio.wait_for(client.close(), WAIT_S)
    rows = await eventually(devices, lambda rows: not rows["dev-1"]["online"], "dev-1 offline")
    assert (rows["dev-1"]["status"], rows["dev-1"]["hub"]) == ("revoked", None)
    assert not (pg_hub.state_dir / "registry.sqlite3").exists()


async def test_operator_commands_on_postgres(postgres_db: PostgresDatabase) -> None:
    """Every operator command works on PostgreSQL (flag or variable), errors exit 2 with
    a message, and `check-config` shows the URL with its password masked."""
    env = {"HUB_REGISTRY_URL": postgres_db.dsn}
    bulk = await hub_command("token", "add", "--count", "3", "--prefix", "s-", env=env)
    assert bulk.returncode == 0, bulk.stderr
    assert [line.split(",")[0] for line in bulk.stdout.splitlines()] == [
        "device_id",
        "s-00001",
        "s-00002",
        "s-00003",
    ]
    assert "registered 3 devices" in bulk.stderr
    listed = await hub_command("token", "list", env=env)
    assert listed.returncode == 0 and listed.stdout.count(" active ") == 3
    rotated = await hub_command("token", "rotate", "s-00001", "--grace", "1h", env=env)
    assert rotated.returncode == 0 and rotated.stdout.startswith("hubt_"), rotated.stderr
    labelled = await hub_command("device", "label", "s-00002", "site=south", env=env)
    assert (labelled.returncode, labelled.stdout) == (0, "site=south\n")
    pushed = await hub_command("config", "set", "--all", "x=1", env=env)
    assert pushed.stdout.count("version 1") == 3, pushed.stderr
    shown = await hub_command("config", "get", "s-00003", "--json", env=env)
    assert json.loads(shown.stdout)["desired"] == {"x": 1}
    duplicate = await hub_command("token", "add", "s-00001", env=env)
    assert duplicate.returncode == 2
    assert "already exists" in duplicate.stderr and "Traceback" not in duplicate.stderr
    unknown = await hub_command("token", "revoke", "ghost", env=env)
    assert unknown.returncode == 2 and "no device 'ghost'" in unknown.stderr

    with_password = postgres_db.dsn.replace("@", ":hunter2-secret@", 1)
    checked = await hub_command("check-config", "--registry-url", with_password)
    assert checked.returncode == 0, checked.stderr
    assert "hunter2-secret" not in checked.stdout + checked.stderr
    assert "registry_url = " in checked.stdout and "~/.pgpass" in checked.stderr
    bad = await hub_command("token", "list", "--registry-url", "mysql://u@h/db")
    assert bad.returncode == 2 and "registry_url" in bad.stderr


async def test_hub_serve_without_its_database_exits_with_a_clear_error(tmp_path: Path) -> None:
    """PostgreSQL not there at start: `hub serve` exits 2 with one clear line, no
    traceback, no password."""
    url = f"postgresql://hub:pw-do-not-show@127.0.0.1:{free_port()}/hub"
    started = await hub_command(
        "serve", "--state-dir", str(tmp_path / "state"), "--port", str(free_port()),
        "--health-port", "0", "--registry-url", url,
    )  # fmt: skip
    assert started.returncode == 2, started.stderr
    output = started.stdout + started.stderr
    assert "error: cannot use the PostgreSQL registry at postgresql://hub:***@127.0.0.1" in output
    assert "Traceback" not in output and "pw-do-not-show" not in output


async def test_nodes_on_sqlite_says_there_are_none(tmp_path: Path) -> None:
    """On the SQLite registry `hub nodes` lists nobody and says why; `hub devices --json`
    names no hub."""
    state = ["--state-dir", str(tmp_path / "state")]
    assert (await hub_command("token", "add", "a", *state)).returncode == 0
    table = await hub_command("nodes", *state)
    assert (table.returncode, table.stdout) == (0, "")
    assert "SQLite" in table.stderr
    listed = await hub_command("nodes", "--json", *state)
    assert json.loads(listed.stdout) == []
    (row,) = json.loads((await hub_command("devices", "--json", *state)).stdout)
    assert (row["device"], row["hub"]) == ("a", None)


async def test_devices_keep_streaming_while_postgres_is_down_and_pushes_resume(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str, own_postgres: PostgresServer
) -> None:
    """PostgreSQL killed under a running hub: its device keeps being acked (ingest never
    waits on the registry); once PostgreSQL is back, a push reaches the device, and the
    listener's loss was logged once."""
    role, name = own_postgres.new_database()
    dsn = own_postgres.dsn(name, role)
    added = await hub_command("token", "add", "dev-1", "--registry-url", dsn)
    assert added.returncode == 0, added.stderr
    process = HubProcess(
        tmp_path / "state", influxdb, influx_db_name, env={"HUB_REGISTRY_URL": dsn}
    )
    await process.start()
    try:
        client = DeviceClient(process.url, added.stdout.strip())
        await asyncio.wait_for(client.connect(), WAIT_S)
        try:
            reading = [{"name": "env", "fields": {"t": 1.0}}]
            assert (await asyncio.wait_for(client.store(reading), WAIT_S)).accepted == 1
            own_postgres.kill()
            for _ in range(3):
                assert (await asyncio.wait_for(client.store(reading), WAIT_S)).accepted == 1
            own_postgres.start()
            pushed = await hub_command(
                "config", "set", "dev-1", "x=1", "--wait", "10", "--registry-url", dsn
            )
            assert pushed.returncode == 0, pushed.stderr + process.log
            assert [(c.version, c.config) for c in client.configs] == [(1, {"x": 1})]
        finally:
            await asyncio.wait_for(client.close(), WAIT_S)
    finally:
        returncode = await process.stop()
    assert returncode == 0, process.log
    assert process.log.count("registry listener lost its connection") == 1, process.log


async def test_two_hubs_on_one_registry_each_act_on_their_own_devices(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str, postgres_db: PostgresDatabase
) -> None:
    """Two `hub serve` on one PostgreSQL: a `--all` push reaches the devices of both, a
    revocation closes the device on the hub holding it, and `hub nodes` and `hub devices`
    say which hub holds which device."""
    env = {"HUB_REGISTRY_URL": postgres_db.dsn}
    tokens = {}
    for device_id in ("a", "b"):
        added = await hub_command("token", "add", device_id, env=env)
        assert added.returncode == 0, added.stderr
        tokens[device_id] = added.stdout.strip()
    hubs = {
        name: HubProcess(
            tmp_path / name, influxdb, influx_db_name, env={**env, "HUB_NODE_ID": name}
        )
        for name in ("hub-1", "hub-2")
    }
    clients = {
        "a": DeviceClient(hubs["hub-1"].url, tokens["a"]),
        "b": DeviceClient(hubs["hub-2"].url, tokens["b"]),
    }
    try:
        for process in hubs.values():
            await process.start()
        for client in clients.values():
            await asyncio.wait_for(client.connect(), WAIT_S)

        async def devices() -> dict[str, Any]:
            listed = await hub_command("devices", "--json", env=env)
            return {row["device"]: row["hub"] for row in json.loads(listed.stdout)}

        await eventually(devices, lambda held: held == {"a": "hub-1", "b": "hub-2"}, "holders")
        pushed = await hub_command("config", "set", "--all", "mode=eco", "--wait", "10", env=env)
        assert pushed.returncode == 0, pushed.stderr
        for client in clients.values():
            assert [(c.version, c.config) for c in client.configs] == [(1, {"mode": "eco"})]
        nodes = json.loads((await hub_command("nodes", "--json", env=env)).stdout)
        assert [(n["node"], n["live"]) for n in nodes] == [("hub-1", True), ("hub-2", True)]

        assert (await hub_command("token", "revoke", "b", env=env)).returncode == 0
        code, _ = await asyncio.wait_for(clients["b"].wait_closed(), WAIT_S)
        assert code == CloseCode.REVOKED
        reading = [{"name": "env", "fields": {"t": 1.0}}]
        assert (await asyncio.wait_for(clients["a"].store(reading), WAIT_S)).accepted == 1
    finally:
        for client in clients.values():
            await asyncio.wait_for(client.close(), WAIT_S)
        codes = [await process.stop() for process in hubs.values()]
    assert codes == [0, 0], "\n".join(process.log for process in hubs.values())
