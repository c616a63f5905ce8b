"""A throwaway HAProxy 2.6 (tests, chaos): `haproxy -f FILE -db` with a config written per use.

Debian's `haproxy` package. `-db` keeps it in the foreground as one process (no daemon, no
master), so the pid Popen returns is HAProxy's and a SIGTERM stops it at once; SIGKILL
follows after a bound. The config is checked with `haproxy -c` first, so a test's mistake in
it reads as HAProxy's own message rather than as a timeout.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from device_sim.local_servers import HAPROXY, ServerError, free_port, require_installed
from device_sim.servers.processes import (
    STOP_TIMEOUT_S,
    kill_tree,
    read_tail,
    signal_tree,
    stop_tree,
)

START_TIMEOUT_S = 15.0

ConfigFor = Callable[[int], str]
"""Makes a config's text given the port HAProxy's frontend is to listen on."""


def websocket_config(port: int, backends: Sequence[tuple[str, int]], health_path: str = "") -> str:
    """A config proxying WebSocket connections on `port` round-robin to `backends`.

    Adds X-Forwarded-For, so a hub behind it sees the device's address. `timeout tunnel`
    governs an upgraded connection: the short `timeout client/server` would end an idle
    WebSocket. With `health_path`, each backend is checked with GET on it.
    """
    check = f"    option httpchk GET {health_path}\n" if health_path else ""
    servers = "".join(
        f"    server b{index} {host}:{backend_port}{' check inter 200ms' if check else ''}\n"
        for index, (host, backend_port) in enumerate(backends)
    )
    return f"""\
global
    log stderr format raw local0 info

defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    timeout tunnel 1h
    timeout http-request 5s

frontend devices
    bind 127.0.0.1:{port}
    option forwardfor
    default_backend hubs

backend hubs
    balance roundrobin
{check}{servers}"""


def proxy_protocol_config(port: int, backends: Sequence[tuple[str, int]], version: int = 2) -> str:
    """A TCP-mode config on `port` to `backends` that starts each backend connection with a
    PROXY header (`send-proxy-v2`, or `send-proxy` for version 1) naming the client."""
    send = "send-proxy-v2" if version == 2 else "send-proxy"
    servers = "".join(
        f"    server b{index} {host}:{backend_port} {send}\n"
        for index, (host, backend_port) in enumerate(backends)
    )
    return f"""\
global
    log stderr format raw local0 info

defaults
    mode tcp
    log global
    timeout connect 2s
    timeout client 1h
    timeout server 1h

frontend devices
    bind 127.0.0.1:{port}
    default_backend hubs

backend hubs
    balance roundrobin
{servers}"""


@dataclass
class HAProxyServer:
    """An HAProxy process this module started, stopped by its process id."""

    port: int
    config_path: Path
    log_path: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """HAProxy's process id."""
        if self._proc is None:
            raise ServerError("haproxy was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def url(self) -> str:
        """The frontend's ws:// base URL."""
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start HAProxy in the foreground; wait until its frontend accepts connections."""
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(HAPROXY), "-f", str(self.config_path), "-db"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config_path.parent,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (HAProxy's immediate stop), then SIGKILL after `timeout` s."""
        stop_tree(self._proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL HAProxy and reap it."""
        kill_tree(self._proc)

    def pause(self) -> None:
        """Freeze HAProxy (SIGSTOP): connections stay open, nothing is forwarded."""
        signal_tree(self._proc, signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a frozen HAProxy (SIGCONT)."""
        signal_tree(self._proc, signal.SIGCONT)

    def log_tail(self) -> str:
        """The last lines of HAProxy's log (its stderr)."""
        return read_tail(self.log_path)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise ServerError(
                    f"haproxy (pid {self._proc.pid}) exited with {self._proc.returncode} "
                    f"while starting; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(
                    f"haproxy (pid {self._proc.pid}) not listening on {self.port} after "
                    f"{timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)


def start_haproxy(
    base_dir: Path, config_for: ConfigFor, timeout: float = START_TIMEOUT_S
) -> HAProxyServer:
    """Write `config_for(free port)` to a new dir under `base_dir`, check it, start HAProxy."""
    require_installed(HAPROXY)
    base_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="haproxy-", dir=base_dir))
    last_error: ServerError | None = None
    # A free port can be taken by someone else before HAProxy binds it: try a few.
    for _attempt in range(3):
        port = free_port()
        config_path = root / "haproxy.cfg"
        config_path.write_text(config_for(port))
        checked = subprocess.run(
            [str(HAPROXY), "-c", "-f", str(config_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if checked.returncode != 0:
            raise ServerError(f"haproxy rejects {config_path}:\n{checked.stdout}{checked.stderr}")
        server = HAProxyServer(port, config_path, root / "haproxy.log")
        try:
            server.start(timeout)
        except ServerError as exc:
            last_error = exc
            if "cannot bind socket" in server.log_tail().lower():
                continue
            raise
        return server
    assert last_error is not None
    raise last_error
