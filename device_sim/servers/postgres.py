"""A throwaway PostgreSQL 15 (tests, benchmarks, chaos): initdb on a temp dir, a free port.

Debian's `postgresql` package puts initdb and postgres in /usr/lib/postgresql/15/bin. Both
refuse to run as root, so under root they run as the `postgres` user, with the data and socket
directories made for and owned by it. Those live in a directory of their own in the system
temp dir, not under pytest's: pytest strips group and other bits from /tmp/pytest-of-USER
whenever any run starts, so with several runs on one machine the `postgres` user would lose
its way to its own files mid-test. The server's log stays under the test's temp dir. The
postgres process is started with `Popen(user=...)` rather than through `runuser`, because
runuser forks and waits: its pid would not be the postmaster's, and SIGSTOP cannot be
forwarded.

The server runs in its own session, and each backend makes itself a process group leader, so
signals go to the postmaster's tree (tests/servers/processes.py): `pause()` freezes the
postmaster *and* every backend (a frozen postmaster alone would leave open connections
answering), and `kill()` leaves no orphaned backend holding the shared memory that a restart
on the same data directory needs.

`stop()` sends SIGINT, PostgreSQL's "fast shutdown", then SIGKILL after a bound. SIGTERM is
its "smart shutdown", which waits for every client to disconnect on its own: a test's
forgotten pool would turn every stop into the full bound.

Authentication is `trust` on 127.0.0.1 only; `new_database()` makes a database owned by a
non-superuser role, as docs/postgres.md tells an operator to, so the hub's code is tested
with the rights it will have in production.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import asyncpg

from device_sim.local_servers import PG_BIN, ServerError, free_port, require_installed
from device_sim.servers.processes import (
    STOP_TIMEOUT_S,
    kill_tree,
    read_tail,
    signal_tree,
    stop_tree,
)

INITDB = PG_BIN / "initdb"
POSTGRES = PG_BIN / "postgres"
PSQL = PG_BIN / "psql"
PG_ISREADY = PG_BIN / "pg_isready"
START_TIMEOUT_S = 30.0
SUPERUSER = "postgres"
# Settings for a disposable server: no fsync (a test never outlives a power cut) but every
# commit in the kernel before it returns (synchronous_commit stays on), so a SIGKILLed server
# keeps what it acknowledged, as a crashed production one does.
TEST_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_connections": "200",
    "log_line_prefix": "%m [%p] ",
}


def _run_as() -> str | None:
    # Root must hand the server to the `postgres` user; anyone else runs it as themselves.
    return SUPERUSER if os.geteuid() == 0 else None


@dataclass
class PostgresServer:
    """A PostgreSQL server this module started, signalled and stopped by its process id."""

    root: Path
    port: int
    data_dir: Path
    socket_dir: Path
    log_path: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and delete its data directory (the log is kept)."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def pid(self) -> int:
        """The postmaster's process id."""
        if self._proc is None:
            raise ServerError("postgres was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the postmaster is alive (a frozen one counts as alive)."""
        return self._proc is not None and self._proc.poll() is None

    def dsn(self, database: str = "postgres", user: str = SUPERUSER) -> str:
        """The `postgresql://USER@HOST:PORT/DB` URL of a database on this server."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start postgres on this server's port and data directory; wait until it accepts."""
        argv = [str(POSTGRES), "-D", str(self.data_dir), "-k", str(self.socket_dir)]
        argv += ["-p", str(self.port)]
        for name, value in TEST_SETTINGS.items():
            argv += ["-c", f"{name}={value}"]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                **_as_user(_run_as()),
                # Its own session: a Ctrl-C meant for pytest does not reach it first.
                start_new_session=True,
                env=_clean_env(),
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Fast shutdown (SIGINT), then SIGKILL of every process after `timeout` s."""
        stop_tree(self._proc, signal.SIGINT, timeout)

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend, as a crash would; reaped."""
        kill_tree(self._proc)

    def pause(self) -> None:
        """Freeze the server and all its backends (SIGSTOP): sockets open, nothing answers."""
        signal_tree(self._proc, signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a frozen server (SIGCONT)."""
        signal_tree(self._proc, signal.SIGCONT)

    def restart(self, timeout: float = START_TIMEOUT_S) -> None:
        """Stop the server if it runs, then start it again on the same port and data."""
        self.stop()
        self.start(timeout)

    def log_tail(self) -> str:
        """The last lines of the server's log."""
        return read_tail(self.log_path)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser with psql; return its unaligned output."""
        result = subprocess.run(
            [str(PSQL), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql, self.dsn(database)],
            capture_output=True,
            text=True,
            check=False,
            env=_clean_env(),
            timeout=START_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise ServerError(f"psql {sql[:200]!r} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def new_database(self) -> tuple[str, str]:
        """Create a fresh database owned by a fresh non-superuser role; return (role, database)."""
        suffix = uuid.uuid4().hex[:12]
        role, database = f"hub_{suffix}", f"hub_test_{suffix}"
        # Names are made here from hex digits only, so they need no quoting.
        self.psql(f"CREATE ROLE {role} LOGIN")
        self.psql(f"CREATE DATABASE {database} OWNER {role}")
        return role, database

    def drop_database(self, role: str, database: str) -> None:
        """Drop a database made by `new_database`, and its role, even with clients connected."""
        self.psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        self.psql(f"DROP ROLE IF EXISTS {role}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        check = [str(PG_ISREADY), "-q", "-t", "1", "-d", self.dsn()]
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise ServerError(
                    f"postgres (pid {self._proc.pid}) exited with {self._proc.returncode} "
                    f"while starting; log {self.log_path}:\n{self.log_tail()}"
                )
            ready = subprocess.run(check, capture_output=True, check=False, env=_clean_env())
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"postgres (pid {self._proc.pid}) not ready on port {self.port} after "
                    f"{timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)


@dataclass(frozen=True, slots=True)
class PostgresDatabase:
    """A fresh database on a test PostgreSQL, owned by a fresh non-superuser role."""

    server: PostgresServer
    role: str
    name: str

    @property
    def dsn(self) -> str:
        """`postgresql://ROLE@127.0.0.1:PORT/NAME`, the `registry_url` form."""
        return self.server.dsn(self.name, self.role)

    async def connect(self) -> asyncpg.Connection:
        """A new connection as the database's owner (the caller closes it)."""
        return await asyncpg.connect(self.dsn)


def start_postgres(base_dir: Path, timeout: float = START_TIMEOUT_S) -> PostgresServer:
    """initdb a new cluster and start it on a free port; its log goes under `base_dir`."""
    for binary in (INITDB, POSTGRES, PSQL, PG_ISREADY):
        require_installed(binary)
    base_dir.mkdir(parents=True, exist_ok=True)
    owner = _run_as()
    root = Path(tempfile.mkdtemp(prefix="sensor-hub-postgres-"))
    # The traverse bit only (o+x): the `postgres` user reaches its own directories inside,
    # nobody can list what else is there.
    root.chmod(0o701)
    data_dir, socket_dir = root / "data", root / "socket"
    for directory in (data_dir, socket_dir):
        directory.mkdir(mode=0o700)
        if owner is not None:
            shutil.chown(directory, owner, owner)
    initdb = [str(INITDB), "-D", str(data_dir), "-U", SUPERUSER, "--auth=trust"]
    initdb += ["--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"]
    try:
        _run_checked(initdb, cwd=root, **_as_user(owner))
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    log_path = base_dir / f"postgres-{root.name.rsplit('-', 1)[1]}.log"
    last_error: ServerError | None = None
    # A free port can be taken by someone else before postgres binds it: try a few.
    for _attempt in range(3):
        server = PostgresServer(root, free_port(), data_dir, socket_dir, log_path)
        try:
            server.start(timeout)
        except ServerError as exc:
            last_error = exc
            if "address already in use" in server.log_tail().lower():
                continue
            server.close()
            raise
        return server
    shutil.rmtree(root, ignore_errors=True)
    assert last_error is not None
    raise last_error


def _as_user(owner: str | None) -> dict[str, Any]:
    # Group and supplementary groups too: a process left in root's group would be refused by
    # a root-owned directory's group bits before its o+x bit is even looked at.
    if owner is None:
        return {}
    return {"user": owner, "group": owner, "extra_groups": []}


def _run_checked(argv: list[str], **kwargs: Any) -> None:
    result = subprocess.run(
        argv, capture_output=True, text=True, check=False, env=_clean_env(), **kwargs
    )
    if result.returncode != 0:
        raise ServerError(f"`{' '.join(argv)}` exited {result.returncode}:\n{result.stderr}")


def _clean_env() -> dict[str, str]:
    # libpq and the server read PG* variables (PGHOST, PGPORT, PGDATA...): a stray one must
    # not move a test's server or client somewhere else.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}
