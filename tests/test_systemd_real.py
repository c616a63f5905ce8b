"""The shipped units under a real systemd 252: a Debian bookworm container booted with
systemd-nspawn (tests/nspawn.py), the hub installed in it as docs/deploy.md says, checked
through `systemctl` and `journalctl` inside, with devices on the host and the suite's InfluxDB.

One booted machine serves the whole module; its tests run in order on it. The tree has no
procps, so `systemctl reload` proves ExecReload needs no /bin/kill. The last tests run the
same units with `workers = 2` in hub.toml: a supervisor sharing hub.socket's socket with two
worker processes.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from device_sim.client import DeviceClient
from device_sim.local_servers import (
    LocalServer,
    create_database,
    drop_database,
    free_port,
    http_request,
)
from tests.nspawn import (
    CONFIG,
    HUB,
    SERVICE_USER,
    Machine,
    MachineError,
    build_wheels,
    cached_tree,
    debian_mirror,
    drop_in,
    install_hub,
    overlay,
    tree_key,
)
from tests.support import points

# The first run builds the cached tree in its first test's setup (60-100 s, more on a slow
# mirror): more than the suite's default timeout allows.
pytestmark = [pytest.mark.systemd, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 60.0
LOOSE = """
[measurements.environment.fields]
temperature = { type = "float" }
"""
STRICT = """
[measurements.environment.fields]
temperature = { type = "float", max = 50 }
"""
HOT = [{"name": "environment", "time": 1_700_000_000_000, "fields": {"temperature": 80.0}}]
COOL = [{"name": "environment", "time": 1_700_000_000_002, "fields": {"temperature": 20.0}}]
HUB_TOML = """\
state_dir = "/var/lib/sensor-hub"
host = "127.0.0.1"
port = {port}
influx_url = "{influx_url}"
influx_bucket = "{db}"
health_port = {health_port}
schemas = "/etc/sensor-hub/schemas.toml"
flush_interval_s = 0.02
"""
# Shorter than the shipped 30 s so that the freeze test takes seconds; abort soon after.
SERVICE_DROP_IN = "[Service]\nWatchdogSec=4s\nTimeoutAbortSec=5s\nRestartSec=1s\n"


@dataclass
class Booted:
    """The booted machine with the hub installed (not started), and where it writes."""

    machine: Machine
    root: Path
    port: int
    health_port: int
    influx: LocalServer
    db: str
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Where devices on the host connect."""
        return f"ws://127.0.0.1:{self.port}"

    def systemctl(self, *args: str) -> str:
        """`systemctl ARGS` inside; its stdout."""
        return self.machine.run("systemctl", *args, timeout=WAIT_S + 30).stdout

    def show(self, prop: str, unit: str = "hub.service") -> str:
        """One property of a unit, as `systemctl show` says it."""
        return self.systemctl("show", "-p", prop, "--value", unit).strip()

    def journal(self, *args: str) -> str:
        """The hub's journal lines (message only)."""
        self.machine.run("journalctl", "--sync", check=False)
        return self.machine.run(
            "journalctl", "-u", "hub.service", "--no-pager", "-o", "cat", *args
        ).stdout

    def token(self, device_id: str) -> str:
        """A device registered as docs/deploy.md says (as the service user); its token."""
        if device_id not in self.tokens:
            result = self.machine.run(
                "runuser", "-u", SERVICE_USER, "--", HUB, "token", "add", device_id,
                "--config", CONFIG,
            )  # fmt: skip
            self.tokens[device_id] = result.stdout.strip()
        return self.tokens[device_id]

    def health(self) -> dict[str, object]:
        """The hub's /healthz answer (on the host's network, as the container shares it)."""
        _, body = http_request(f"http://127.0.0.1:{self.health_port}/healthz", timeout=5)
        answer: dict[str, object] = json.loads(body)
        return answer

    def wait_for(self, what: str, condition: Callable[[], bool]) -> None:
        """Poll `condition` until it holds, or fail after WAIT_S saying `what`."""
        deadline = time.monotonic() + WAIT_S
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.journal()[-4000:]}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def installed(influxdb: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    """The machine, booted once for the module and powered off (by pid) after it."""
    try:
        tree = cached_tree()
    except MachineError as exc:
        pytest.fail(f"no test machine: {exc}")
    scratch = tmp_path_factory.mktemp("nspawn")
    wheels = build_wheels(ROOT, scratch / "wheels")
    db = f"test_{uuid.uuid4().hex[:12]}"
    create_database(influxdb.url, db)
    port, health_port = free_port(), free_port()
    with overlay(tree, scratch / "machine") as root:
        install_hub(
            root,
            wheels,
            ROOT / "systemd",
            HUB_TOML.format(port=port, influx_url=influxdb.url, db=db, health_port=health_port),
        )
        (root / "etc/sensor-hub/schemas.toml").write_text(LOOSE)
        drop_in(root, "hub.socket", f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n")
        drop_in(root, "hub.service", SERVICE_DROP_IN)
        machine = Machine(root, scratch / "machine.log")
        try:
            machine.boot()
            yield Booted(machine, root, port, health_port, influxdb, db)
        finally:
            machine.stop()
    if influxdb.running:
        drop_database(influxdb.url, db)


def main_pid(booted: Booted) -> int:
    """The hub's main process id inside the container (0 when not running)."""
    return int(booted.show("MainPID"))


@pytest.fixture
def booted(installed: Booted) -> Booted:
    """The machine with the hub started (the tests run in order; this lets one run alone)."""
    if installed.show("ActiveState") != "active":
        try:
            installed.systemctl("start", "hub.socket", "hub.service")
        except MachineError as exc:
            pytest.fail(f"{exc}\n{installed.journal()[-4000:]}")
    return installed


# --- The tree ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_the_tree_comes_from_the_mirror_apt_uses(tmp_path: Path) -> None:
    """The bookworm mirror of apt's sources, deb822 or one-line; deb.debian.org without."""
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
    )
    one_line = tmp_path / "sources.list"
    one_line.write_text("# a comment\ndeb [arch=amd64] http://other.example/debian bookworm main\n")
    assert debian_mirror([deb822]) == "http://mirror.example/debian"
    assert debian_mirror([tmp_path / "missing", one_line]) == "http://other.example/debian"
    assert debian_mirror([]) == "http://deb.debian.org/debian"


@pytest.mark.unit
def test_the_cache_key_is_the_package_list() -> None:
    """The same packages in any order share a tree; another list gets another one."""
    assert tree_key(("a", "b")) == tree_key(("b", "a"))
    assert tree_key(("a", "b")) != tree_key(("a", "b", "procps"))


# --- Start ----------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_start_returns_once_the_hub_is_ready(installed: Booted) -> None:
    """`systemctl start` returns after READY=1: the hub answers /healthz at once, its status
    says where it listens, and its start line precedes systemd's "Started"."""
    booted = installed
    booted.systemctl("start", "hub.service")
    assert booted.show("ActiveState") == "active"
    assert booted.show("SubState") == "running"
    assert booted.show("StatusText") == f"listening on 127.0.0.1:{booted.port}"
    assert booted.health()["status"] == "ok"
    journal = booted.journal()
    listening = journal.index("hub listening on")
    assert journal.index("Started hub.service", listening) > listening
    assert "the socket systemd passed" in journal


@pytest.mark.e2e
def test_unit_limits_are_in_force(booted: Booted) -> None:
    """LimitNOFILE, TasksMax and the system call filter (less @resources) hold for the hub.

    systemd cannot raise a hard limit above its own without CAP_SYS_RESOURCE, which this
    sandbox withholds: the hub gets 65536 or that ceiling, and either is far above the
    default soft limit of 1024."""
    assert booted.show("LimitNOFILE") == "65536"
    ceiling = min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    limits = booted.machine.run("cat", f"/proc/{main_pid(booted)}/limits").stdout
    open_files = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert open_files.split()[3:5] == [str(ceiling)] * 2, open_files
    assert ceiling > 1024
    assert booted.show("TasksMax") == "128"
    # A denied call answers EPERM (SystemCallErrorNumber); setpriority is in @resources, but
    # raising the soft file limit to the hard one (as the hub does at start) still works.
    probe = booted.machine.run(
        "systemd-run", "--wait", "--pipe", "--quiet", "-p", "SystemCallFilter=@system-service",
        "-p", "SystemCallFilter=~@privileged @resources", "-p", "SystemCallErrorNumber=EPERM",
        "-p", "LimitNOFILE=65536", "python3", "-c",
        "import os, resource\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n"
        "try:\n    os.setpriority(os.PRIO_PROCESS, 0, 5)\nexcept PermissionError:\n"
        "    print('setpriority denied')\n",
    )  # fmt: skip
    assert probe.stdout.strip() == "setpriority denied", probe


# --- Devices --------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_device_on_the_host_streams_into_influxdb(booted: Booted) -> None:
    """A device on the host is acked by the hub in the container; InfluxDB has its reading."""
    token = booted.token("sensor-1")

    async def send() -> int:
        async with DeviceClient(booted.url, token) as client:
            reading = {"name": "environment", "time": 1_700_000_000_001,
                       "fields": {"temperature": 21.5}, "tags": {"room": "lab"}}  # fmt: skip
            ack = await asyncio.wait_for(client.store([reading]), 30)
            return ack.accepted

    assert asyncio.run(send()) == 1
    stored = points(booted.influx, booted.db, "environment")
    assert [(p["device"], p["room"], p["temperature"]) for p in stored] == [
        ("sensor-1", "lab", 21.5)
    ]


@pytest.mark.e2e
def test_reload_applies_a_changed_schema_file(booted: Booted) -> None:
    """`systemctl reload` (no /bin/kill in this tree) makes the new schema judge the same
    open connection; the hub is not restarted."""
    assert not (booted.root / "bin/kill").exists()
    assert not (booted.root / "usr/bin/kill").exists()
    token = booted.token("sensor-1")
    pid = main_pid(booted)

    async def reload_and_send() -> bool:
        async with DeviceClient(booted.url, token) as client:
            assert (await asyncio.wait_for(client.store(HOT), 30)).accepted == 1
            (booted.root / "etc/sensor-hub/schemas.toml").write_text(STRICT)
            await asyncio.to_thread(booted.systemctl, "reload", "hub.service")
            for _ in range(100):
                if (await asyncio.wait_for(client.store(HOT), 30)).rejected:
                    return client.connection.close_code is None
                await asyncio.sleep(0.1)
            return False

    assert asyncio.run(reload_and_send()), booted.journal()[-3000:]
    assert main_pid(booted) == pid
    assert "reloaded: measurement schemas from /etc/sensor-hub/schemas.toml" in booted.journal()


@pytest.mark.e2e
def test_the_journal_carries_warnings_with_their_priority(booted: Booted) -> None:
    """A warning (a changed setting that needs a restart) is in `journalctl -p warning`
    with priority 4; the info lines are not."""
    toml = booted.root / "etc/sensor-hub/hub.toml"
    toml.write_text(toml.read_text() + "batch_size = 1000\n")
    booted.systemctl("reload", "hub.service")
    warning = "changed settings that apply only after a restart: batch_size"
    booted.wait_for("the warning", lambda: warning in booted.journal("-p", "warning"))
    warnings = booted.journal("-p", "warning")
    assert "hub listening on" not in warnings
    records = [json.loads(line) for line in booted.journal("-o", "json").splitlines()]
    assert {r["PRIORITY"] for r in records if warning in r["MESSAGE"]} == {"4"}
    assert {r["PRIORITY"] for r in records if "hub listening on" in r["MESSAGE"]} == {"6"}


# --- The sandbox ----------------------------------------------------------------------------------

WRITE_PROBE = """
for dir in "$@"; do
    if touch "$dir/.probe" 2>/dev/null; then echo "writable $dir"; rm -f "$dir/.probe";
    else echo "read-only $dir"; fi
done
"""
PLACES = (
    "/", "/etc", "/etc/sensor-hub", "/opt/sensor-hub", "/opt/sensor-hub/.venv/bin", "/usr",
    "/var", "/var/lib", "/var/log", "/root", "/home", "/run", "/var/lib/sensor-hub",
)  # fmt: skip


@pytest.mark.e2e
def test_the_sandbox_lets_the_hub_write_its_state_directory_and_nothing_else(
    booted: Booted,
) -> None:
    """Seen from inside the running service (its mount and user namespaces, as its user),
    only /var/lib/sensor-hub is writable; its /tmp is its own."""
    uid = booted.machine.run("id", "-u", SERVICE_USER).stdout.strip()
    gid = booted.machine.run("id", "-g", SERVICE_USER).stdout.strip()
    inside = booted.machine.run(
        "nsenter", "-t", str(main_pid(booted)), "-m", "-U", "-S", uid, "-G", gid, "--",
        "/bin/sh", "-c", WRITE_PROBE + "touch /tmp/hub-probe && echo private-tmp", "sh", *PLACES,
    ).stdout.splitlines()  # fmt: skip
    writable = [line.split(" ", 1)[1] for line in inside if line.startswith("writable ")]
    assert writable == ["/var/lib/sensor-hub"], inside
    assert len([line for line in inside if line.startswith("read-only ")]) == len(PLACES) - 1
    assert "private-tmp" in inside
    assert not (booted.root / "tmp/hub-probe").exists()  # the container's /tmp is not its /tmp


# --- Watchdog, restart, stop ----------------------------------------------------------------------


@pytest.mark.e2e
def test_a_frozen_hub_is_killed_by_the_watchdog_and_restarted(booted: Booted) -> None:
    """SIGSTOP stops the heartbeat: systemd logs a watchdog timeout, kills the hub and starts
    a new one that devices reach again."""
    pid, restarts = main_pid(booted), int(booted.show("NRestarts"))
    booted.machine.run("/bin/sh", "-c", 'kill -STOP "$1"', "sh", str(pid))
    booted.wait_for(
        "a restart after the watchdog",
        lambda: (
            int(booted.show("NRestarts")) > restarts
            and main_pid(booted) not in (0, pid)
            and booted.show("ActiveState") == "active"
        ),
    )
    assert (
        "Watchdog timeout"
        in booted.machine.run("journalctl", "-u", "hub.service", "--no-pager").stdout
    )
    booted.wait_for("/healthz ok", lambda: booted.health()["status"] == "ok")


@dataclass
class DeviceLoop:
    """What devices connecting in a loop saw: acks, refusals, interrupted attempts."""

    acked: list[float] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    interrupted: int = 0
    cut_mid_handshake: int = 0
    """Connections closed before the hub answered the upgrade: not a refusal (no error
    status, nothing refused the connection), a device simply connects again. The hub lets
    handshakes under way finish before it closes a socket that systemd keeps; on a loaded
    box one can still be cut, so they are counted and printed, not failed."""
    started_during_restart_and_acked: int = 0


async def connect_in_a_loop(
    booted: Booted, device_id: str, stop: asyncio.Event, restarting: asyncio.Event, seen: DeviceLoop
) -> None:
    """Connect, store one reading, close, over and over, until `stop`."""
    token = booted.token(device_id)
    number = 0
    base_ms = time.time_ns() // 10**6  # times of now: the hub refuses readings from the future
    while not stop.is_set():
        number += 1
        value = float(number % 50)
        reading = {"name": "environment", "time": base_ms + number,
                   "fields": {"temperature": value}, "tags": {"run": device_id}}  # fmt: skip
        during = restarting.is_set()
        try:
            async with DeviceClient(booted.url, token) as client:
                ack = await asyncio.wait_for(client.store([reading]), 30)
        except ConnectionRefusedError as exc:
            seen.refused.append(f"refused: {exc}")
            continue
        except InvalidStatus as exc:
            seen.refused.append(f"HTTP {exc.response.status_code}")
            continue
        except (ConnectionClosed, ConnectionError):
            seen.interrupted += 1  # closed with 1001 by a draining hub: send again
            continue
        except InvalidMessage:
            seen.cut_mid_handshake += 1
            continue
        assert ack.accepted == 1
        seen.acked.append(reading["time"])  # type: ignore[arg-type]
        seen.started_during_restart_and_acked += during


@pytest.mark.e2e
def test_restart_refuses_no_device_and_loses_nothing_acked(booted: Booted) -> None:
    """Devices connecting in a loop through `systemctl restart hub` are never refused
    (hub.socket keeps the port open; they wait in its backlog), and InfluxDB holds every
    reading the hub acked."""
    pid = main_pid(booted)
    devices = [f"looping-{n}" for n in range(3)]
    seen = {device: DeviceLoop() for device in devices}

    async def run() -> None:
        stop, restarting = asyncio.Event(), asyncio.Event()
        loops = [
            asyncio.create_task(connect_in_a_loop(booted, d, stop, restarting, seen[d]))
            for d in devices
        ]

        async def until(condition: Callable[[], bool]) -> None:
            while not condition():
                if failed := [loop for loop in loops if loop.done()]:
                    await failed[0]  # a device loop ended early: say why, at once
                await asyncio.sleep(0.05)

        await until(lambda: min(len(s.acked) for s in seen.values()) >= 5)
        restarting.set()
        await asyncio.to_thread(booted.systemctl, "restart", "hub.service")
        restarting.clear()
        after = {d: len(s.acked) for d, s in seen.items()}
        await until(lambda: all(len(seen[d].acked) >= after[d] + 5 for d in devices))
        stop.set()
        await asyncio.gather(*loops)

    asyncio.run(asyncio.wait_for(run(), WAIT_S * 2))
    assert main_pid(booted) not in (0, pid)
    for device, s in seen.items():
        print(
            f"{device}: {len(s.acked)} acked, {s.interrupted} interrupted by the drain, "
            f"{s.cut_mid_handshake} cut mid-handshake, "
            f"{s.started_during_restart_and_acked} started during the restart and acked"
        )
    assert [s.refused for s in seen.values()] == [[], [], []]
    assert sum(s.started_during_restart_and_acked for s in seen.values()) >= 1
    stored = points(booted.influx, booted.db, "environment")
    for device in devices:
        times = {p["time"] // 1_000_000 for p in stored if p.get("run") == device}
        missing = [t for t in seen[device].acked if t not in times]
        assert missing == [], f"{device}: acked but not in InfluxDB: {missing[:10]}"


@pytest.mark.e2e
def test_stop_drains_and_exits_cleanly(booted: Booted) -> None:
    """`systemctl stop` closes a connected device with 1001 and the hub exits with status 0
    after logging "stopped"."""
    token = booted.token("sensor-1")

    async def stop_while_connected() -> int | None:
        async with DeviceClient(booted.url, token) as client:
            assert (await asyncio.wait_for(client.store(COOL), 30)).accepted == 1
            await asyncio.to_thread(booted.systemctl, "stop", "hub.socket", "hub.service")
            code, _ = await asyncio.wait_for(client.wait_closed(), 30)
            return code

    assert asyncio.run(stop_while_connected()) == 1001
    assert booted.show("ActiveState") == "inactive"
    assert booted.show("Result") == "success"
    assert booted.show("ExecMainStatus") == "0"
    hub_lines = [line for line in booted.journal().splitlines() if "hub.service" not in line]
    assert hub_lines[-1].endswith("stopped"), hub_lines[-5:]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", booted.port), timeout=2).close()


# --- Workers: the same units with `workers = 2` ------------------------------------------------


def worker_connections(booted: Booted) -> dict[str, float]:
    """Each worker's open connections, from the supervisor's /metrics."""
    from hub.workers.exposition import by_worker

    _, body = http_request(f"http://127.0.0.1:{booted.health_port}/metrics", timeout=5)
    return by_worker(body.decode(), "hub_connections")


def worker_pids(booted: Booted) -> dict[str, int | None]:
    """Which process holds each slot, from the supervisor's /healthz."""
    workers: dict[str, dict[str, int | None]] = booted.health()["workers"]  # type: ignore[assignment]
    return {slot: body["pid"] for slot, body in workers.items()}


WORKERS_SOCKET_DROP_IN = "[Socket]\nReusePort=yes\nListenStream=127.0.0.1:{port}\n"
"""As docs/deploy.md says for two workers: a second socket on the port (test.conf has the
first), both in one SO_REUSEPORT group, so that the kernel spreads devices over them."""


@pytest.fixture
def with_workers(installed: Booted) -> Booted:
    """The hub started with `workers = 2` and a socket per worker (the earlier tests
    stopped the single hub and its socket)."""
    toml = installed.root / "etc/sensor-hub/hub.toml"
    if "workers = 2" not in toml.read_text():
        installed.systemctl("stop", "hub.socket", "hub.service")
        toml.write_text(toml.read_text() + "workers = 2\n")
        (installed.root / "etc/sensor-hub/schemas.toml").write_text(LOOSE)
        drop_in(
            installed.root,
            "hub.socket",
            WORKERS_SOCKET_DROP_IN.format(port=installed.port),
            name="workers.conf",
        )
        installed.systemctl("daemon-reload")
    if installed.show("ActiveState") != "active":
        try:
            installed.systemctl("start", "hub.socket", "hub.service")
        except MachineError as exc:
            pytest.fail(f"{exc}\n{installed.journal()[-4000:]}")
    return installed


@pytest.mark.e2e
def test_workers_become_ready_on_the_socket_systemd_holds(with_workers: Booted) -> None:
    """`systemctl start` returns once both workers listen on hub.socket's socket: the status
    says so, /healthz counts two healthy workers, each logged its start line."""
    booted = with_workers
    assert booted.show("StatusText") == (
        f"2 workers listening on 127.0.0.1:{booted.port} (the 2 sockets systemd passed)"
    )
    health = booted.health()
    assert (health["status"], health["workers_healthy"]) == ("ok", 2)
    journal = booted.journal()
    for number in (1, 2):
        assert f"worker {number}/2 (" in journal and f"hub[{number}]: worker {number}/2" in journal
    started = journal.rindex("Started hub.service")
    assert journal.rindex("all 2 workers listening", 0, started) < started


@pytest.mark.e2e
def test_workers_stream_and_reload_together(with_workers: Booted) -> None:
    """Devices on the host are spread over both workers (printed), acked and stored;
    `systemctl reload` makes the new schema judge every open connection on both."""
    booted = with_workers
    ids = [f"wsensor-{n}" for n in range(24)]
    tokens = [booted.token(device_id) for device_id in ids]
    pid = main_pid(booted)

    async def stream_and_reload() -> list[bool]:
        clients = [DeviceClient(booted.url, token) for token in tokens]
        for client in clients:
            await client.__aenter__()
        try:
            for number, client in enumerate(clients):
                cool = [{**COOL[0], "time": 1_700_000_100_000 + number}]
                assert (await asyncio.wait_for(client.store(cool), 30)).accepted == 1
            spread = worker_connections(booted)
            print(f"24 devices over 2 workers on systemd's 2 sockets: {spread}")
            # Binomial(24, 1/2): one worker without any has odds of 1 in 8 million.
            assert sorted(k for k, v in spread.items() if v) == ["1", "2"], spread
            (booted.root / "etc/sensor-hub/schemas.toml").write_text(STRICT)
            await asyncio.to_thread(booted.systemctl, "reload", "hub.service")
            rejected = []
            for number, client in enumerate(clients):
                hot = [{**HOT[0], "time": 1_700_000_200_000 + number}]
                rejected.append(bool((await asyncio.wait_for(client.store(hot), 30)).rejected))
            return rejected
        finally:
            for client in clients:
                await client.__aexit__(None, None, None)

    assert asyncio.run(stream_and_reload()) == [True] * len(ids), booted.journal()[-3000:]
    assert main_pid(booted) == pid
    assert booted.show("ActiveState") == "active"
    stored = points(booted.influx, booted.db, "environment")
    assert {p["device"] for p in stored} >= set(ids)
    assert booted.journal().count("reloaded: measurement schemas") >= 2


@pytest.mark.e2e
def test_a_rolling_restart_refuses_no_device_and_loses_nothing(with_workers: Booted) -> None:
    """SIGUSR2 to the supervisor (`systemctl kill --kill-whom=main`) replaces the workers one
    at a time while devices connect in a loop: none is refused, every acked reading is in
    InfluxDB, both slots run new processes, the supervisor stays."""
    booted = with_workers
    (booted.root / "etc/sensor-hub/schemas.toml").write_text(LOOSE)
    booted.systemctl("reload", "hub.service")
    pid, before = main_pid(booted), worker_pids(booted)
    devices = [f"rolling-{n}" for n in range(3)]
    seen = {device: DeviceLoop() for device in devices}

    def replaced() -> bool:
        try:
            now, healthy = worker_pids(booted), booted.health()["workers_healthy"]
        except OSError:
            return False
        return healthy == 2 and all(now[slot] not in (None, before[slot]) for slot in now)

    async def run() -> None:
        stop, rolling = asyncio.Event(), asyncio.Event()
        loops = [
            asyncio.create_task(connect_in_a_loop(booted, d, stop, rolling, seen[d]))
            for d in devices
        ]

        async def until(condition: Callable[[], bool]) -> None:
            while not condition():
                if failed := [loop for loop in loops if loop.done()]:
                    await failed[0]
                await asyncio.sleep(0.05)

        await until(lambda: min(len(s.acked) for s in seen.values()) >= 5)
        rolling.set()
        await asyncio.to_thread(
            booted.systemctl, "kill", "--kill-whom=main", "--signal=SIGUSR2", "hub.service"
        )
        while not await asyncio.to_thread(replaced):  # off the loop: the devices keep going
            await until(lambda: True)
            await asyncio.sleep(0.2)
        rolling.clear()
        after = {d: len(s.acked) for d, s in seen.items()}
        await until(lambda: all(len(seen[d].acked) >= after[d] + 5 for d in devices))
        stop.set()
        await asyncio.gather(*loops)

    asyncio.run(asyncio.wait_for(run(), WAIT_S * 2))
    for device, s in seen.items():
        print(
            f"{device}: {len(s.acked)} acked, {s.interrupted} interrupted by a worker's drain, "
            f"{s.cut_mid_handshake} cut mid-handshake, "
            f"{s.started_during_restart_and_acked} started during the rolling restart and acked"
        )
    assert [s.refused for s in seen.values()] == [[], [], []]
    assert main_pid(booted) == pid
    assert "rolling restart done" in booted.journal()
    after = worker_pids(booted)
    assert all(after[slot] not in (None, before[slot]) for slot in ("1", "2")), (before, after)
    stored = points(booted.influx, booted.db, "environment")
    for device in devices:
        times = {p["time"] // 1_000_000 for p in stored if p.get("run") == device}
        missing = [t for t in seen[device].acked if t not in times]
        assert missing == [], f"{device}: acked but not in InfluxDB: {missing[:10]}"


@pytest.mark.e2e
def test_workers_stop_cleanly(with_workers: Booted) -> None:
    """`systemctl stop` drains both workers: a device is closed with 1001, the service
    exits 0 after the supervisor's "stopped", and no worker is left."""
    booted = with_workers
    token = booted.token("sensor-1")
    killed_before = booted.machine.run("journalctl", "-u", "hub.service").stdout.count("SIGKILL")

    async def stop_while_connected() -> int | None:
        async with DeviceClient(booted.url, token) as client:
            assert (await asyncio.wait_for(client.store(COOL), 30)).accepted == 1
            await asyncio.to_thread(booted.systemctl, "stop", "hub.socket", "hub.service")
            code, _ = await asyncio.wait_for(client.wait_closed(), 30)
            return code

    assert asyncio.run(stop_while_connected()) == 1001
    assert booted.show("ActiveState") == "inactive"
    assert (booted.show("Result"), booted.show("ExecMainStatus")) == ("success", "0")
    lines = [line for line in booted.journal().splitlines() if "hub.service" not in line]
    assert lines[-1] == "INFO hub.workers: stopped", lines[-5:]
    drain = max(i for i, line in enumerate(lines) if "stopping: draining 2 workers" in line)
    assert sorted(line for line in lines[drain:] if line.endswith(": stopped")) == [
        "INFO hub.workers: stopped",
        "INFO hub[1]: stopped",
        "INFO hub[2]: stopped",
    ]
    killed = booted.machine.run("journalctl", "-u", "hub.service").stdout.count("SIGKILL")
    assert killed == killed_before, "a worker was left for systemd to kill"
