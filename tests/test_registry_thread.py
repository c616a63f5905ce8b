"""The SQLite registry's own thread: no registry call blocks the hub's event loop.

While another connection holds SQLite's write lock (a CLI's `token add --count` or
`config set --all`), a write through the hub's ports waits without blocking the loop, and
reads (a handshake's credential lookup) still answer. The unit tests hold the lock from a
second connection in this process; the end-to-end test holds it from another process while
real devices stream through a real `hub serve`: their acks keep coming.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer
from hub.gateway.presence import PresenceTracker
from hub.registry import thread as thread_module
from hub.registry.records import Presence, hash_token
from hub.registry.sqlite import Registry
from hub.registry.thread import ThreadedSQLiteRegistry
from hub.registry.worker import OwningThread
from tests.support import HubProcess

POLL_S = 0.01
WAIT_S = 10.0
"""Bound for what should happen promptly: a hang fails the test, a loaded box does not."""
HOLD_S = 4.0
"""How long the lock is held: several presence flushes (every 0.5 s) of the hub."""
PROMPT_S = 1.5
"""Bound on a loop stall, an ack or a handshake while the lock is held. Code that runs
registry writes on the loop stalls for as long as the lock is held (HOLD_S, up to SQLite's
10 s busy timeout); with the registry's thread it is milliseconds."""
LOCK_HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""


@contextmanager
def write_lock(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the registry's write lock, as a CLI transaction does."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield holder
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[tuple[ThreadedSQLiteRegistry, str]]:
    """The hub's ports on a registry with device "a"; and a's token."""
    path = tmp_path / "state" / "registry.sqlite3"
    operator = Registry(path)
    (token,) = operator.add_many(["a"])
    operator.close()
    ports = await ThreadedSQLiteRegistry.open(path, POLL_S)
    try:
        yield ports, token
    finally:
        await ports.close()


async def loop_stall(for_s: float) -> float:
    """The longest the loop went without running a timer beyond its due time, over `for_s`."""
    worst = 0.0
    end = time.monotonic() + for_s
    while time.monotonic() < end:
        before = time.monotonic()
        await asyncio.sleep(POLL_S)
        worst = max(worst, time.monotonic() - before - POLL_S)
    return worst


@pytest.mark.unit
async def test_a_write_waits_for_the_lock_off_the_loop_while_reads_answer(
    registry: tuple[ThreadedSQLiteRegistry, str], tmp_path: Path
) -> None:
    """A presence write waits for another connection's lock; meanwhile the loop runs and
    credential lookups answer at once; the write lands once the lock is released."""
    ports, token = registry
    row = Presence("a", True, "10.0.0.1:1", 1.0, 2.0, 5)
    with write_lock(tmp_path / "state" / "registry.sqlite3"):
        writing = asyncio.ensure_future(ports.record_presence([row]))
        stall = await loop_stall(1.0)
        lookups = []
        for _ in range(5):
            started = time.monotonic()
            credential = await ports.credential(hash_token(token))
            lookups.append(time.monotonic() - started)
            assert credential is not None and credential.device_id == "a"
        assert not writing.done(), "the write went through while the lock was held"
    await asyncio.wait_for(writing, WAIT_S)
    print(
        f"lock held: loop stalled at most {stall * 1000:.1f} ms, credential lookups took "
        f"at most {max(lookups) * 1000:.1f} ms"
    )
    assert stall < PROMPT_S and max(lookups) < PROMPT_S
    assert (await ports.presence())["a"] == row


@pytest.mark.unit
async def test_a_write_gives_up_after_the_busy_timeout(
    registry: tuple[ThreadedSQLiteRegistry, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lock held past the busy timeout fails the write with SQLite's error, as a write on
    the engine would, and leaves the backend usable."""
    ports, _ = registry
    monkeypatch.setattr(thread_module, "BUSY_TIMEOUT_S", 0.3)
    row = Presence("a", True, None, None, None, 1)  # a count to add: a registry write
    with write_lock(tmp_path / "state" / "registry.sqlite3"):
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await asyncio.wait_for(ports.record_presence([row]), WAIT_S)
        assert time.monotonic() - started >= 0.3
    await ports.record_presence([row])
    assert (await ports.presence())["a"] == row


@pytest.mark.unit
async def test_concurrent_calls_all_run_on_the_connection_s_thread(
    registry: tuple[ThreadedSQLiteRegistry, str],
) -> None:
    """Many calls at once all succeed: sqlite3 refuses a connection used from any thread
    but its creator's, so each ran on the registry's one thread."""
    ports, token = registry
    rows = [Presence("a", True, None, None, float(n), n) for n in range(20)]
    credentials = asyncio.gather(*(ports.credential(hash_token(token)) for _ in range(20)))
    writes = asyncio.gather(*(ports.record_presence([row]) for row in rows))
    configs = asyncio.gather(*(ports.config_state("a") for _ in range(20)))
    found, _, states = await asyncio.gather(credentials, writes, configs)
    assert [c.device_id if c else None for c in found] == ["a"] * 20
    assert [s.version for s in states] == [0] * 20
    # Queued in order on one thread: the last write asked for is the one stored.
    assert (await ports.presence())["a"] == rows[-1]


# --- End to end: devices stream while a CLI holds the lock -------------------------------


@asynccontextmanager
async def lock_held_by_another_process(path: Path) -> AsyncIterator[None]:
    """A separate process holding the registry's write lock until the block ends."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LOCK_HOLDER,
        str(path),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        line = await asyncio.wait_for(holder.stdout.readline(), WAIT_S)
        assert line == b"locked\n", line
        yield
        holder.stdin.write(b"\n")
        await holder.stdin.drain()
        assert await asyncio.wait_for(holder.wait(), WAIT_S) == 0
    finally:
        if holder.returncode is None:
            holder.kill()  # by its pid
            await holder.wait()


@pytest.mark.e2e
async def test_devices_keep_streaming_while_a_cli_holds_the_write_lock(
    tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """With another process holding the write lock for seconds: a streaming device's acks
    stay prompt, a new device connects promptly and gets its pending config; its answer is
    stored once the lock is released."""
    state = tmp_path / "state"
    path = state / "registry.sqlite3"
    operator = Registry(path)
    try:
        streamer_token, late_token = operator.add_many(["streamer", "late"])
        operator.set_config(["late"], updates={"interval_s": 5})
    finally:
        operator.close()
    hub = HubProcess(state, influxdb, influx_db_name)
    await hub.start()
    try:
        streamer = DeviceClient(hub.url, streamer_token)
        await asyncio.wait_for(streamer.connect(), WAIT_S)
        reading = [{"name": "probe", "fields": {"n": 1.0}}]
        await asyncio.wait_for(streamer.store(reading), WAIT_S)  # warmed up
        acks: list[float] = []
        async with lock_held_by_another_process(path):
            locked_at = time.monotonic()
            late = DeviceClient(hub.url, late_token)
            await asyncio.wait_for(late.connect(), WAIT_S)
            connect_s = time.monotonic() - locked_at
            while time.monotonic() - locked_at < HOLD_S or not late.configs:
                started = time.monotonic()
                ack = await asyncio.wait_for(streamer.store(reading), WAIT_S + HOLD_S)
                acks.append(time.monotonic() - started)
                assert ack.accepted == 1
                assert time.monotonic() - locked_at < WAIT_S + HOLD_S, "no config pushed"
        print(
            f"write lock held {time.monotonic() - locked_at:.1f} s by another process: "
            f"{len(acks)} acks, slowest {max(acks) * 1000:.1f} ms; a new device connected "
            f"in {connect_s * 1000:.1f} ms"
        )
        assert max(acks) < PROMPT_S
        assert connect_s < PROMPT_S
        assert [c.version for c in late.configs] == [1]
        # Once the lock is gone the late device's answer is stored and it streams on.
        await asyncio.wait_for(late.store(reading), WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while True:
            check = Registry(path)
            try:
                acked = check.config_state("late").acked_version
            finally:
                check.close()
            if acked == 1:
                break
            assert time.monotonic() < deadline, "the config answer was never stored"
            await asyncio.sleep(0.05)
        await asyncio.wait_for(late.close(), WAIT_S)
        await asyncio.wait_for(streamer.close(), WAIT_S)
    finally:
        returncode = await hub.stop()
    assert returncode == 0, f"hub exited {returncode}:\n{hub.log}"


# --- The owning thread itself ----------------------------------------------------------------


@pytest.mark.unit
async def test_the_owning_thread_runs_jobs_in_order_on_one_thread() -> None:
    """Jobs run in the order asked, all on one thread that is not the loop's; a job's
    exception reaches its caller and the thread goes on."""
    owner: OwningThread[list[int]] = OwningThread("test-owner", list, lambda _: None, 0.01)
    await owner.start()
    try:
        threads = await asyncio.gather(*(owner.run(_append_thread(n)) for n in range(50)))
        assert len(set(threads)) == 1 and threads[0] != threading.get_ident()
        with pytest.raises(ZeroDivisionError):
            await owner.run(lambda owned: 1 // 0)
        assert await owner.run(list) == list(range(50))
    finally:
        await owner.stop(lambda owned: None)


def _append_thread(n: int) -> Callable[[list[int]], int]:
    def job(owned: list[int]) -> int:
        owned.append(n)
        return threading.get_ident()

    return job


@pytest.mark.unit
async def test_the_idle_duty_runs_while_jobs_keep_coming() -> None:
    """Between jobs, and at least every `idle_s` under a steady stream of them, the idle
    duty runs (so a busy registry still notices operator changes)."""
    idle_at: list[float] = []
    owner: OwningThread[None] = OwningThread(
        "test-owner", lambda: None, lambda _: idle_at.append(time.monotonic()), 0.05
    )
    await owner.start()
    try:
        started = time.monotonic()
        while len(idle_at) < 3:
            await owner.run(lambda _: time.sleep(0.005))  # a stream of jobs, never idle
            assert time.monotonic() - started < WAIT_S, "the idle duty never ran"
    finally:
        await owner.stop(lambda _: None)


@pytest.mark.unit
async def test_jobs_queued_behind_a_slow_one_are_all_answered_in_order() -> None:
    """While one job holds the thread, 200 more queue up (more than one batch of them), a
    failing one among them, and the stop behind them all: every caller gets its own result
    or its own error, in the order asked, and only then does the thread end."""
    release = threading.Event()
    appended: list[int] = []
    owner: OwningThread[list[int]] = OwningThread(
        "test-owner", lambda: appended, lambda _: None, 0.01
    )
    await owner.start()
    slow = asyncio.ensure_future(owner.run(lambda owned: release.wait(WAIT_S)))
    queued = [
        asyncio.ensure_future(owner.run(_fail if n == 77 else _append_thread(n)))
        for n in range(200)
    ]
    stopped = asyncio.ensure_future(owner.stop(lambda owned: owned.append(-1)))
    await asyncio.sleep(0.05)
    assert not any(job.done() for job in queued)  # all waiting behind the slow one
    release.set()
    async with asyncio.timeout(WAIT_S):
        assert await slow is True
        results = await asyncio.gather(*queued, return_exceptions=True)
        await stopped
    assert isinstance(results[77], ZeroDivisionError)
    assert len({r for n, r in enumerate(results) if n != 77}) == 1  # all on the one thread
    assert appended == [n for n in range(200) if n != 77] + [-1]


def _fail(owned: list[int]) -> int:
    return 1 // 0


@pytest.mark.unit
async def test_no_idle_duty_runs_after_the_last_job(caplog: pytest.LogCaptureFixture) -> None:
    """`stop(last)`: once `last` has run (it closes the owned object) the idle duty no
    longer runs, even when it is due right then (an idle duty due after every job here);
    it used to run on the closed SQLite connection and log a traceback at every stop."""
    owned = {"closed": False}
    seen_closed: list[bool] = []
    owner: OwningThread[dict[str, bool]] = OwningThread(
        "test-owner", lambda: owned, lambda o: seen_closed.append(o["closed"]), 0.0
    )
    await owner.start()
    await owner.run(lambda o: None)
    await owner.stop(lambda o: o.update(closed=True))
    async with asyncio.timeout(WAIT_S):
        while threading.active_count() > 1 and any(
            t.name == "test-owner" for t in threading.enumerate()
        ):
            await asyncio.sleep(0.01)
    assert seen_closed and True not in seen_closed
    assert "idle duty failed" not in caplog.text


@pytest.mark.unit
async def test_no_idle_duty_runs_even_when_due_as_the_last_job_returns() -> None:
    """`stop`'s last job closes what the idle duty uses: the duty never runs after it, even
    when it is due right then (it did, and logged "Cannot operate on a closed database"
    as the hub stopped)."""
    closed = threading.Event()
    after_close: list[float] = []

    def idle(_: None) -> None:
        if closed.is_set():
            after_close.append(time.monotonic())

    def last(_: None) -> None:
        closed.set()
        time.sleep(0.02)  # past idle_s: the duty is due when the last job returns

    owner: OwningThread[None] = OwningThread("test-owner", lambda: None, idle, 0.001)
    await owner.start()
    await owner.stop(last)
    assert after_close == []


@pytest.mark.unit
async def test_a_failed_start_raises_the_creation_error() -> None:
    """What `create` raised is what `start` raises."""

    def create() -> None:
        raise sqlite3.OperationalError("unable to open database file")

    owner: OwningThread[None] = OwningThread("test-owner", create, lambda _: None, 0.01)
    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        await asyncio.wait_for(owner.start(), WAIT_S)


@pytest.mark.unit
async def test_presence_not_stored_under_a_long_lock_is_stored_at_the_next_flush(
    registry: tuple[ThreadedSQLiteRegistry, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flush that gives up on the lock keeps what it could not write for the next one."""
    ports, _ = registry
    monkeypatch.setattr(thread_module, "BUSY_TIMEOUT_S", 0.2)
    tracker = PresenceTracker(ports, "hub-test")
    await tracker.load()
    tracker.connected("a", "10.0.0.1:5000")
    # Who is connected goes to the connections file (hub.registry.sqlite_claims).
    with write_lock(tmp_path / "state" / "connections.sqlite3"), pytest.raises(sqlite3.Error):
        await asyncio.wait_for(tracker.flush(), WAIT_S)
    await tracker.flush()
    stored = (await ports.presence())["a"]
    assert (stored.online, stored.remote_address) == (True, "10.0.0.1:5000")
