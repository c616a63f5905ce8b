"""The supervisor of `hub serve --workers N`: N worker processes on one port, kept running.

It opens no device connection itself. At start it releases every device claim of this
host (on SQLite; once, for all workers: a worker starting later must not release its
siblings' devices), then starts the workers:

* **One port.** Under systemd with `hub.socket`, the socket systemd passed is handed on to
  every worker (`LISTEN_FDS`): they accept from its one queue, and a worker that stops
  leaves no connection behind. Without it, each worker binds `host:port` itself with
  `SO_REUSEPORT` and the kernel spreads connections over the workers by their addresses;
  the supervisor first checks the port is free, and holds it bound (not listening, so it
  takes no connection) so that port 0 gives all workers one port.
* **Restarts.** A worker that dies is started again with backoff (`hub.workers.policy`);
  the new process takes the same slot and replays its spool. One that stops notifying
  (frozen, a hung loop) is killed first. A worker that fails before it ever listened at
  start-up (bad settings, its spool held by another hub) stops the whole hub with its error.
  The devices a dead worker held are released as it is reaped (`hub.workers.claims`).
* **Signals.** SIGHUP is forwarded to every worker (each reloads from the same sources);
  SIGUSR2 replaces the workers one at a time (a rolling restart: new code after an upgrade,
  settings that are not live), each only once the one before listens; SIGTERM and SIGINT
  drain all of them at once, within their `shutdown_timeout_s`.
* **systemd.** READY=1 once every worker listens; RELOADING=1 until every worker reloaded;
  STOPPING=1; WATCHDOG=1 only while every worker is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from subprocess import DEVNULL

from hub.gateway.activation import SD_LISTEN_FDS_START
from hub.ops.sdnotify import Notifier
from hub.registry.backends import release_host_claims
from hub.registry.sqlite import secure_state_dir
from hub.settings import Settings
from hub.workers.claims import NODE_ID_KEY, SlotClaims
from hub.workers.health import SupervisorHealth
from hub.workers.policy import (
    START_TIMEOUT_S,
    SlotState,
    all_alive,
    all_ready,
    worker_watchdog_s,
)
from hub.workers.ports import reserve_port, take_passed_sockets
from hub.workers.relay import NotifyRelay
from hub.workers.slots import (
    HEALTH_PORT_KEY,
    WORKER_VARIABLE,
    WorkerSlot,
    adopt_orphan_spools,
    node_id,
    slot_variable,
)

log = logging.getLogger("hub.workers")

TICK_S = 0.25
READY_TIMEOUT_S = 120.0
"""A rolling restart waits at most this long for a new worker to listen."""
STOP_MARGIN_S = 10.0
"""Past a worker's own shutdown_timeout_s: how long it gets before SIGKILL."""


class StartFailed(Exception):
    """A worker ended before it ever listened; carries its exit status."""

    def __init__(self, number: int, status: int) -> None:
        super().__init__(f"worker {number} exited with status {status} before it listened")
        self.number = number
        self.status = status


class Supervisor:
    """Runs `settings.workers` copies of `worker_argv`, each in a slot of its own."""

    def __init__(
        self, settings: Settings, worker_argv: Sequence[str], notifier: Notifier | None = None
    ) -> None:
        self.settings = settings
        self.count = settings.workers
        self.worker_argv = list(worker_argv)
        self.notifier = notifier or Notifier({})
        # Notifier.watchdog_s is its ping interval: half of systemd's WatchdogSec.
        systemd_watchdog = self.notifier.watchdog_s
        self.watchdog_s = worker_watchdog_s(
            None if systemd_watchdog is None else systemd_watchdog * 2
        )
        self.slots = [SlotState(number) for number in range(1, self.count + 1)]
        self._relays = {s.number: NotifyRelay(s.number, self._listener(s)) for s in self.slots}
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._waiters: set[asyncio.Task[None]] = set()
        self._expected_exits: set[int] = set()
        self._killed: set[int] = set()
        """Hung workers sent SIGKILL, not yet reaped."""
        self._stopping = False
        self._started = False
        self._failed: StartFailed | None = None
        self._changed = asyncio.Event()
        self._listening: dict[int, asyncio.Event] = {}
        """Set by a slot's READY=1, for a rolling restart to wait on."""
        self._reloading: set[int] | None = None
        """During a reload: the slots whose READY=1 it still waits for."""
        self._reload_pending: set[int] = set()
        """Slots that were starting when a reload came: SIGHUP once they listen."""
        self._starting: set[int] = set()
        """Slots whose process is being made (not in `_processes` yet)."""
        self._rolling: asyncio.Task[None] | None = None
        self._passed: list[socket.socket] = []
        """systemd's sockets: one for all workers, or one each (`hub.socket`, ReusePort)."""
        self._spawning = asyncio.Lock()
        """Held from putting a worker's socket at fd 3 until its process exists."""
        self._reserved: socket.socket | None = None
        self.host, self.port = settings.host, settings.port
        self.health = SupervisorHealth(self) if settings.health_enabled else None
        self.claims = SlotClaims(
            functools.partial(release_host_claims, settings.registry_url, settings.registry_path)
        )

    # --- Start -------------------------------------------------------------------------------

    def _prepare(self) -> None:
        secure_state_dir(self.settings.state_dir)
        self.claims.release_all()  # once, here: never by a worker (its siblings' devices)
        first = WorkerSlot(1, self.count, self.settings.state_dir, "")
        adopt_orphan_spools(self.settings.state_dir, first.spool_dir, self.count)
        self._passed = take_passed_sockets(self.count)
        if self._passed:
            self.host, self.port = self._passed[0].getsockname()[:2]
            if len(self._passed) == 1 and self.count > 1:
                log.info(
                    "one socket from systemd for %d workers: whichever is idle first accepts, "
                    "so connections spread unevenly; one ListenStream= per worker in "
                    "hub.socket, with ReusePort=yes, spreads them by address",
                    self.count,
                )
        else:
            self._reserved = reserve_port(self.settings.host, self.settings.port)
            self.port = self._reserved.getsockname()[1]

    def _spawn(self, slot: SlotState) -> None:
        if slot.number in self._starting or slot.number in self._processes:
            return  # one process per slot (the tick and a rolling restart may both ask)
        env = dict(os.environ)
        env[WORKER_VARIABLE] = slot_variable(slot.number, self.count)
        env["NOTIFY_SOCKET"] = self._relays[slot.number].address
        env["WATCHDOG_USEC"] = str(int(self.watchdog_s * 1e6))
        env.pop("WATCHDOG_PID", None)
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
        argv = [*self.worker_argv]
        listener: socket.socket | None = None
        if self._passed:
            # sd_listen_fds for the worker: its socket at fd 3; it names itself LISTEN_PID.
            listener = self._passed[(slot.number - 1) % len(self._passed)]
            env["LISTEN_FDS"], env["LISTEN_FDNAMES"] = "1", "devices"
        else:
            argv += ["--port", str(self.port)]  # port 0 resolved once, for all
        slot.restart_at = None  # starting: not due again while its process is being made
        self._launch(slot, argv, env, listener)

    def _launch(
        self, slot: SlotState, argv: list[str], env: dict[str, str], listener: socket.socket | None
    ) -> None:
        async def start_and_wait() -> None:
            try:
                await self.claims.settled(slot.number)  # the last process's devices released
                async with self._spawning:
                    pass_fds: tuple[int, ...] = ()
                    if listener is not None:
                        os.dup2(listener.fileno(), SD_LISTEN_FDS_START, inheritable=False)
                        pass_fds = (SD_LISTEN_FDS_START,)
                    process = await asyncio.create_subprocess_exec(
                        *argv, env=env, pass_fds=pass_fds, stdin=DEVNULL
                    )
            except OSError as exc:  # no process at all (out of memory, of pids): try again
                slot.died(time.monotonic(), expected=self._stopping)
                log.error("cannot start worker %d/%d: %s", slot.number, self.count, exc)
                if not self._started and self._failed is None:
                    self._failed = StartFailed(slot.number, 2)
                self._changed.set()
                return
            finally:
                self._starting.discard(slot.number)
            if self._stopping:  # the stop began while it was being made: it drains too
                process.send_signal(signal.SIGTERM)
            self._processes[slot.number] = process
            self._relays[slot.number].expected_pid = process.pid
            slot.spawned(process.pid, time.monotonic())
            log.info("worker %d/%d started (pid %d)", slot.number, self.count, process.pid)
            status = await process.wait()
            self._exited(slot, process.pid, status)

        self._starting.add(slot.number)
        task = asyncio.create_task(start_and_wait(), name=f"worker-{slot.number}")
        self._waiters.add(task)
        task.add_done_callback(self._waiters.discard)

    def _listener(self, slot: SlotState) -> Callable[[dict[str, str]], None]:
        def on_message(message: dict[str, str]) -> None:
            now = time.monotonic()
            slot.showed_life(now)
            if message.get("READY") == "1":
                port = message.get(HEALTH_PORT_KEY, "")
                slot.became_ready(now, int(port) if port.isdigit() else None)
                self.claims.learned(slot.number, message.get(NODE_ID_KEY, ""))
                if self._reloading is not None:
                    self._reloading.discard(slot.number)
                if slot.number in self._reload_pending:  # started during a reload
                    self._reload_pending.discard(slot.number)
                    self._signal(slot, signal.SIGHUP)
                if (listening := self._listening.get(slot.number)) is not None:
                    listening.set()
                self._changed.set()

        return on_message

    def _exited(self, slot: SlotState, pid: int, status: int) -> None:
        self._processes.pop(slot.number, None)
        self._relays[slot.number].expected_pid = None
        self.claims.reaped(slot.number)
        expected = pid in self._expected_exits or self._stopping
        self._expected_exits.discard(pid)
        self._killed.discard(pid)
        was_ready = slot.listened
        how = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
        if not self._started and not was_ready and not self._stopping:
            self._failed = self._failed or StartFailed(slot.number, status if status > 0 else 2)
        delay = slot.died(time.monotonic(), expected=expected or self._failed is not None)
        if delay is not None:
            log.warning(
                "worker %d/%d (pid %d) %s; starting it again in %.1f s (its spool replays)",
                slot.number, self.count, pid, how, delay,
            )  # fmt: skip
        elif not self._stopping:
            log.info("worker %d/%d (pid %d) %s", slot.number, self.count, pid, how)
        self._changed.set()

    # --- Running -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        """Start the workers, keep them running until `stop`, drain them; the exit status."""
        self._prepare()
        for relay in self._relays.values():
            relay.start()
        try:
            if self.health is not None:
                await self.health.start()
            for slot in self.slots:
                self._spawn(slot)
            ticker = asyncio.create_task(self._tick(stop), name="supervise")
            await stop.wait()
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            if self._failed is not None:
                log.error("%s: stopping the hub", self._failed)
        finally:
            await self._stop_all()
        if self._failed is not None:
            return self._failed.status
        return 0

    async def _tick(self, stop: asyncio.Event) -> None:
        next_ping = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if self._failed is not None:
                stop.set()
                return
            for slot in self.slots:
                if slot.due(now):
                    self._spawn(slot)
                elif (
                    slot.hung(now, self.watchdog_s)
                    and slot.pid is not None
                    and slot.pid not in self._killed
                ):
                    log.error(
                        "worker %d/%d (pid %d) %s (frozen?): killing it",
                        slot.number, self.count, slot.pid,
                        f"sent nothing for {self.watchdog_s:g} s" if slot.listened
                        else f"did not listen within {START_TIMEOUT_S:g} s",
                    )  # fmt: skip
                    self._killed.add(slot.pid)  # one kill; its exit restarts the slot
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(slot.pid, signal.SIGKILL)
            if not self._started and all_ready(self.slots):
                self._started = True
                log.info("all %d workers listening on %s:%d", self.count, self.host, self.port)
                self.notifier.ready(self.status_text())  # after the line: the journal's order
            if self._reloading is not None and not self._reloading:
                self._reloading = None
                self.notifier.ready(self.status_text())
            pinging = self.notifier.watchdog_s is not None and now >= next_ping
            if pinging and all_alive(self.slots, now, self.watchdog_s):
                self.notifier.notify("WATCHDOG=1")
                next_ping = now + (self.notifier.watchdog_s or 0.0)
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self._changed.wait()

    def status_text(self) -> str:
        """systemd's STATUS=: where the workers listen."""
        if not self._passed:
            where = "SO_REUSEPORT"
        elif len(self._passed) == 1:
            where = "the socket systemd passed"
        else:
            where = f"the {len(self._passed)} sockets systemd passed"
        return f"{self.count} workers listening on {self.host}:{self.port} ({where})"

    def reload(self) -> None:
        """SIGHUP: every worker that listens reloads, READY=1 again once each has; one still
        starting gets its SIGHUP once it listens (before, SIGHUP would end it)."""
        if not self._started:
            log.warning("reload asked for during start-up: the workers read the settings anew")
            return
        self.notifier.reloading()
        listening = {s.number for s in self.slots if s.pid is not None and s.listened}
        self._reload_pending = {s.number for s in self.slots if s.number not in listening}
        self._reloading = set(listening)
        for slot in self.slots:
            if slot.number in listening:
                slot.ready = False
                self._signal(slot, signal.SIGHUP)
        log.info("reload: SIGHUP sent to %d workers", len(listening))

    def rolling_restart(self) -> None:
        """SIGUSR2: replace the workers one at a time."""
        if self._rolling is not None and not self._rolling.done():
            log.warning("a rolling restart is under way already")
            return
        self._rolling = asyncio.create_task(self._roll(), name="rolling-restart")

    async def _roll(self) -> None:
        log.info("rolling restart of %d workers, one at a time", self.count)
        for slot in self.slots:
            if self._stopping:
                return
            process = self._processes.get(slot.number)
            if process is not None:
                self._expected_exits.add(process.pid)
                process.send_signal(signal.SIGTERM)
                await self._wait_exit(process)
            if self._stopping:
                return
            listening = self._listening[slot.number] = asyncio.Event()
            self._spawn(slot)
            try:
                async with asyncio.timeout(READY_TIMEOUT_S):
                    await listening.wait()
            except TimeoutError:
                log.error("rolling restart: worker %d/%d does not listen", slot.number, self.count)
                return
            log.info("rolling restart: worker %d/%d replaced", slot.number, self.count)
        log.info("rolling restart done")

    async def _wait_exit(self, process: asyncio.subprocess.Process) -> None:
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout_s + STOP_MARGIN_S):
                await process.wait()
        except TimeoutError:
            log.error("worker pid %d did not stop in time: killing it", process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    def _signal(self, slot: SlotState, sig: signal.Signals) -> None:
        process = self._processes.get(slot.number)
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    # --- Stopping ----------------------------------------------------------------------------

    async def _stop_all(self) -> None:
        self._stopping = True
        self.notifier.stopping()
        if self._rolling is not None:
            self._rolling.cancel()
        processes = list(self._processes.values())
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if processes:
            log.info("stopping: draining %d workers", len(processes))
        await asyncio.gather(*(self._wait_exit(p) for p in processes))
        # Their waiters record the exits; a slot starting just now is waited for too.
        await asyncio.gather(*list(self._waiters), return_exceptions=True)
        await self.claims.close()
        if self.health is not None:
            await self.health.stop()
        for relay in self._relays.values():
            relay.close()
        if self._reserved is not None:
            self._reserved.close()
        for passed in self._passed:
            passed.close()
        self.notifier.close()
        log.info("stopped")


async def supervise(settings: Settings, worker_argv: Sequence[str]) -> int:
    """Run the workers until SIGTERM or SIGINT; the exit status for `hub serve`."""
    supervisor = Supervisor(settings, worker_argv, Notifier())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, supervisor.reload)
    loop.add_signal_handler(signal.SIGUSR2, supervisor.rolling_restart)
    log.info(
        "hub %s: supervising %d workers (node ids %s/1 .. /%d)",
        node_id(settings), settings.workers, node_id(settings), settings.workers,
    )  # fmt: skip
    return await supervisor.run(stop)
